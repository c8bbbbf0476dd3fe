"""The CVPR 2024 laptop challenge commands: case checks, the challenge's DSC/NSD, and infer + evaluate end to end.

Metric values marked "DeepMind" were computed once with DeepMind's surface-distance package
(what the challenge's compute_metrics.py uses) on the same masks; MONAI's
compute_surface_dice(use_subvoxels=True) reproduces them.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from model_core.medsam_lite.challenge import CaseError, dsc_nsd, evaluate_folder, load_case, score_case

ROOT = Path(__file__).resolve().parents[2]


def _square(shape=(40, 40), top=10, left=10, side=10) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[top : top + side, left : left + side] = 1
    return a


# ------------------------------------------------------------------------------------------- metrics
def test_a_mask_against_itself_scores_one():
    a = _square()
    assert dsc_nsd(a, a) == (1.0, 1.0)
    v = np.stack([a * 0, a, a * 2, a * 0])
    assert dsc_nsd(v, v, spacing=(2.0, 0.7, 0.7)) == (1.0, 1.0)


def test_a_shifted_copy_scores_what_the_challenge_computes():
    a = _square()
    shifted = np.roll(a, 3, axis=1)  # 70 of 100 pixels overlap
    dsc, nsd = dsc_nsd(a, shifted)
    assert dsc == pytest.approx(2 * 70 / 200, abs=1e-6)
    assert nsd == pytest.approx(0.9366674, abs=1e-5)  # DeepMind, (40, 40, 1) volume, spacing 1, tolerance 2
    assert dsc_nsd(a, np.roll(a, 1, axis=1)) == (pytest.approx(0.9, abs=1e-6), pytest.approx(1.0))  # 1 px <= 2 px


def test_a_missed_half_scores_two_thirds_and_labels_are_averaged():
    one = _square() | _square(top=25, left=25)  # two equal squares with label 1; the prediction finds one
    assert dsc_nsd(one, _square()) == (pytest.approx(2 / 3, abs=1e-6), pytest.approx(2 / 3, abs=1e-6))
    two = _square() + 2 * _square(top=25, left=25)  # label 2 missed entirely: mean of 1 and 0
    assert dsc_nsd(two, _square()) == (pytest.approx(0.5), pytest.approx(0.5))


def test_nsd_uses_the_spacing_and_the_challenges_dsc_shortcut():
    v = np.zeros((8, 20, 20), np.uint8)
    v[2:6, 5:12, 5:12] = 1
    up = np.roll(v, 1, axis=0)  # one slice further: 1 mm away at 1 mm slices, 3 mm at 3 mm slices
    assert dsc_nsd(v, up, spacing=(1, 1, 1)) == (pytest.approx(0.75), pytest.approx(1.0))
    dsc, nsd = dsc_nsd(v, up, spacing=(3, 1, 1))
    assert dsc == pytest.approx(0.75) and 0.5 < nsd < 0.9
    far = np.roll(v, 10, axis=2)  # disjoint: DSC 0, so NSD is not computed (0), as the challenge
    assert dsc_nsd(v, far, spacing=(1, 1, 1)) == (0.0, 0.0)
    assert np.isnan(dsc_nsd(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))[0])


def test_score_case_reads_spacing_in_the_challenges_order(tmp_path):
    v = np.zeros((8, 20, 20), np.uint8)
    v[2:6, 5:12, 5:12] = 1
    np.savez(tmp_path / "gt.npz", gts=v, spacing=np.array([1.0, 1.0, 3.0]))  # SimpleITK (x, y, z)
    np.savez(tmp_path / "seg.npz", segs=np.roll(v, 1, axis=0))
    as_stored = score_case(tmp_path / "seg.npz", tmp_path / "gt.npz")  # the challenge: (1, 1, 3) on (D, H, W)
    reversed_ = score_case(tmp_path / "seg.npz", tmp_path / "gt.npz", spacing_order="xyz")  # 3 mm between slices
    assert as_stored == (pytest.approx(0.75), pytest.approx(1.0))
    assert reversed_[1] == pytest.approx(dsc_nsd(v, np.roll(v, 1, axis=0), spacing=(3, 1, 1))[1])
    np.savez(tmp_path / "nospacing.npz", gts=v)
    with pytest.raises(CaseError, match=r"case 'nospacing', key 'spacing': missing from the gts npz"):
        score_case(tmp_path / "seg.npz", tmp_path / "nospacing.npz")
    np.savez(tmp_path / "small.npz", segs=v[:4])
    with pytest.raises(CaseError, match=r"case 'gt', key 'segs': has shape \(4, 20, 20\) but 'gts' has \(8, 20, 20\)"):
        score_case(tmp_path / "small.npz", tmp_path / "gt.npz")


# ------------------------------------------------------------------------------------------- case checks
@pytest.mark.parametrize(
    "name,arrays,match",
    [
        (
            "2D_nobox",
            {"imgs": np.zeros((32, 32, 3), np.uint8)},
            r"case '2D_nobox', key 'boxes': missing from the npz \(it has \['imgs'\]\)",
        ),
        (
            "3D_flat",
            {"imgs": np.zeros((32, 32), np.uint8), "boxes": np.array([[1, 1, 0, 9, 9, 0]])},
            r"case '3D_flat', key 'imgs': has shape \(32, 32\), not a 3D volume \(D, H, W\), but 'boxes' are 3D",
        ),
        (
            "3D_named",
            {"imgs": np.zeros((4, 32, 32), np.uint8), "boxes": np.array([[1, 1, 9, 9]])},
            r"case '3D_named', key 'boxes': has 4 columns \(2D boxes\) but the case is named 3D",
        ),
        (
            "2D_out",
            {"imgs": np.zeros((32, 40), np.uint8), "boxes": np.array([[1, 1, 9, 9], [30, 5, 50, 9]])},
            r"case '2D_out', key 'boxes': box 1 \[30.0, 5.0, 50.0, 9.0\] lies outside the 32x40",
        ),
        (
            "2D_rev",
            {"imgs": np.zeros((32, 32), np.uint8), "boxes": np.array([[9, 1, 1, 9]])},
            r"case '2D_rev', key 'boxes': box 0 .* is reversed",
        ),
        (
            "2D_zero",
            {"imgs": np.zeros((32, 32), np.uint8), "boxes": np.array([[4, 4, 4, 9]])},
            r"case '2D_zero', key 'boxes': box 0 .* has zero size",
        ),
        (
            "3D_zrev",
            {"imgs": np.zeros((4, 32, 32), np.uint8), "boxes": np.array([[1, 1, 3, 9, 9, 1]])},
            r"case '3D_zrev', key 'boxes': box 0 has z_min 3 > z_max 1 \(reversed\)",
        ),
        (
            "3D_zout",
            {"imgs": np.zeros((4, 32, 32), np.uint8), "boxes": np.array([[1, 1, 0, 9, 9, 4]])},
            r"case '3D_zout', key 'boxes': box 0 has z range \[0, 4\] outside the volume's slice indices 0..3",
        ),
        (
            "2D_cols",
            {"imgs": np.zeros((32, 32), np.uint8), "boxes": np.zeros((1, 5))},
            r"case '2D_cols', key 'boxes': has shape \(1, 5\); \(N, 4\) .* or \(N, 6\)",
        ),
    ],
)
def test_bad_cases_name_the_case_and_the_key(tmp_path, name, arrays, match):
    np.savez(tmp_path / f"{name}.npz", **arrays)
    with pytest.raises(CaseError, match=match):
        load_case(tmp_path / f"{name}.npz")


def test_a_file_that_is_not_an_npz_is_a_case_error(tmp_path):
    (tmp_path / "2D_junk.npz").write_text("not a zip")
    with pytest.raises(CaseError, match=r"case '2D_junk': not a readable npz file"):
        load_case(tmp_path / "2D_junk.npz")


# ------------------------------------------------------------------------------------------- end to end
def _disk_image(shape, disks, seed):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint8)
    for i, (cy, cx, r) in enumerate(disks, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    image = 0.2 + 0.6 * (labels > 0) + 0.05 * np.random.default_rng(seed).standard_normal(shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), labels


def _box(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max(), rows.max()]


def _write_cases(root: Path) -> None:
    """Two good 2D cases, one good 3D case and three broken ones, in the challenge's imgs/ and gts/ layout."""
    imgs, gts = root / "imgs", root / "gts"
    imgs.mkdir(parents=True)
    gts.mkdir()
    # 2D, RGB uint8, two structures
    image, labels = _disk_image((120, 150), [(40, 40, 15), (75, 100, 25)], seed=1)
    rgb = np.repeat(image[..., None], 3, axis=2)
    np.savez_compressed(
        imgs / "2D_disks.npz",
        imgs=rgb,
        boxes=np.array([_box(labels == 1), _box(labels == 2)]),
        spacing=np.array([1.0, 1.0]),
    )
    np.savez_compressed(gts / "2D_disks.npz", gts=labels, spacing=np.array([1.0, 1.0]))
    # 2D grey, one structure
    image, labels = _disk_image((90, 70), [(45, 35, 18)], seed=2)
    np.savez_compressed(imgs / "2D_grey.npz", imgs=image, boxes=np.array([_box(labels == 1)]))
    np.savez_compressed(gts / "2D_grey.npz", gts=labels)
    # 3D: a disk on slices 2-3 of 6; the box's z-range is the structure's
    volume, labels3 = np.zeros((6, 64, 64), np.uint8), np.zeros((6, 64, 64), np.uint8)
    for z in range(6):
        volume[z], labels3[z] = _disk_image((64, 64), [(32, 30, 12)] if z in (2, 3) else [], seed=10 + z)
    x0, y0, x1, y1 = _box(labels3.any(axis=0))
    np.savez_compressed(
        imgs / "3D_disk.npz", imgs=volume, boxes=np.array([[x0, y0, 2, x1, y1, 3]]), spacing=np.array([0.8, 0.8, 2.5])
    )
    np.savez_compressed(gts / "3D_disk.npz", gts=labels3, spacing=np.array([0.8, 0.8, 2.5]))
    # broken: a 2D image given as 3D, an npz without boxes, a box outside the image
    np.savez_compressed(imgs / "3D_flat.npz", imgs=image, boxes=np.array([[10, 10, 0, 40, 40, 3]]))
    np.savez_compressed(gts / "3D_flat.npz", gts=labels, spacing=np.array([1.0, 1.0, 1.0]))
    np.savez_compressed(imgs / "2D_nobox.npz", imgs=image)
    np.savez_compressed(imgs / "2D_outside.npz", imgs=image, boxes=np.array([[10, 10, 200, 40]]))
    np.savez_compressed(gts / "2D_outside.npz", gts=labels)


