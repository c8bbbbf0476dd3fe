"""Result files: nothing empty or half-written is left behind, and a label map never wraps in a too small type."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from lib.infers import icl_sam2 as infers  # the app's lib: pytest's pythonpath (pyproject.toml) has the app folder
from model_core.io.validation import InputError
from model_core.serving.service import Segmentation


def _segmentation(value: int) -> Segmentation:
    label = torch.zeros((1, 8, 8, 4), dtype=torch.int16)
    label[0, 2:5, 2:5, 1:3] = value
    return Segmentation(MetaTensor(label, affine=torch.eye(4, dtype=torch.float64)))


def _results() -> set[str]:
    folder = os.path.join(infers.tempfile.gettempdir(), "icl_sam2_results")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def test_a_failed_write_leaves_no_file(monkeypatch):
    before = _results()

    def broken(image, path, *args, **kwargs):  # the writer gets half way, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        infers.write_label(_segmentation(2), ".nii.gz")
    assert _results() == before


def test_a_failed_nrrd_write_leaves_no_file(monkeypatch):
    """The same for OHIF's format, written by pynrrd."""
    before = _results()

    def broken(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"NRRD0004\n")
        raise OSError("disk full")

    monkeypatch.setattr(infers.nrrd, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        infers.write_label(_segmentation(2), ".nrrd")
    assert _results() == before


def test_a_too_small_result_type_is_refused_before_writing():
    before = _results()
    with pytest.raises(InputError, match="result_dtype 'uint8' cannot hold label value 300"):
        infers.write_label(_segmentation(300), ".nrrd", "uint8")
    assert _results() == before
    path = infers.write_label(_segmentation(3), ".nrrd", "uint8")
    try:
        assert os.path.getsize(path) > 0 and np.asarray(__import__("itk").imread(path)).max() == 3
    finally:
        os.remove(path)


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_a_result_reads_back_with_its_voxels_and_oblique_flipped_affine(extension):
    """What Slicer and OHIF load: the same voxels on the same grid, read back by ITK (MONAI's ITKReader) and
    by nibabel where it reads the format."""
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 4, (1, 9, 7, 5)).astype(np.int16))
    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    ) @ np.diag([-0.8, 1.2, 2.5])  # rotated in-plane, the first axis flipped, anisotropic
    affine[:3, 3] = [50.0, -60.0, 10.0]
    path = infers.write_label(Segmentation(MetaTensor(label, affine=torch.from_numpy(affine))), extension)
    try:
        back = LoadImage(image_only=True, reader=ITKReader())(path)
        assert np.array_equal(np.asarray(back), label[0].numpy())
        assert np.allclose(np.asarray(back.affine), affine, atol=1e-5)
        if extension == ".nii.gz":
            assert np.allclose(nib.load(path).affine, affine, atol=1e-5)
    finally:
        os.remove(path)
