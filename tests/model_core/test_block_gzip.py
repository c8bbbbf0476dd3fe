"""Gzip in independent blocks: one ordinary gzip member that every reader reads, NIfTI and NRRD files whose
contents are those nibabel and pynrrd write."""

from __future__ import annotations

import gzip
import io
import subprocess
import zlib

import nibabel as nib
import nrrd
import numpy as np
import pytest

from model_core.io import block_gzip
from model_core.io.block_gzip import BlockGzipWriter, crc32_combine, save_nifti_gz, save_nrrd_gz


def test_crc32_combine_equals_the_crc_of_the_joined_bytes():
    rng = np.random.default_rng(0)
    for first, second in ((1000, 777), (0, 5), (5, 0), (1, 1 << 20), (3 << 19, 12345)):
        a, b = rng.bytes(first), rng.bytes(second)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b), (first, second)


def _gzipped(pieces: list[bytes], **kwargs) -> bytes:
    out = io.BytesIO()
    writer = BlockGzipWriter(out, **kwargs)
    for piece in pieces:
        assert writer.write(piece) == len(piece)
    writer.close()
    return out.getvalue()


@pytest.mark.parametrize("block_size", [64, 4099, 1 << 19])
def test_blocks_of_zeros_and_data_make_one_gzip_member_every_reader_reads(block_size, tmp_path):
    """Python's gzip and the system's gzip (zlib's gzread, as ITK's) read it; the bytes come back exactly."""
    rng = np.random.default_rng(1)
    pieces = [b"", b"x", bytes(3 << 13), rng.bytes(5000), bytes(1 << 19) + rng.bytes(3) + bytes(100), bytes(7)]
    data = b"".join(pieces)
    blob = _gzipped(pieces, block_size=block_size)
    assert gzip.decompress(blob) == data
    assert zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob) == data  # one member: nothing left unread
    (tmp_path / "x.gz").write_bytes(blob)
    assert subprocess.run(["gzip", "-dc", str(tmp_path / "x.gz")], capture_output=True, check=True).stdout == data


def test_zeros_are_deflated_once_and_compress_as_well_as_one_stream():
    data = bytes(1 << 22)
    blob = _gzipped([data])
    assert gzip.decompress(blob) == data and len(blob) < 2 * len(gzip.compress(data, 1))


def test_the_plain_prefix_comes_before_the_gzip_member():
    blob = _gzipped([b"voxels"], plain_prefix=b"HEADER\n\n")
    assert blob.startswith(b"HEADER\n\n") and gzip.decompress(blob[len(b"HEADER\n\n") :]) == b"voxels"


def test_it_seeks_only_to_where_it_is_and_a_discarded_writer_writes_nothing():
    out = io.BytesIO()
    writer = BlockGzipWriter(out)
    writer.write(b"abc")
    assert writer.tell() == 3 and writer.seek(3) == 3 and writer.seek(0, io.SEEK_CUR) == 3
    with pytest.raises(io.UnsupportedOperation):
        writer.seek(0)
    writer.discard()
    assert out.getvalue() == b"" and writer.closed
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")


def _label(shape=(300, 280, 9), order="F") -> np.ndarray:
    label = np.zeros(shape, np.uint16, order=order)
    label[100:180, 50:90, 2:6] = 3
    label[0, 0, 8] = 1
    return label


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_a_nifti_holds_what_nibabel_writes(tmp_path, order, dtype):
    """Uncompressed, byte for byte: the header nibabel makes and the voxels; from memory when the array is laid
    out as the file stores it, through nibabel's own writer otherwise."""
    affine = np.diag([-0.8, 1.2, 2.5, 1.0])
    affine[:3, 3] = [50.0, -60.0, 10.0]

    def image():
        made = nib.Nifti1Image(_label(order=order).astype(dtype, order="K"), affine)
        made.set_qform(affine, code=1)
        made.set_sform(affine, code=1)
        return made

    nib.save(image(), tmp_path / "nibabel.nii.gz")
    with open(tmp_path / "blocks.nii.gz", "wb") as file:
        save_nifti_gz(image(), file)
    expected = gzip.decompress((tmp_path / "nibabel.nii.gz").read_bytes())
    assert gzip.decompress((tmp_path / "blocks.nii.gz").read_bytes()) == expected
    back = nib.load(tmp_path / "blocks.nii.gz")
    assert np.array_equal(np.asarray(back.dataobj), _label()) and np.allclose(back.affine, affine)


def test_an_nrrd_holds_what_pynrrd_writes(tmp_path):
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.8, 1.2, 2.5]),
        "space origin": np.array([1.0, 2.0, 3.0]),
        "kinds": ["domain"] * 3,
    }
    label = _label()
    nrrd.write(str(tmp_path / "pynrrd.nrrd"), label, {**header, "encoding": "gzip"}, index_order="F")
    with open(tmp_path / "blocks.nrrd", "wb") as file:
        save_nrrd_gz(file, label, header)
    ours, ours_header = nrrd.read(str(tmp_path / "blocks.nrrd"), index_order="F")
    theirs, theirs_header = nrrd.read(str(tmp_path / "pynrrd.nrrd"), index_order="F")
    assert np.array_equal(ours, theirs) and ours.dtype == theirs.dtype
    assert {k: str(v) for k, v in ours_header.items()} == {k: str(v) for k, v in theirs_header.items()}
    assert ours_header["encoding"] == "gzip"


def test_only_runs_of_data_are_deflated_each_time_and_background_once_per_length(monkeypatch):
    """Each run of non-zero grains is deflated once, the background not at all (it comes from the cache)."""
    deflated = []
    deflate = block_gzip._deflate
    monkeypatch.setattr(
        block_gzip, "_deflate", lambda block, level: deflated.append(len(block)) or deflate(block, level)
    )
    block_gzip._deflated_zeros.cache_clear()
    grain = block_gzip._GRAIN
    data = bytearray(8 * grain)
    data[3 * grain + 5] = 1  # one grain of data, in the fourth
    data[4 * grain] = 2  # and the fifth: one run
    blob = _gzipped([bytes(data)], block_size=8 * grain)
    assert gzip.decompress(blob) == bytes(data)
    # the run of data, and the background runs (3 grains before, 3 after) once: they have the same length
    assert sorted(deflated) == [2 * grain, 3 * grain]


def _gzips_back(data: bytes) -> bool:
    out = io.BytesIO()
    with BlockGzipWriter(out, block_size=4096) as writer:
        writer.write(data)
    return gzip.decompress(out.getvalue()) == data


def test_a_forked_process_writes_after_its_parent_has(run_forked):
    """A process forked after its parent gzipped in blocks makes a pool of its own."""
    data = np.random.default_rng(3).integers(0, 4, 1 << 18, dtype=np.uint8).tobytes()
    assert _gzips_back(data)  # the parent's threads are made, then idle
    assert run_forked(_gzips_back, data)
