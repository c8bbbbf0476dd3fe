"""Atomic file writing: the one place that does "write beside it, then rename over it".

Readers of a checkpoint, a label, a datalist or a cache entry must see the old file or
the new one, never half of one, and an interrupted write must never look complete.
Where a write is acknowledged to someone (a label saved for a user, the datastore's
index), ``durable=True`` also makes it survive a power loss: the data is on disk before
the rename, and the rename is on disk before the caller returns.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

#: File endings of the volume formats the project reads (longest first: ``.nii.gz`` before ``.nii``).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def split_extension(name: str, extensions: tuple[str, ...] = VOLUME_EXTENSIONS) -> tuple[str, str]:
    """``("case1", ".nii.gz")`` for ``"case1.nii.gz"`` (case-insensitive); ``(name, "")`` for another ending."""
    for ext in extensions:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return name, ""


def volume_stem(path: str | os.PathLike) -> str:
    """The file or folder name of a volume without its volume extension (``/a/case1.nii.gz`` -> ``case1``)."""
    return split_extension(os.path.basename(os.fspath(path).rstrip("/")))[0]


__all__ = [
    "VOLUME_EXTENSIONS",
    "atomic_path",
    "fsync_folder",
    "private_folder",
    "remove_stale_private_folders",
    "remove_stale_temporaries",
    "split_extension",
    "volume_stem",
]

#: ``.<name>.<pid>.<12 hex>.tmp<suffix>``: the temporary names :func:`atomic_path` makes
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp(?P<suffix>.*)")
#: ``<prefix><pid>-<mkdtemp's random part>``: the folders :func:`private_folder` makes
_PRIVATE_FOLDER = r"(?P<pid>\d+)-[A-Za-z0-9_]+"


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (a rename, a new file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; their renames are as durable as they get
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    """Flush ``path``'s data to disk (Linux and macOS flush a file's data through any descriptor of it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The caller writes the temporary file by any means (``torch.save``, ``np.save``,
    ``nibabel.save``, ``shutil.copy``, ``open``) and closes it. On an exception the temporary
    file is removed and ``path`` is left as it was. A process killed while writing leaves
    the temporary file behind (:func:`remove_stale_temporaries` clears those), never a
    half-written ``path``.

    Args:
        path: the final file; its folder is created if missing.
        suffix: ending of the temporary name, for writers that pick a format by it
            (``".nii.gz"`` for nibabel, ``".npy"`` for ``np.save``).
        durable: fsync the file before the rename and the folder after it, so that once
            the block has exited, ``path`` holds the new content even after a power loss
            (a rename alone may reach the disk before the data it names).

    Example:
        >>> with atomic_path("model.pt") as tmp:  # doctest: +SKIP
        ...     torch.save(state, tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a unique name, not mkstemp: the writer creates the file, so it gets the usual permissions
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` when its process was killed.

    Only files whose writing process no longer runs are removed, so a writer in another
    live process (a training run beside the server) keeps its file.

    Returns:
        the names removed.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match and not _process_alive(int(match["pid"])):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


@contextmanager
def private_folder(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[str]:
    """A new folder only this user can read (``tempfile.mkdtemp``), removed with its content afterwards.

    Its name carries this process's id (``<prefix><pid>-<random>``), so that a folder left by a
    process killed before its ``finally`` ran (SIGKILL, a power loss) is recognised and removed
    later by :func:`remove_stale_private_folders`.

    Args:
        prefix: the start of the folder's name, e.g. ``"icl-sam2-upload-"``.
        parent: where it is made (default: the system's temporary folder).
    """
    folder = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_private_folders(prefix: str, parent: str | os.PathLike | None = None) -> list[str]:
    """Remove the folders :func:`private_folder` made with ``prefix`` whose process no longer runs.

    Only this user's folders are touched, and a link is never followed.

    Returns:
        the names removed.
    """
    parent = os.fspath(parent) if parent is not None else tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + _PRIVATE_FOLDER)
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if (
            match
            and entry.is_dir(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_uid == os.getuid()  # ours: not another user's look-alike
            and not _process_alive(int(match["pid"]))
        ):
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.exists(entry.path):
                removed.append(entry.name)
    return removed
