"""LiteMedSAM's fast path on 3D challenge cases gives the slow path's answers.

The slow path: torch fp32, one slice per encoder call. The fast path: the image encoder on another
backend, several slices per call (the next ones along the propagation, within the box's z-range),
through ``icl-sam2 challenge infer`` as a user runs it. At a small size (one generated case, a
structure over a few slices of 256 x 256), the labels must agree (Dice at least 0.99) and the fast
path encodes at most ``batch - 1`` more slices per direction than the slow one.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from model_core.export.encoder_choice import lite_medsam
from model_core.export.encoders import runtime_available
from model_core.medsam_lite import challenge
from model_core.medsam_lite.model import LiteMedSAM
from model_core.medsam_lite.phantom_cases import write_phantom_cases
from model_core.modeling.precision import cpu_bf16_capability


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_phantom_cases_have_the_challenge_form(tmp_path):
    files = write_phantom_cases(tmp_path, cases=2, extent=(6, 9), size=64, seed=3)
    spans = []
    for file in files:
        case = challenge.load_case(file)  # the challenge's own checks
        gts = np.load(tmp_path / "gts" / f"{case.name}.npz")["gts"]
        assert case.is_3d and case.image.dtype == np.uint8 and case.image.shape == gts.shape
        z = np.flatnonzero(gts.any(axis=(1, 2)))
        assert list(case.boxes[0][[2, 5]]) == [z.min(), z.max()]
        spans.append(len(z))
    assert abs(spans[0] - 6) <= 2 and abs(spans[1] - 9) <= 2
    with pytest.raises(ValueError, match="extent"):
        write_phantom_cases(tmp_path, extent=(9, 6))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("challenge_fast")
    write_phantom_cases(folder, cases=1, extent=(6, 6), size=256, seed=1)
    slow = LiteMedSAM.from_package(device="cpu", precision="fp32")
    runs = challenge.infer_folder(folder / "imgs", folder / "slow", model=slow)
    assert [r.status for r in runs] == ["ok"]
    name = runs[0].case
    return {
        "folder": folder,
        "name": name,
        "slow": np.load(folder / "slow" / f"{name}.npz")["segs"],
        "encoded": slow.encoded_slices,
    }


@pytest.mark.slow
def test_command_with_onnxruntime_and_batches_answers_as_the_slow_path(case, icl_sam2_command):
    if not runtime_available("onnxruntime"):
        pytest.skip("onnxruntime is not installed")
    folder = case["folder"]
    command = [*icl_sam2_command, "challenge", "infer", "--input_dir", str(folder / "imgs")]
    command += ["--output_dir", str(folder / "fast"), "--encoder_backend", "onnxruntime", "--encoder_batch_size", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] == 1
    fast = np.load(folder / "fast" / f"{case['name']}.npz")["segs"]
    slow = case["slow"]
    assert slow.any() and _dice(fast > 0, slow > 0) >= 0.99


@pytest.mark.slow
def test_bf16_encoder_in_batches_answers_as_the_slow_path(case):
    name = "openvino-bf16" if runtime_available("openvino") else "torch-bf16"
    if not cpu_bf16_capability()["bf16"]:
        pytest.skip("this CPU has neither AMX-BF16 nor AVX512-BF16")
    model = lite_medsam(name, encoder_batch_size=2)
    runs = challenge.infer_folder(case["folder"] / "imgs", case["folder"] / name, model=model)
    assert [r.status for r in runs] == ["ok"]
    fast = np.load(case["folder"] / name / f"{case['name']}.npz")["segs"]
    assert _dice(fast > 0, case["slow"] > 0) >= 0.99
    # the batches look ahead along each direction within the z-range: at most one extra slice per direction here
    assert case["encoded"] <= model.encoded_slices <= case["encoded"] + 2
    assert model.describe_backend()["name"] == name


@pytest.mark.slow
def test_a_slice_step_fills_where_masks_agree_or_narrow_and_keeps_the_ends(tmp_path):
    """``slice_step`` 3 on a structure over 16 slices: fewer slices run, the same ends. Measured: 8 of 16 slices
    run, Dice 0.983 against the full pass and 0.981 against the truth (the full pass: 0.992), 0.97 required;
    with the Dice rule only (``fill_min_inside`` None) the narrowing ends run slice by slice: 13 slices, Dice
    0.9965 against the full pass, 0.99 required. The steps land on multiples of 3; with nothing agreeing,
    nothing is filled and it is the full pass."""
    write_phantom_cases(tmp_path, cases=1, extent=(16, 16), size=256, seed=2)
    case = challenge.load_case(tmp_path / "imgs" / "3D_phantom_000.npz")
    truth = np.load(tmp_path / "gts" / "3D_phantom_000.npz")["gts"] > 0
    model = LiteMedSAM.from_package(device="cpu", precision="fp32")
    embeddings: dict = {}
    full = model.segment_volume(case.image, case.boxes[0], embeddings=embeddings)
    encoded = model.encoded_slices
    stepped = model.segment_volume(case.image, case.boxes[0], embeddings=embeddings, slice_step=3)
    assert model.encoded_slices == encoded  # every slice it needed was in the shared embeddings

    assert full.filled == [] and len(full.slices) == truth.any(axis=(1, 2)).sum() >= 14
    assert stepped.filled and not set(stepped.filled) & set(stepped.slices)
    assert len(set(stepped.slices)) < len(full.slices)
    assert np.isnan(stepped.iou[stepped.filled]).all()
    ends = [np.flatnonzero(r.mask.any(axis=(1, 2)))[[0, -1]].tolist() for r in (full, stepped)]
    assert ends[0] == ends[1]
    assert _dice(stepped.mask, full.mask) >= 0.97 and _dice(stepped.mask, truth) >= 0.97

    by_dice = model.segment_volume(case.image, case.boxes[0], embeddings=embeddings, slice_step=3, fill_min_inside=None)
    assert len(set(stepped.slices)) < len(set(by_dice.slices)) < len(full.slices)
    assert _dice(by_dice.mask, full.mask) >= 0.99

    # every step trusted: the box's slice, then multiples of 3 up and down, and the z-range's ends
    z_lo, z_hi = int(case.boxes[0][2]), int(case.boxes[0][5])
    z = int(z_lo + (z_hi - z_lo) / 2)
    up = sorted({min(k, z_hi) for k in range((z // 3 + 1) * 3, z_hi + 3, 3)})
    down = sorted({max(k, z_lo) for k in range(((z - 1) // 3) * 3, z_lo - 3, -3)}, reverse=True)
    trusting = model.segment_volume(case.image, case.boxes[0], embeddings=embeddings, slice_step=3, fill_min_dice=0)
    assert trusting.slices == [z, *up, *down]
    assert sorted(trusting.slices + trusting.filled) == list(range(z_lo, z_hi + 1))

    strict = model.segment_volume(
        case.image, case.boxes[0], embeddings=embeddings, slice_step=3, fill_min_dice=1, fill_min_inside=None
    )
    assert strict.filled == [] and np.array_equal(strict.mask, full.mask)

    # through the folder runner, as icl-sam2 challenge infer --slice_step 3: fewer slices encoded, the same answer
    runner = LiteMedSAM.from_package(device="cpu", precision="fp32")
    runs = challenge.infer_folder(tmp_path / "imgs", tmp_path / "segs", model=runner, slice_step=3)
    assert [r.status for r in runs] == ["ok"]
    assert runner.encoded_slices == len(set(stepped.slices))
    assert np.array_equal(np.load(tmp_path / "segs" / "3D_phantom_000.npz")["segs"] > 0, stepped.mask)


def test_a_bad_slice_step_is_refused_before_the_model_loads(tmp_path, icl_sam2_command):
    write_phantom_cases(tmp_path, cases=1, extent=(4, 4), size=64, seed=0)
    command = [*icl_sam2_command, "challenge", "infer", "--input_dir", str(tmp_path / "imgs")]
    done = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "segs"), "--slice_step", "0"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "slice_step must be a whole number of at least 1, got 0" in done.stderr
    assert not (tmp_path / "segs").exists()


def test_batch_of_slices_encodes_as_one_at_a_time():
    """``embed_many`` is ``embed`` per slice (the batch only changes how many slices one call takes)."""
    model = LiteMedSAM.from_package(device="cpu", precision="fp32")
    rng = np.random.default_rng(0)
    slices = [rng.integers(0, 255, (40, 56), dtype=np.uint8) for _ in range(2)]
    together = model.embed_many(slices)
    alone = [model.embed(s) for s in slices]
    for a, b in zip(together, alone):
        assert a.original_size == b.original_size and a.resized_size == b.resized_size
        assert torch.allclose(a.embedding, b.embedding, atol=1e-4)
    assert model.encoded_slices == 4
