"""What a user names as a volume on a command line: a file, a DICOM series folder, or a folder of them.

MONAI's ``LoadImage`` reads a NIfTI/NRRD/MetaImage file or a DICOM folder, but given a folder that
holds several series it silently reads one of them, and given a folder of NIfTI files or a single
DICOM slice it fails with a reader's traceback. :func:`find_volumes` decides what each path is
before anything is loaded, so a batch can report a bad path in one line and go on with the others.

Rules (one place):

- a file ending in a volume extension (:data:`~model_core.io.files.VOLUME_EXTENSIONS`) is one volume;
- a folder holding DICOM files of exactly one series is one volume (the series); of several series,
  it is refused, naming them (a reader would pick one at random);
- any other folder is a folder of volumes: its volume files and its subfolders that hold one DICOM
  series each, in name order (other files, such as a datalist or notes, are passed over);
- anything else (a single DICOM slice, a PNG, a missing path) is refused, saying what is accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pydicom

from model_core.io.files import split_extension, volume_stem

__all__ = ["VolumeSource", "dicom_series", "find_volumes", "is_dicom_file"]

ACCEPTED = "a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha, .mhd) file, or a folder of one DICOM series"


@dataclass
class VolumeSource:
    """One volume a user named.

    Attributes:
        path: the file, or the DICOM series folder.
        name: what its outputs are named after (the file name without its volume extension, or the folder's name).
        series_files: for a DICOM series, its files (the image series a DICOM SEG refers to); empty for a file.
        error: why it cannot be used (None: it can).
    """

    path: str
    name: str
    series_files: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def is_dicom(self) -> bool:
        return bool(self.series_files)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether a file is a DICOM part-10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series among the files directly in ``folder``: ``{SeriesInstanceUID: [files, sorted by name]}``.

    Only the headers are read. Files that are not DICOM are ignored here.
    """
    series: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or not is_dicom_file(entry.path):
            continue
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # a damaged header: the reader will say more when the series is loaded
            uid = "unreadable"
        series.setdefault(uid, []).append(entry.path)
    return series


def _describe(series: dict[str, list[str]]) -> str:
    parts = []
    for uid, files in series.items():
        try:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            what = (
                f"{ds.get('Modality', '?')} #{ds.get('SeriesNumber', '?')} {ds.get('SeriesDescription', '')!s}".strip()
            )
        except Exception:
            what = "unreadable"
        parts.append(f"{what} ({len(files)} files, {uid})")
    return "; ".join(parts)


def _folder_as_series(folder: str, name: str) -> VolumeSource | None:
    """The folder as one DICOM series, a refusal when it holds several, or None when it holds no DICOM file."""
    series = dicom_series(folder)
    if not series:
        return None
    if len(series) > 1:
        return VolumeSource(
            folder,
            name,
            error=f"{folder} holds {len(series)} DICOM series: {_describe(series)}. Give a folder of one series "
            "(move each other series, e.g. a SEG or another acquisition, into a folder of its own).",
        )
    return VolumeSource(folder, name, series_files=next(iter(series.values())))


def _one(path: str) -> list[VolumeSource]:
    name = volume_stem(path)
    if not os.path.exists(path):
        return [VolumeSource(path, name, error=f"{path} does not exist; give {ACCEPTED}, or a folder of them.")]
    if os.path.isfile(path):
        if split_extension(os.path.basename(path))[1]:
            return [VolumeSource(path, name)]
        hint = " (a single DICOM slice: give the folder of its series)" if is_dicom_file(path) else ""
        return [VolumeSource(path, name, error=f"{path} is not a volume file{hint}; give {ACCEPTED}.")]
    series = _folder_as_series(path, os.path.basename(os.path.normpath(path)))
    if series is not None:
        return [series]
    found: list[VolumeSource] = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file() and split_extension(entry.name)[1]:
            found.append(VolumeSource(entry.path, volume_stem(entry.name)))
        elif entry.is_dir():
            inner = _folder_as_series(entry.path, entry.name)
            if inner is not None:
                found.append(inner)
    if not found:
        return [
            VolumeSource(
                path, name, error=f"{path} holds no volume: give {ACCEPTED}, or a folder of such files and folders."
            )
        ]
    return found


def find_volumes(paths: Sequence[str | os.PathLike]) -> list[VolumeSource]:
    """Every volume the paths name, in order (a folder of volumes expands to its volumes).

    Paths that cannot be used come back with :attr:`VolumeSource.error` set, in their place, so a
    batch reports them and goes on with the others. A volume named twice is listed once.
    """
    out: list[VolumeSource] = []
    seen: set[str] = set()
    for path in paths:
        for source in _one(os.fspath(path)):
            key = str(Path(source.path).resolve())
            if key not in seen:
                seen.add(key)
                out.append(source)
    return out
