"""model_core.io.files: atomic replacement, durable when asked, private folders, and the cleanup of what a kill left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from model_core.io.files import atomic_path, private_folder, remove_stale_private_folders, remove_stale_temporaries


def test_a_durable_write_reaches_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """fsync of the new file before it is renamed, fsync of its folder after: a power loss then leaves the
    old file or the new one, and once the block has exited, the new one."""
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        synced.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        synced.append(("rename", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "index.json"
    with atomic_path(target, durable=True) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert synced == [("file", target.stat().st_ino), ("rename", None), ("folder", tmp_path.stat().st_ino)]
    synced.clear()
    with atomic_path(target) as tmp, open(tmp, "w") as f:  # not durable: no fsync (caches, checkpoints)
        f.write("{}")
    assert synced == [("rename", None)]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "label.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_path(target, durable=True) as tmp:
            open(tmp, "wb").write(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["label.nii.gz"]


def _dead_pid() -> str:
    """The id of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_only_temporaries_of_processes_that_are_gone_are_removed(tmp_path):
    pid = _dead_pid()
    names = {
        f".case0.nii.gz.{pid}.0123456789ab.tmp": False,  # its writer was killed
        f".cache.npy.{pid}.0123456789ab.tmp.npy": False,  # with the suffix a writer asked for
        f".case1.nii.gz.{os.getpid()}.0123456789ab.tmp": True,  # a writer still running
        "case2.nii.gz": True,
        ".hidden": True,
        f".x.{pid}.short.tmp": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(n for n, kept in names.items() if not kept)
    assert {n: (tmp_path / n).exists() for n in names} == names


def test_a_private_folder_names_its_process_and_is_removed_even_on_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with private_folder("up-", tmp_path) as folder:
            assert os.path.basename(folder).startswith(f"up-{os.getpid()}-")
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700  # mkdtemp's: this user only
            open(os.path.join(folder, "upload.nii.gz"), "wb").write(b"half")
            raise RuntimeError("the client went away")
    assert os.listdir(tmp_path) == []


def test_only_private_folders_of_processes_that_are_gone_are_removed(tmp_path):
    pid = _dead_pid()
    kept = {
        f"up-{os.getpid()}-abc_12": True,  # a server still receiving
        f"other-{pid}-abc_12": True,  # another prefix
        f"up-{pid}x-abc_12": True,  # not a pid
        "up-0womjzom": True,  # the old names, without a pid: whose they are is unknown
    }
    gone = [f"up-{pid}-abc_12", f"up-{pid}-Zz9_"]
    for name in [*kept, *gone]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "upload.nii.gz").write_bytes(b"half")
    (tmp_path / f"up-{pid}-file").write_text("a file, not a folder")
    (tmp_path / f"up-{pid}-link").symlink_to(tmp_path / gone[0])  # a link to a stale folder: not followed
    others = []
    if os.getuid() == 0:  # a look-alike of another user's (root can give it away; CI runs as root)
        others.append(f"up-{pid}-nobody")
        (tmp_path / others[0]).mkdir()
        os.chown(tmp_path / others[0], 65534, 65534)
    removed = remove_stale_private_folders("up-", tmp_path)
    assert sorted(removed) == sorted(gone)
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, f"up-{pid}-file", f"up-{pid}-link", *others])
