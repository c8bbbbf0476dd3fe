"""What a COCO export reads: the datalist and its options checked, and the volumes loaded as the bundle loads them.

Shared by :func:`~model_core.export.coco.export_coco` and :func:`~model_core.export.coco.verify_coco`, so
the check reads the volumes exactly as the export did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from model_core.io.datalist import labels_from_msd, load_datalist
from model_core.io.transforms import SelectChanneld, merge_labels, root_cause

__all__ = [
    "AXES",
    "ENCODINGS",
    "INSTANCES",
    "UNLISTED",
    "VolumeLoader",
    "apply_transform",
    "check_label_values",
    "choice",
    "parse_axis",
    "parse_labels",
    "parse_pair",
    "parse_splits",
    "read_categories",
    "read_datalist",
    "read_label_merge",
    "source_slice",
    "split_entries",
]

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
ENCODINGS = ("rle", "polygon")
UNLISTED = ("error", "background")
INSTANCES = ("region", "label")


def parse_axis(axis: Any) -> tuple[str, int]:
    names = {v: k for k, v in AXES.items()}
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and int(axis) in names:
        return names[int(axis)], int(axis)
    if isinstance(axis, str) and axis.strip().lower() in AXES:
        return axis.strip().lower(), AXES[axis.strip().lower()]
    raise ValueError(f"axis={axis!r} is unknown: pass one of {', '.join(AXES)} (or the RAS index 0, 1, 2)")


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ValueError(f"{name}={value!r} is unknown: pass one of {', '.join(choices)}")


def parse_splits(splits: Any) -> list[str]:
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    if not isinstance(splits, (list, tuple)) or not splits or not all(isinstance(s, str) for s in splits):
        raise ValueError(f"splits={splits!r}: pass datalist keys such as 'training' or 'training,validation'")
    return list(dict.fromkeys(splits))


def parse_pair(value: Any, name: str, example: str) -> tuple[float, float]:
    """Two numbers (fire passes ``--window 0,1`` as a tuple and ``--window [0,1]`` as a list)."""
    if isinstance(value, str):
        value = [v for v in value.strip("[]() ").split(",") if v.strip()]
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be two numbers, e.g. {example}") from None
    return lo, hi


def parse_labels(labels: Any, where: str) -> dict[str, int]:
    """``{"name": value}`` (or MSD's ``{"value": "name"}``, or a JSON string of either) to name -> value."""
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as e:
            raise ValueError(f"labels {labels!r} is not valid JSON ({e}): pass e.g. '{{\"kidney\": 1}}'") from None
    parsed = labels_from_msd(labels, where)
    for name, value in parsed.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{where}: labels[{name!r}] = {value!r}; a label value must be a positive integer")
    if len(set(parsed.values())) != len(parsed):
        raise ValueError(f"{where}: labels {parsed} give two names the same value; each category needs its own")
    return {str(k): int(v) for k, v in parsed.items()}


def read_datalist(datalist: str | os.PathLike) -> dict[str, Any]:
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise ValueError(
            f"datalist={str(datalist)!r} does not exist: pass the path of an MSD-style datalist JSON "
            f"(icl-sam2 datalist writes one)"
        )
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(content, dict):
        raise ValueError(f'datalist {str(path)!r} is not a JSON object with "training" etc. lists')
    return content


def read_categories(content: dict[str, Any], labels: Any, datalist: str) -> dict[str, int]:
    if labels is not None:
        return parse_labels(labels, "labels")
    if not content.get("labels"):
        raise ValueError(
            f'datalist {datalist!r} has no "labels" mapping (class name -> value): pass labels=\'{{"name": 1}}\''
        )
    return parse_labels(content["labels"], f'"labels" of datalist {datalist!r}')


def read_label_merge(content: dict[str, Any], datalist: str) -> dict[int, list[int]] | None:
    merge = content.get("label_merge")
    if not merge:
        return None
    try:
        return {int(k): [int(v) for v in vals] for k, vals in merge.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f'"label_merge" of datalist {datalist!r} is {merge!r}: expected {{"1": [1, 2]}}') from None


def split_entries(datalist: str, split: str) -> list[dict[str, Any]]:
    """The split's entries with absolute paths, checked (files exist, image and label on one grid)."""

    entries = load_datalist(str(datalist), key=split, check=True)
    for i, entry in enumerate(entries):
        if entry.get("label") is None:
            raise ValueError(
                f'Entry {i} of {split!r} in {datalist!r} ({entry["image"]}) has no "label" '
                f'(or "seg"): a COCO export needs every volume\'s label'
            )
    return entries


def apply_transform(transform, data: dict[str, Any], where: str, what: str):
    """Run a MONAI transform; a failure names the entry, the field and the reader's own message."""
    try:
        return transform(data)
    except Exception as e:
        cause = root_cause(e)
        raise ValueError(f'{where}: cannot load "{what}" {data[what]!r} ({type(cause).__name__}: {cause})') from e


def check_label_values(label: np.ndarray, where: str) -> np.ndarray:
    """The label as int64; a non-integer or non-finite value is an error naming the file."""
    if not np.issubdtype(label.dtype, np.integer):
        finite = np.isfinite(label)
        if not finite.all() or not np.array_equal(label, np.round(label)):
            bad = label[~finite] if not finite.all() else label[label != np.round(label)]
            raise ValueError(
                f'{where}: "label" has non-integer values (e.g. {bad.flat[0]!r}); a label volume must '
                f"hold integer class values"
            )
    return label.astype(np.int64)


class VolumeLoader:
    """MONAI's load, channel selection and RAS orientation: the bundle's preprocessing without resampling.

    Built once per export or check (MONAI looks its readers up when a loader is made).

    Args:
        label_merge: ``{new value: [source values]}`` applied to labels (datalist ``label_merge``), or None.
        intensity: the MONAI transform scaling ``image`` to [0, 1] (:func:`model_core.io.transforms.intensity_scaling`).
    """

    def __init__(self, label_merge: dict[int, list[int]] | None, intensity: Any = None):

        ras = {"axcodes": "RAS", "labels": (("L", "R"), ("P", "A"), ("I", "S"))}  # NIfTI's world axes, as the bundle
        self.label_merge, self.intensity = label_merge, intensity
        self.load_label = Compose(
            [
                LoadImaged("label", dtype=None, image_only=True),
                EnsureChannelFirstd("label"),
                Orientationd("label", **ras),
            ]
        )
        self.load_image = Compose(
            [
                LoadImaged("image", image_only=True),
                EnsureChannelFirstd("image"),
                SelectChanneld("image"),
                Orientationd("image", **ras),
            ]
        )

    def label(self, entry: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
        """``(label (I, J, K) int64 in RAS, the file's affine (4, 4))``, merged."""

        out = apply_transform(self.load_label, {"label": entry["label"]}, where, "label")["label"]
        if out.shape[0] != 1:
            raise ValueError(
                f'{where}: "label" {entry["label"]!r} has {out.shape[0]} channels; a label is one 3D volume'
            )
        label = check_label_values(np.asarray(out[0]), where)
        if self.label_merge:
            label = merge_labels(torch.from_numpy(label), self.label_merge).numpy()
        return label, np.asarray(out.meta.get("original_affine", out.affine), dtype=np.float64)

    def image(self, entry: dict[str, Any], where: str) -> np.ndarray:
        """``image (I, J, K) uint8`` in RAS: scaled to [0, 1] by ``intensity``, then ``round(255 * x)``."""

        data = {"image": entry["image"], **({"channel": entry["channel"]} if entry.get("channel") is not None else {})}
        image = apply_transform(self.load_image, data, where, "image")["image"]
        scaled = torch.as_tensor(self.intensity({"image": image})["image"])[0].float().clamp(0, 1)
        return np.round(scaled.numpy() * 255.0).astype(np.uint8)


def source_slice(original_affine: np.ndarray, axis: int) -> tuple[int, bool]:
    """Which axis of the file's voxel array RAS axis ``axis`` came from, and whether it was flipped.

    The same orientation arithmetic as MONAI's ``Orientation`` (nibabel's ``io_orientation`` to RAS).
    """

    ornt = nib.orientations.ornt_transform(nib.io_orientation(original_affine), nib.orientations.axcodes2ornt("RAS"))
    for source_axis, (target, flip) in enumerate(ornt):
        if int(target) == axis:
            return source_axis, bool(flip < 0)
    raise AssertionError("an orientation transform maps every axis")  # unreachable for a valid affine
