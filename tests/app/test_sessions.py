"""Session archives in-process: every unsafe member is refused by name before anything is written; safe ones extract.

``lib.sessions.extract_archive`` is what ``PUT /session/?uncompress=true`` runs
(``tests/app/test_routes.py`` sends the same archives to the real server).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from lib.sessions import CheckedSessions, extract_archive
from model_core.io.validation import InputError


def tar(path: Path, members: list[tuple[str, bytes | None, bytes]], mode: str = "w") -> Path:
    """``members``: (name, data or None, tar type); links point at /etc/hostname."""
    with tarfile.open(path, mode) as archive:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "/etc/hostname"
            info.size = len(data) if data is not None else 0
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _refused(path: Path, folder: Path, **limits) -> InputError:
    with pytest.raises(InputError) as caught:
        extract_archive(str(path), str(folder), limits.get("max_files", 100), limits.get("max_bytes", 1 << 20))
    assert os.listdir(folder) == [], "something was extracted from a refused archive"
    return caught.value


@pytest.mark.parametrize(
    "name, kind, message",
    [
        ("../escaped.txt", tarfile.REGTYPE, "has a '..' in its name"),
        ("a/../../escaped.txt", tarfile.REGTYPE, "has a '..' in its name"),
        ("/tmp/escaped.txt", tarfile.REGTYPE, "has an absolute name"),
        ("link", tarfile.SYMTYPE, "is a symbolic link"),
        ("hard", tarfile.LNKTYPE, "is a hard link"),
        ("null", tarfile.CHRTYPE, "is a device file"),
        ("disk", tarfile.BLKTYPE, "is a device file"),
        ("pipe", tarfile.FIFOTYPE, "is a FIFO"),
    ],
)
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_unsafe_tar_members_are_refused_by_name(tmp_path, name, kind, message, mode):
    data = b"x" if kind == tarfile.REGTYPE else None
    archive = tar(tmp_path / "a.tar", [("ok.txt", b"fine", tarfile.REGTYPE), (name, data, kind)], mode)
    (tmp_path / "out").mkdir()
    error = _refused(archive, tmp_path / "out")
    assert error.status == 400 and repr(name) in str(error) and message in str(error), str(error)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/escaped.txt").exists()


def test_unsafe_zip_members_are_refused_by_name(tmp_path):
    (tmp_path / "out").mkdir()
    for name in ("../escaped.txt", "/abs.txt"):
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
            archive.writestr("ok.txt", "fine")
            archive.writestr(name, "x")
        error = _refused(tmp_path / "a.zip", tmp_path / "out")
        assert repr(name) in str(error), str(error)
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as archive:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16  # a symbolic link, as Info-ZIP stores one
        archive.writestr(info, "/etc/hostname")
    assert "is a symbolic link" in str(_refused(tmp_path / "link.zip", tmp_path / "out"))


def test_bounds_are_checked_before_extraction(tmp_path):
    (tmp_path / "out").mkdir()
    many = tar(tmp_path / "many.tar", [(f"f{i}", b"x", tarfile.REGTYPE) for i in range(6)])
    error = _refused(many, tmp_path / "out", max_files=5)
    assert error.status == 413 and "'f5'" in str(error) and "at most 5 members" in str(error)
    # a gzip bomb: 16 MiB of zeros in 16 KiB; refused from its header, before it is inflated
    big = tar(tmp_path / "big.tar.gz", [("zeros", bytes(16 << 20), tarfile.REGTYPE)], "w:gz")
    assert big.stat().st_size < 1 << 20
    error = _refused(big, tmp_path / "out", max_bytes=1 << 20)
    assert error.status == 413 and "'zeros'" in str(error) and "at most 1048576 bytes" in str(error)
    with zipfile.ZipFile(tmp_path / "big.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros", bytes(4 << 20))
    error = _refused(tmp_path / "big.zip", tmp_path / "out", max_bytes=1 << 20)
    assert error.status == 413 and "'zeros'" in str(error)


def test_a_file_that_is_no_archive_is_a_400(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "volume.nii.gz").write_bytes(b"not an archive")
    error = _refused(tmp_path / "volume.nii.gz", tmp_path / "out")
    assert error.status == 400 and "uncompress=true takes a tar" in str(error)


def test_a_safe_archive_becomes_a_session_with_one_volume(tmp_path):
    archive = tar(
        tmp_path / "ok.tgz",
        [
            ("series", None, tarfile.DIRTYPE),
            ("series/ct.nii.gz", b"volume", tarfile.REGTYPE),
            ("series/notes.txt", b"text", tarfile.REGTYPE),
        ],
        "w:gz",
    )
    sessions = CheckedSessions(str(tmp_path / "store"), 3600, max_files=10, max_bytes=1 << 20)
    session_id, info = sessions.add_session(str(archive), uncompress=True)
    volume = sessions.volume(info.image)
    assert Path(volume).read_bytes() == b"volume" and sessions.owns(volume)
    assert Path(volume).resolve().is_relative_to((tmp_path / "store" / session_id).resolve())
    assert not sessions.owns(str(archive))
