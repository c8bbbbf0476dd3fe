"""Atomic file writing: the one place that does "write beside it, then rename over it".

Readers of a checkpoint, a label, a datalist or a cache entry must see the old file or
the new one, never half of one, and an interrupted write must never look complete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["VOLUME_EXTENSIONS", "atomic_path", "split_extension", "volume_stem"]

#: File endings of the volume formats the project reads (longest first: ``.nii.gz`` before ``.nii``).
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def split_extension(name: str, extensions: tuple[str, ...] = VOLUME_EXTENSIONS) -> tuple[str, str]:
    """``("case1", ".nii.gz")`` for ``"case1.nii.gz"`` (case-insensitive); ``(name, "")`` for another ending."""
    for ext in extensions:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def volume_stem(path: str | os.PathLike) -> str:
    """The file or folder name of a volume without its volume extension (``/a/case1.nii.gz`` -> ``case1``)."""
    return split_extension(os.path.basename(os.fspath(path).rstrip("/")))[0]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The caller writes the temporary file by any means (``torch.save``, ``np.save``,
    ``nibabel.save``, ``shutil.copy``, ``open``). On an exception the temporary file is
    removed and ``path`` is left as it was.

    Args:
        path: the final file; its folder is created if missing.
        suffix: ending of the temporary name, for writers that pick a format by it
            (``".nii.gz"`` for nibabel, ``".npy"`` for ``np.save``).

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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
