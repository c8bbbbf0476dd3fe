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


def test_the_start_up_warm_up_writes_an_nrrd_and_leaves_nothing(monkeypatch, tmp_path):
    """What a server runs at start-up so its first NRRD result (OHIF's) does not load ITK: a real NRRD write."""
    import sys

    monkeypatch.setattr(infers.tempfile, "tempdir", str(tmp_path))
    written = []
    real_write = infers._write

    def write(array, affine, path, extension):
        real_write(array, affine, path, extension)
        with open(path, "rb") as f:
            written.append((path, f.read(4)))

    monkeypatch.setattr(infers, "_write", write)
    infers.warm_label_writer()
    assert [(os.path.basename(p), magic) for p, magic in written] == [("label.nrrd", b"NRRD")]
    assert not os.path.exists(written[0][0])
    assert "itk.ITKIONRRDPython" in sys.modules and os.listdir(tmp_path) == []
