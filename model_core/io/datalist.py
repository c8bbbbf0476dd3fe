"""Datalists in Medical Segmentation Decathlon form: read (checked), write (atomically), normalise an entry.

:func:`load_datalist` reads one (``"seg"`` accepted for ``"label"``, paths made absolute) and
checks every case before a run starts (:func:`check_case`: files readable, image and label on
one grid); :func:`write_datalist` writes one atomically; :func:`normalise_entry` is the one place
that turns an entry's ``"seg"`` key into ``"label"``. Building a datalist from a dataset folder
is :mod:`model_core.io.datasets`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from model_core.io.files import atomic_path
from model_core.io.validation import read_header

__all__ = ["IMAGE_EXTENSIONS", "check_case", "labels_from_msd", "load_datalist", "normalise_entry", "write_datalist"]

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


# ----------------------------------------------------------------------------- helpers


def normalise_entry(entry: str | dict[str, Any], where: str = "datalist entry") -> dict[str, Any]:
    """One datalist entry in normal form: a dict with ``"image"``, and ``"label"`` for ``"seg"``.

    A bare string is an image path; ``"seg"`` (as in the Medical-SAM2 fork's datalists) is renamed
    ``"label"``. Other keys are kept; the entry passed in is not changed.

    Args:
        entry: a datalist entry, ``"img.nii.gz"`` or ``{"image": ..., "label" or "seg": ..., ...}``.
        where: how to name the entry in an error, e.g. ``"entry 3 of 'training' in datalist.json"``.

    Returns:
        A new dict with ``"image"`` and, if the entry had ``"label"`` or ``"seg"``, ``"label"``.

    Raises:
        ValueError: the entry is not a string or a dict, has no ``"image"``, or has both ``"label"``
            and ``"seg"`` and they differ.
    """
    if isinstance(entry, (str, os.PathLike)):
        return {"image": entry}
    if not isinstance(entry, dict):
        raise ValueError(f'{where} is {entry!r}: expected an image path or {{"image": ..., "label": ...}}')
    out = dict(entry)
    if "seg" in out:
        seg = out.pop("seg")
        if "label" in out and out["label"] != seg:
            raise ValueError(f'{where} has both "label" and "seg" and they differ; keep one')
        out["label"] = seg
    if "image" not in out:
        raise ValueError(f'{where} has no "image" key ({entry!r})')
    return out


def labels_from_msd(raw: Any, where: str) -> dict[str, int]:
    """MSD ``{"0": "background", "1": "liver"}`` (or nnU-Net v2 ``{"background": 0, "liver": 1}``) to name -> value."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f'{where} has no usable "labels" mapping (got {raw!r}); pass --labels \'{{"name": 1}}\'')
    if all(str(k).lstrip("-").isdigit() for k in raw):
        pairs = [(str(name), int(value)) for value, name in raw.items()]
    else:
        pairs = [(str(name), value) for name, value in raw.items() if isinstance(value, int)]
    labels = {name: value for name, value in sorted(pairs, key=lambda p: p[1]) if value != 0}
    if not labels:
        raise ValueError(f"{where} lists no foreground labels ({raw!r}); pass --labels '{{\"name\": 1}}'")
    return labels


# ----------------------------------------------------------------------------- presets


# ----------------------------------------------------------------------------- splitting and output


def write_datalist(datalist: dict, output: str | os.PathLike) -> Path:
    """Write ``datalist`` as indented JSON, atomically (:func:`model_core.io.files.atomic_path`).

    Returns:
        The path written (absolute).
    """
    output = Path(output).expanduser().resolve()
    with atomic_path(output) as tmp:
        with open(tmp, "w") as f:
            json.dump(datalist, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return output


def load_datalist(
    path: str, key: str = "training", base_dir: str | None = None, check: bool = True
) -> list[dict[str, Any]]:
    """Read an MSD-style datalist; ``seg`` is accepted for ``label`` and paths are made absolute.

    With ``check`` (default), every case is checked by :func:`check_case` before
    anything runs, so a bad file stops a run at start-up rather than hours into it.

    Raises:
        ValueError: missing or unreadable file, missing key, empty list, entries without
            image, and the case problems of :func:`check_case`.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Datalist {path!r} does not exist; write one with icl-sam2 datalist.")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Datalist {path!r} is not valid JSON: {e}") from e
    if key not in content:
        raise ValueError(f"Datalist {path!r} has no {key!r} list (it has {sorted(content)}).")
    entries = content[key]
    if not entries:
        raise ValueError(f"The {key!r} list of datalist {path!r} is empty.")
    base = base_dir or os.path.dirname(os.path.abspath(path))
    out = []
    for i, item in enumerate(entries):
        item = normalise_entry(item, f"Entry {i} of {key!r} in {path!r}")
        for k in ("image", "label"):
            if isinstance(item.get(k), str) and not os.path.isabs(item[k]):
                item[k] = os.path.normpath(os.path.join(base, item[k]))
        if check:
            check_case(item, where=f"Entry {i} of {key!r} in {path!r}")
        out.append(item)
    return out


def check_case(item: dict[str, Any], where: str = "Case", affine_tolerance: float = 1e-3) -> None:
    """Check that a case's files exist and can be read, and that image and label share a grid.

    Reads headers only for NIfTI; other formats are loaded once. The label must have
    the image's spatial shape (a 4D image's channels aside) and the same affine
    (within ``affine_tolerance`` mm), since labels are never resampled to the image.

    Raises:
        ValueError: naming the case and the problem.
    """
    image_shape, image_affine = read_header(str(item["image"]), f"{where}, image")
    if item.get("label") is None:
        return
    label_shape, label_affine = read_header(str(item["label"]), f"{where}, label")
    if image_shape != label_shape:
        raise ValueError(
            f"{where}: image {item['image']!r} has shape {image_shape} but its label "
            f"{item['label']!r} has {label_shape}; they must be on the same grid."
        )
    if not np.allclose(image_affine, label_affine, atol=affine_tolerance):
        raise ValueError(
            f"{where}: image {item['image']!r} and label {item['label']!r} have different affines "
            f"(orientation, spacing or origin):\n{np.round(image_affine, 4)}\nvs\n{np.round(label_affine, 4)}; "
            "resample the label onto the image grid."
        )
