"""model_core.io.readers: a .nii.gz read through ISA-L gives what MONAI's NibabelReader gives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from monai.data import NibabelReader
from monai.transforms import LoadImage

import model_core.io.readers as readers
from model_core.io.block_gzip import save_nifti_gz
from model_core.io.readers import IsalNibabelReader
from model_core.io.validation import InputError, check_image_volume
from model_core.workflows.configs import load_bundle_parser

ROOT = Path(__file__).resolve().parents[2]
AFFINE = np.array([[-0.8, 0, 0, 90.0], [0, 0.8, 0, -120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])


@pytest.fixture
def inflated(monkeypatch):
    """The files ISA-L opened."""
    opened = []
    real_open = readers.igzip.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(readers.igzip, "open", counting_open)
    return opened


def _volumes():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 3000, (37, 29, 11)).astype(np.int16)
    yield "float32", np.asfortranarray(rng.random((37, 29, 11), dtype=np.float32)), {}
    yield "int16, scaled", ct, {"slope": 0.5, "inter": -1024.0}
    yield "uint8, C order", np.ascontiguousarray(rng.integers(0, 255, (16, 12, 5)).astype(np.uint8)), {}
    yield "two channels", rng.random((16, 12, 5, 2)).astype(np.float32), {}


@pytest.mark.parametrize("name, array, scaling", list(_volumes()), ids=[v[0] for v in _volumes()])
def test_a_nii_gz_reads_as_nibabels_reader_reads_it(tmp_path, inflated, monkeypatch, name, array, scaling):
    """Whole, or in slabs of 4 slices laid out on another thread (the last one shorter)."""
    monkeypatch.setattr(IsalNibabelReader, "slab_slices", 4)
    laid_out, volumes_in_slabs = IsalNibabelReader._laid_out, []
    monkeypatch.setattr(
        IsalNibabelReader, "_laid_out", lambda self, source: volumes_in_slabs.append(1) or laid_out(self, source)
    )
    image = nib.Nifti1Image(array, AFFINE)
    if scaling:
        image.header.set_slope_inter(scaling["slope"], scaling["inter"])
    path = str(tmp_path / "volume.nii.gz")
    nib.save(image, path)
    theirs = LoadImage(image_only=True, reader=NibabelReader)(path)
    ours = LoadImage(image_only=True, reader=IsalNibabelReader)(path)
    assert inflated == [path]  # the voxels came through ISA-L
    assert ours.dtype == theirs.dtype and torch.equal(ours.as_tensor(), theirs.as_tensor())
    assert ours.is_contiguous()
    assert len(volumes_in_slabs) == (array.ndim == 3)  # a 4D volume is read whole
    assert scaling == {} or not torch.equal(ours.as_tensor(), torch.as_tensor(array, dtype=ours.dtype))  # scaled
    for key in ("affine", "original_affine", "spatial_shape", "pixdim", "original_channel_dim"):
        np.testing.assert_array_equal(np.asarray(ours.meta[key]), np.asarray(theirs.meta[key]))
    assert ours.meta.keys() == theirs.meta.keys()


def test_a_label_written_in_blocks_and_other_formats_read_back(tmp_path, inflated):
    """A gzip member of many sync-flushed blocks (``save_nifti_gz``) inflates whole; ``.nii`` (memory-mapped by
    nibabel) and NRRD go to MONAI's own readers."""
    label = np.zeros((64, 48, 40), np.uint16, order="F")
    label[10:30, 5:20, 12:31] = 3
    image = nib.Nifti1Image(label, AFFINE)
    blocks = tmp_path / "label.nii.gz"
    with open(blocks, "wb") as file:
        save_nifti_gz(image, file)
    plain = str(tmp_path / "label.nii")
    nib.save(image, plain)
    for path in (str(blocks), plain):
        out = LoadImage(image_only=True, dtype=None, reader=IsalNibabelReader)(path)
        np.testing.assert_array_equal(np.asarray(out), label)
    assert inflated == [str(blocks)]

    nrrd_path = str(tmp_path / "label.nrrd")
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(nrrd_path, label, header)
    out = LoadImage(image_only=True, dtype=None, reader=IsalNibabelReader)(nrrd_path)
    np.testing.assert_array_equal(np.asarray(out), label)


def test_a_volume_with_no_slices_reads_as_nibabels_reader_reads_it(tmp_path):
    path = str(tmp_path / "empty.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 0), np.float32), AFFINE), path)
    ours = LoadImage(image_only=True, reader=IsalNibabelReader)(path)
    assert ours.shape == LoadImage(image_only=True, reader=NibabelReader)(path).shape


def test_a_truncated_file_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((40, 40, 20), dtype=np.float32), AFFINE), str(path))
    path.write_bytes(path.read_bytes()[:5000])  # header intact, voxels cut off
    for reader in (NibabelReader, IsalNibabelReader):  # the same error as nibabel's own gzip
        with pytest.raises(EOFError, match="Compressed file ended before the end-of-stream marker"):
            LoadImage(image_only=True, reader=reader)(str(path))
    with pytest.raises(InputError, match="not a readable image volume"):
        check_image_volume(str(path))


def test_the_bundles_image_loaders_read_through_isal():
    parser = load_bundle_parser(str(ROOT / "bundle"))
    loaders = [parser.get_parsed_content("preprocessing").transforms[0]]
    loaders.append(parser.get_parsed_content("train#preprocessing").transforms[0])
    for loader in loaders:
        assert isinstance(loader._loader.readers[-1], IsalNibabelReader)  # tried first


def _digest(path: str) -> bytes:
    return hashlib.sha256(np.asarray(LoadImage(image_only=True, reader=IsalNibabelReader)(path)).tobytes()).digest()


def test_a_forked_worker_reads_after_its_parent_has(tmp_path, run_forked):
    """A DataLoader worker forked after the parent read a volume lays out slabs on a thread of its own."""
    path = str(tmp_path / "volume.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(2).random((48, 40, 40), dtype=np.float32), AFFINE), path)
    expected = _digest(path)  # the parent's layout thread is made
    assert run_forked(_digest, path) == expected
