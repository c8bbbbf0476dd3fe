"""Result files: nothing empty or half-written is left behind, and a label map never wraps in a too small type."""

from __future__ import annotations

import itertools
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi import HTTPException
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


@pytest.mark.parametrize(
    "extension, module, writer",
    [(".nii", nib, "save"), (".nii.gz", infers, "save_nifti_gz"), (".nrrd", infers, "save_nrrd_gz")],
)
def test_a_failed_write_leaves_no_file(monkeypatch, extension, module, writer):
    """For each format (OHIF's NRRD too): the writer gets half way, then the disk is full."""
    before = _results()

    def broken(*args, **kwargs):
        target = next(a for a in args if isinstance(a, str) or hasattr(a, "write"))  # nib.save's path, or the file
        if isinstance(target, str):
            with open(target, "wb") as f:
                f.write(b"\x00" * 10)
        else:
            target.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(module, writer, broken)
    with pytest.raises(OSError, match="disk full"):
        infers.write_label(_segmentation(2), extension)
    assert _results() == before


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
def test_a_block_that_fails_to_compress_leaves_no_file(monkeypatch, extension):
    """A failure inside the compressor's threads, after other blocks were deflated, reaches the request."""
    from model_core.io import block_gzip

    before = _results()
    calls, deflate, numbers = [], block_gzip._deflate, itertools.count()

    def failing(block, level):  # called from the pool's threads: each call takes its own number
        calls.append(len(block))
        if next(numbers) == 1:
            raise MemoryError("no memory for the second block")
        return deflate(block, level)

    monkeypatch.setattr(block_gzip, "_deflate", failing)
    monkeypatch.setattr(block_gzip, "_GRAIN", 16)  # a tiny label is several runs of grains
    with pytest.raises(MemoryError, match="second block"):
        infers.write_label(_segmentation(2), extension)
    assert len(calls) >= 2 and _results() == before


def test_a_negative_label_is_refused_for_an_unsigned_result():
    with pytest.raises(InputError, match="cannot hold label value -2; use int16 or int32"):
        infers.write_label(_segmentation(-2), ".nii.gz", "uint16")


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


@pytest.mark.parametrize("layout", ["first_axis_fastest", "last_axis_fastest"])
@pytest.mark.parametrize("shape", [(9, 7, 5), (300, 280, 7)], ids=["one_block", "blocks_and_background"])
@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".nii"])
def test_a_result_reads_back_with_its_voxels_and_oblique_flipped_affine(extension, shape, layout):
    """What Slicer and OHIF load: the same voxels on the same grid, read back by ITK (MONAI's ITKReader) and
    by nibabel where it reads the format; the larger label is gzipped in several blocks, with all-background
    runs among them. The service lays its answers out first axis fastest, as the files store them (written
    from memory); the other layout goes through nibabel's own writer."""
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 4, (1, *shape)).astype(np.int16))
    if shape[-1] > 5:
        label[..., 1:4] = 0  # background slices
        label[:, 100:, :, 5] = 0  # background at the end of a slice
    if layout == "first_axis_fastest":
        label = label[0].permute(2, 1, 0).contiguous().permute(2, 1, 0)[None]  # the same voxels
        assert label[0].numpy().flags.f_contiguous
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
        if extension != ".nrrd":
            assert np.allclose(nib.load(path).affine, affine, atol=1e-5)
            assert np.array_equal(np.asarray(nib.load(path).dataobj), label[0].numpy())
    finally:
        os.remove(path)


def test_the_label_values_a_map_was_made_with_are_checked_instead_of_its_voxels(monkeypatch):
    """The service names the label values of its answers; the writer checks the result type against those and
    reads no voxel for it (a pass over 42 M voxels of a CT-sized label was 7 ms of a follow-up click)."""
    scanned = []
    for name in ("min", "max"):
        bound = getattr(np, name)
        monkeypatch.setattr(np, name, lambda a, *args, _bound=bound, **kw: scanned.append(np.size(a)) or _bound(a))
    made_with = _segmentation(3)
    made_with.values = (3, 300)  # 300 was a channel of this answer, though it won no voxel
    with pytest.raises(InputError, match="result_dtype 'uint8' cannot hold label value 300"):
        infers.write_label(made_with, ".nii.gz", "uint8")
    made_with.values = (3,)
    path = infers.write_label(made_with, ".nii.gz", "uint16")  # int16 -> uint16: the lower bound is checked
    os.remove(path)
    assert scanned and all(size <= 3 for size in scanned)  # the values, never the 256 voxels
    scanned.clear()
    path = infers.write_label(_segmentation(3), ".nii.gz", "uint16")  # values not given: every voxel is read
    os.remove(path)
    assert scanned == [8 * 8 * 4]


@pytest.mark.parametrize("dtype", ["uint16", "uint8"])
def test_the_infer_task_releases_an_answer_once_its_file_is_written_or_refused(dtype):
    """An interactive answer is released once its file is written (the session may write the next follow-up into
    its memory), and also when the write is refused."""
    from types import SimpleNamespace

    task = infers.InteractiveInfer(lambda: SimpleNamespace(labels={"blob": 1}), lambda: None, {"blob": 1})
    released = []
    answer = _segmentation(300)
    answer.on_release = lambda: released.append(_results())  # the files there when it is released
    params = task._params({"result_dtype": dtype})
    if dtype == "uint8":
        with pytest.raises(HTTPException) as refused:
            task._reply(params, answer, [])
        assert refused.value.status_code == 422
    else:
        path, _ = task._reply(params, answer, [])
        assert os.path.basename(path) in released[0]  # written before the release
        os.remove(path)
    assert len(released) == 1