def _run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_infer_and_evaluate_run_end_to_end_and_report_broken_cases(tmp_path, icl_sam2_command):
    """Both commands on generated cases with the real LiteMedSAM (4 slices encoded): broken cases are rows, not
    crashes.
    """
    _write_cases(tmp_path)
    infer = _run(
        icl_sam2_command,
        "challenge",
        "infer",
        "--input_dir",
        str(tmp_path / "imgs"),
        "--output_dir",
        str(tmp_path / "segs"),
    )
    assert infer.returncode == 0, infer.stderr
    summary = json.loads(infer.stdout.strip().splitlines()[-1])
    assert summary["cases"] == 6 and summary["ok"] == 3
    assert sorted(summary["failed"]) == ["2D_nobox", "2D_outside", "3D_flat"]
    assert "case '2D_nobox', key 'boxes': missing" in infer.stderr

    segs = np.load(tmp_path / "segs" / "2D_disks.npz")["segs"]
    assert segs.shape == (120, 150) and segs.dtype == np.uint8 and set(np.unique(segs)) == {0, 1, 2}
    seg3 = np.load(tmp_path / "segs" / "3D_disk.npz")["segs"]
    assert seg3.shape == (6, 64, 64) and np.flatnonzero(seg3.any(axis=(1, 2))).tolist() == [2, 3]
    assert not (tmp_path / "segs" / "2D_nobox.npz").exists()

    out = tmp_path / "metrics.csv"
    evaluate = _run(
        icl_sam2_command,
        "challenge",
        "evaluate",
        "--seg_dir",
        str(tmp_path / "segs"),
        "--gt_dir",
        str(tmp_path / "gts"),
        "--output",
        str(out),
        "--summary",
        str(tmp_path / "summary.json"),
    )
    assert evaluate.returncode == 0, evaluate.stderr
    with open(out, newline="") as f:
        rows = {row["case"]: row for row in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == ["case", "DSC", "NSD", "seconds", "status", "error"]
    assert sorted(rows) == ["2D_disks", "2D_grey", "2D_nobox", "2D_outside", "3D_disk", "3D_flat"]
    for case in ("2D_disks", "2D_grey", "3D_disk"):
        assert rows[case]["status"] == "ok" and rows[case]["error"] == ""
        assert float(rows[case]["DSC"]) > 0.85 and float(rows[case]["NSD"]) > 0.85
        assert float(rows[case]["seconds"]) > 0
    assert "key 'imgs'" in rows["3D_flat"]["error"] and "not a 3D volume" in rows["3D_flat"]["error"]
    assert "key 'boxes'" in rows["2D_outside"]["error"] and "lies outside" in rows["2D_outside"]["error"]
    for case in ("3D_flat", "2D_outside", "2D_nobox"):
        assert (
            rows[case]["status"] == "failed"
            and rows[case]["DSC"] == ""
            and rows[case]["error"].startswith("inference:")
        )
    result = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert result == {**json.loads((tmp_path / "summary.json").read_text()), "output": str(out)}
    assert result["cases"] == 6 and result["scored"] == 3 and result["failed"] == 3
    dscs = sorted(float(rows[c]["DSC"]) for c in ("2D_disks", "2D_grey", "3D_disk"))
    assert result["DSC"]["median"] == pytest.approx(dscs[1], abs=1e-4)
    assert result["DSC"]["mean"] == pytest.approx(sum(dscs) / 3, abs=1e-4)

    # the same scores in process (the command is a thin wrapper), and a missing segmentation is a failed row
    (tmp_path / "segs" / "2D_grey.npz").unlink()
    _scores, again = evaluate_folder(tmp_path / "segs", tmp_path / "gts")
    assert again["scored"] == 2 and "no segmentation 2D_grey.npz" in again["failed_cases"]["2D_grey"]
