"""bundle/configs/medsam_lite.json through ``monai.bundle run``: boxes from a CSV or from a label, Dice per
structure."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model_core.io.validation import InputError
from model_core.medsam_lite.volume import BoxPrompt, read_box_file

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (80, 64, 4)  # (I, J, K)


def _case(folder: Path, name: str, seed: int) -> tuple[str, str]:
    """A noisy volume with a bright disc (value 1) and a bright square (value 2) through its slices."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[((i - 22) ** 2 + (j - 30) ** 2 <= 11**2)] = 1
    label[52:70, 18:44] = 2
    image = (80 + 8 * rng.standard_normal(SHAPE) + 300 * (label > 0)).astype(np.int16)
    affine = np.diag([1.2, 1.2, 4.0, 1.0])
    paths = str(folder / f"{name}.nii.gz"), str(folder / f"{name}_gt.nii.gz")
    nib.save(nib.Nifti1Image(image, affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return paths


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "bundle/configs/medsam_lite.json",
            "--output_dir",
            str(tmp_path / "out"),
            "--modality",
            "CT",
            "--window",
            "[0, 500]",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "out" / "cases.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_box_files_in_json_and_csv_and_their_errors(tmp_path):
    (tmp_path / "b.json").write_text(
        json.dumps({"a.nii.gz": [{"name": "disc", "value": 1, "roi": [10, 34, 18, 42, 0, 3]}]})
    )
    (tmp_path / "b.csv").write_text("image,name,value,i0,i1,j0,j1,k0,k1\na.nii.gz,disc,1,10,34,18,42,0,3\n")
    assert read_box_file(tmp_path / "b.json") == read_box_file(tmp_path / "b.csv")
    assert read_box_file(tmp_path / "b.csv")["a.nii.gz"][0].prompt == BoxPrompt((10.0, 18.0, 34.0, 42.0), 1, (0, 3))
    (tmp_path / "bad.csv").write_text("image,name,value,i0,i1\na,disc,1,1,2\n")
    with pytest.raises(InputError, match=r"header lacks \['j0'"):
        read_box_file(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text(json.dumps({"a": [{"name": "disc", "value": 1, "roi": [1, 2, 3]}]}))
    with pytest.raises(InputError, match=r"\[0\]\.roi must be 6 numbers"):
        read_box_file(tmp_path / "bad.json")
    with pytest.raises(InputError, match="reversed"):
        BoxPrompt.from_roi([30, 10, 0, 20, 0, 3]).check(SHAPE, "roi")
    with pytest.raises(InputError, match="outside"):
        BoxPrompt.from_roi([10, 90, 0, 20, 0, 3]).check(SHAPE, "roi")


@pytest.mark.slow  # monai.bundle run in a subprocess, LiteMedSAM on CPU
def test_boxes_from_a_csv_then_from_labels_with_dice(tmp_path):
    good, good_gt = _case(tmp_path, "good", 0)
    other, other_gt = _case(tmp_path, "other", 1)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "image,name,value,i0,i1,j0,j1,k0,k1\n"
        "good.nii.gz,disc,1,9,35,17,43,0,3\n"
        "good.nii.gz,square,2,50,71,16,45,1,2\n"
        "other.nii.gz,disc,1,9,95,17,43,0,3\n"
    )  # i1 = 95 lies outside the 80 columns
    result = _run(
        tmp_path,
        "--images",
        json.dumps([good, other]),
        "--labels",
        json.dumps([good_gt, other_gt]),
        "--boxes_file",
        str(boxes),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(tmp_path)
    by = {(r["image"], r["structure"]): r for r in rows}
    assert float(by[("good.nii.gz", "disc")]["dice"]) > 0.85
    # the square's box covers 2 of its 4 slices: Dice is at most 2 * 2 / (2 + 4)
    assert 0.6 < float(by[("good.nii.gz", "square")]["dice"]) <= 2 / 3 + 1e-4
    assert "outside" in by[("other.nii.gz", "")]["error"] and "structure 'disc'" in by[("other.nii.gz", "")]["error"]
    seg = nib.load(str(tmp_path / "out" / "good_seg.nii.gz"))
    assert seg.shape == SHAPE and np.allclose(seg.affine, nib.load(good).affine)
    square = np.asarray(seg.dataobj) == 2
    assert square[..., 1:3].any() and not square[..., [0, 3]].any()  # only the slices k0..k1 of its box
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == ["other.nii.gz"] and set(summary["dice"]) == {"disc", "square"}

    # evaluation: each structure's box from its label, Dice by MONAI's DiceMetric
    result = _run(
        tmp_path,
        "--images",
        json.dumps([other]),
        "--labels",
        json.dumps([other_gt]),
        "--structures",
        json.dumps({"disc": 1, "square": 2}),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    print(f"\nmedsam_lite bundle, boxes from labels: {summary['dice']}")

    # the propagation's slice step reaches the inferer, checked before any case runs
    result = _run(tmp_path, "--images", json.dumps([other]), "--labels", json.dumps([other_gt]), "--slice_step", "0")
    assert result.returncode != 0 and "slice_step must be a whole number of at least 1, got 0" in result.stderr
    assert (
        summary["failed"] == [] and summary["dice"]["disc"]["mean"] > 0.85 and summary["dice"]["square"]["mean"] > 0.85
    )
