"""Inference through the bundle: label maps in the input's original space, confidence beside them,
a support memory encoded once and reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import make_phantom
from model_core.io.phantoms import write_phantom_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[2]

SIZE = 64


pytestmark = pytest.mark.slow  # monai.bundle runs in subprocesses


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    datalist = make_dataset(str(root / "data"), train=1, validation=0, test=0, shape=(12, SIZE, SIZE))
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    save_checkpoint(build_icl_sam2("tiny", image_size=SIZE), str(ckpt))
    # a query in another orientation (LPS-like flips), anisotropic spacing and a non-square in-plane size
    image, _label = make_phantom((10, 80, 72), seed=99)
    affine = np.diag([-0.8, -0.9, 2.5, 1.0])
    affine[:3, 3] = [30.0, -12.0, 5.0]
    query = root / "query.nii.gz"
    nib.save(nib.Nifti1Image(image.transpose(1, 2, 0), affine), str(query))
    return datalist, ckpt, query, affine, root


def _infer(datalist, ckpt, query, out, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['bundle/configs/train.json','bundle/configs/inference.json']",
        "--datalist_file",
        datalist,
        "--preset",
        "tiny",
        "--image_size",
        str(SIZE),
        "--checkpoint",
        str(ckpt),
        "--query_images",
        json.dumps([str(query)]),
        "--output_dir",
        str(out),
        "--intensity#window",
        "[0,1]",
        "--classes",
        "[1,3]",
        "--class_names",
        '{"blob": 1, "block": 3}',
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
    )


def test_label_map_in_original_space_with_confidence(setup):
    datalist, ckpt, query, affine, root = setup
    out_dir = root / "out"
    support_file = root / "support.pt"
    result = _infer(datalist, ckpt, query, out_dir, ["--support_memory_file", str(support_file)])
    assert result.returncode == 0, result.stderr[-3000:]
    seg = nib.load(str(out_dir / "query_seg.nii.gz"))
    assert seg.shape == (80, 72, 10)  # the input's grid, not the model's 64x64
    assert np.allclose(seg.affine, affine, atol=1e-4)  # and its orientation and spacing
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= {0, 1, 3}  # label values of the classes, not channel indices
    confidence = json.loads((out_dir / "query_confidence.json").read_text())["confidence"]
    assert set(confidence) == {"blob", "block"} and all(0.0 <= v <= 1.0 for v in confidence.values())
    assert support_file.exists()

    # the saved support memory is reused: a second run needs no support volume at all
    os.rename(datalist, datalist + ".moved")
    try:
        again = _infer(datalist, ckpt, query, root / "out2", ["--support_memory_file", str(support_file)])
    finally:
        os.rename(datalist + ".moved", datalist)
    assert again.returncode == 0, again.stderr[-3000:]
    second = nib.load(str(root / "out2" / "query_seg.nii.gz"))
    assert np.array_equal(np.asarray(second.dataobj), np.asarray(seg.dataobj))


def test_missing_query_file_is_reported(setup):
    datalist, ckpt, _, _, root = setup
    result = _infer(datalist, ckpt, root / "nope.nii.gz", root / "out3")
    assert result.returncode != 0 and "nope.nii.gz" in result.stderr


def test_optional_resampling_to_a_spacing_is_inverted_to_the_original_grid(setup):
    """With ``pixdim`` the volume is resampled (here to 1.25 mm slices, twice as many) before the
    model, and the label map still comes back on the input's own grid."""
    datalist, ckpt, query, affine, root = setup
    out_dir = root / "out_spacing"
    result = _infer(datalist, ckpt, query, out_dir, ["--pixdim", "[-1, -1, 1.25]"])
    assert result.returncode == 0, result.stderr[-3000:]
    seg = nib.load(str(out_dir / "query_seg.nii.gz"))
    assert seg.shape == (80, 72, 10) and np.allclose(seg.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 3}
    # the model did see the resampled volume: the bundle's preprocessing gives 19 slices (9 gaps of 2.5 mm at 1.25
    # mm), not 10
    from monai.bundle import ConfigParser

    for pixdim, depth in (([-1, -1, 1.25], 19), (None, 10)):
        parser = ConfigParser()  # the configs layered as on the command line, from any working directory
        parser.read_config([str(ROOT / "bundle" / "configs" / name) for name in ("train.json", "inference.json")])
        parser.update({"pixdim": pixdim, "image_size": SIZE, "intensity#window": [0, 1]})
        image = parser.get_parsed_content("preprocessing")({"image": str(query)})["image"]
        assert image.shape[-1] == depth
