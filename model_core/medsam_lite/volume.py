"""LiteMedSAM on volume files: box prompts in voxel indices, MedSAM's intensity rule, labels on the file's own grid.

:mod:`model_core.medsam_lite.model` segments arrays (a slice, or a ``(D, H, W)`` stack) from
boxes in pixels. What the MONAI Label app, the bundle and the real-MRI script share on
top of it lives here, so that the three do the same thing:

- **Grid.** LiteMedSAM works on each slice's own pixel grid, so nothing is resampled:
  a volume stored as ``(I, J, K)`` is cut into its ``K`` slices along the third voxel
  axis, each slice shown to the model as ``(H, W) = (J, I)`` (rows = ``j``, columns =
  ``i``; :func:`volume_slices`). A box drawn on slice ``k`` as voxel indices
  ``i0..i1, j0..j1`` is the pixel box ``(x0, y0, x1, y1) = (i0, j0, i1, j1)``, and the
  label comes back on the same ``(I, J, K)`` grid with the image's affine, whatever
  the file's orientation or spacing.
- **Intensities** (MedSAM's preprocessing, :func:`normalize_intensity`): MRI is clipped to
  the 0.5 and 99.5 percentiles of its non-zero voxels (the zero background of a
  skull-stripped or padded scan would otherwise set the lower bound), CT to a HU window;
  :meth:`LiteMedSAM.prepare` then scales each slice to [0, 1]. MONAI's
  ``ScaleIntensityRangePercentiles`` counts every voxel, hence numpy here.
- **Prompts** (:class:`BoxPrompt`): a 2D box on one slice, with an optional inclusive slice
  range; Slicer's ROI ``[i0, i1, j0, j1, k0, k1]`` is the box on the middle slice of
  ``k0..k1``, propagated through those slices (:meth:`BoxPrompt.from_roi`). Coordinates
  are inclusive voxel indices, as a mask's bounding box (MedSAM's own box convention).
  Without a slice range the box is propagated until LiteMedSAM's predicted IoU drops below
  :data:`~model_core.medsam_lite.model.STOP_IOU` (the structure has ended).
- **Files of boxes** (:func:`read_box_file`) and boxes from a reference label
  (:func:`boxes_from_label`, the challenge's rule: each structure's 3D bounding box).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from model_core.io.validation import InputError
from model_core.medsam_lite.model import STOP_IOU, LiteMedSAM, SliceEmbedding, check_slice_step

__all__ = [
    "BOX_FILE_COLUMNS",
    "CT_WINDOW",
    "MRI_PERCENTILES",
    "BoxPrompt",
    "Structure",
    "boxes_from_label",
    "normalize_intensity",
    "read_box_file",
    "segment_structures",
    "volume_slices",
]

#: MedSAM's MRI rule: clip to these percentiles of the non-zero voxels
MRI_PERCENTILES = (0.5, 99.5)
#: MedSAM's default CT window (soft tissue, level 40, width 400), HU
CT_WINDOW = (-160.0, 240.0)
#: columns of a CSV box file (one row per structure and image)
BOX_FILE_COLUMNS = ("image", "name", "value", "i0", "i1", "j0", "j1", "k0", "k1")


@dataclass(frozen=True)
class BoxPrompt:
    """A box on one slice of a volume, in inclusive voxel indices of its ``(I, J, K)`` grid.

    Attributes:
        box: ``(i0, j0, i1, j1)`` with ``i0 < i1`` and ``j0 < j1``.
        slice: ``k`` of the slice the box is drawn on.
        slice_range: ``(k0, k1)`` inclusive, the slices to segment (``k0 <= slice <= k1``);
            None: propagate until the structure ends (see the module's docstring).
    """

    box: tuple[float, float, float, float]
    slice: int
    slice_range: tuple[int, int] | None = None

    @classmethod
    def from_roi(cls, roi: Sequence[float]) -> BoxPrompt:
        """Slicer's ROI ``[i0, i1, j0, j1, k0, k1]``: the box on the middle slice, propagated through ``k0..k1``."""
        values = [float(v) for v in roi]
        if len(values) != 6:
            raise InputError(f"roi must be 6 numbers [i0, i1, j0, j1, k0, k1], got {len(values)}.", status=422)
        i0, i1, j0, j1, k0, k1 = values
        lo, hi = int(round(k0)), int(round(k1))
        return cls((i0, j0, i1, j1), int(lo + (hi - lo) // 2), (lo, hi))

    def check(self, shape: Sequence[int], field: str = "box") -> BoxPrompt:
        """This prompt if it lies in a volume of ``shape`` ``(I, J, K)``, else an :class:`InputError` (422) naming
        ``field``.
        """
        I, J, K = (int(s) for s in shape[:3])
        i0, j0, i1, j1 = self.box
        if not all(np.isfinite(self.box)):
            raise InputError(f"{field} {list(self.box)} has NaN or infinite coordinates.", status=422)
        if i1 < i0 or j1 < j0:
            raise InputError(
                f"{field} [i0, j0, i1, j1] = {list(self.box)} is reversed: give i0 < i1 and j0 < j1.", status=422
            )
        if i1 == i0 or j1 == j0:
            raise InputError(
                f"{field} [i0, j0, i1, j1] = {list(self.box)} has zero size in-plane: draw a box around "
                "the structure (i0 < i1 and j0 < j1).",
                status=422,
            )
        if i0 < 0 or j0 < 0 or i1 > I - 1 or j1 > J - 1:
            raise InputError(
                f"{field} [i0, j0, i1, j1] = {list(self.box)} lies outside the image's {I} x {J} voxels "
                f"in-plane: i in [0, {I - 1}], j in [0, {J - 1}].",
                status=422,
            )
        if not 0 <= self.slice < K:
            raise InputError(
                f"{field}: slice {self.slice} lies outside the image's {K} slices (k in [0, {K - 1}]).", status=422
            )
        if self.slice_range is not None:
            k0, k1 = self.slice_range
            if k1 < k0:
                raise InputError(f"{field}: slice range [{k0}, {k1}] is reversed; give k0 <= k1.", status=422)
            if k0 < 0 or k1 > K - 1:
                raise InputError(
                    f"{field}: slice range [{k0}, {k1}] lies outside the image's {K} slices (k in [0, {K - 1}]).",
                    status=422,
                )
            if not k0 <= self.slice <= k1:
                raise InputError(f"{field}: slice {self.slice} lies outside its slice range [{k0}, {k1}].", status=422)
        return self


@dataclass(frozen=True)
class Structure:
    """One structure to segment: its name, its value in the label map, its prompt."""

    name: str
    value: int
    prompt: BoxPrompt


# ------------------------------------------------------------------------------------------- intensities
def normalize_intensity(
    volume: np.ndarray,
    modality: str = "MRI",
    window: Sequence[float] = CT_WINDOW,
    percentiles: Sequence[float] = MRI_PERCENTILES,
) -> np.ndarray:
    """MedSAM's intensity rule before per-slice [0, 1] scaling: ``float32`` of ``volume``'s shape.

    Args:
        volume: any real intensities.
        modality: ``"MRI"`` (clip to ``percentiles`` of the non-zero voxels) or ``"CT"`` (clip to ``window`` HU).
    """
    array = np.asarray(volume, dtype=np.float32)
    if modality == "CT":
        low, high = (float(v) for v in window)
    elif modality in ("MRI", "MR"):
        foreground = array[array > 0]
        if foreground.size == 0:
            return array
        low, high = (float(v) for v in np.percentile(foreground, [float(p) for p in percentiles]))
    else:
        raise InputError(f"modality must be 'MRI' or 'CT', got {modality!r}.")
    if not high > low:
        raise InputError(f"The intensity range [{low}, {high}] of modality {modality!r} is empty (window/percentiles).")
    return np.clip(array, low, high)


def volume_slices(volume: np.ndarray) -> np.ndarray:
    """``(I, J, K)`` -> ``(K, J, I)`` view: the slices along ``k``, each ``(H, W) = (J, I)`` (x = ``i``, y = ``j``)."""
    if np.ndim(volume) != 3:
        raise InputError(f"The image has shape {tuple(np.shape(volume))}; a 3D volume (I, J, K) is needed.")
    return np.asarray(volume).transpose(2, 1, 0)


# ------------------------------------------------------------------------------------------- segmentation
def segment_structures(
    model: LiteMedSAM,
    volume: np.ndarray,
    structures: Sequence[Structure],
    modality: str = "MRI",
    window: Sequence[float] = CT_WINDOW,
    percentiles: Sequence[float] = MRI_PERCENTILES,
    min_iou: float = STOP_IOU,
    dtype: Any = np.uint16,
    slice_step: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Segment each structure from its box; one label map on the volume's own grid.

    Each slice is encoded once for all structures. Where two masks overlap, the structure
    listed later keeps the voxel.

    Args:
        model: the LiteMedSAM to run.
        volume: ``(I, J, K)`` intensities as stored in the file.
        structures: their prompts are checked against the volume first (nothing runs on a bad one).
        modality, window, percentiles: see :func:`normalize_intensity`.
        min_iou: the stopping rule of a prompt without a slice range.
        slice_step: propagation's step where masks agree, the slices between filled by interpolation
            (1: every slice; see :meth:`LiteMedSAM.segment_volume`).

    Returns:
        ``(label (I, J, K) of dtype, info)``; info has per structure the slices segmented and those
        filled, why propagation stopped, the mean predicted IoU, and ``encoded_slices`` / ``seconds`` in all.

    Raises:
        InputError: a prompt outside the volume (naming the structure).
    """
    slice_step = check_slice_step(slice_step)
    slices = volume_slices(volume)
    for s in structures:
        s.prompt.check(np.shape(volume), f"structure {s.name!r}")
    start, encoded = time.perf_counter(), model.encoded_slices
    stack = volume_slices(normalize_intensity(volume, modality, window, percentiles))
    label = np.zeros(slices.shape, dtype=dtype)  # (K, J, I)
    embeddings: dict[int, SliceEmbedding] = {}
    per_structure = {}
    for s in structures:
        p = s.prompt
        if p.slice_range is not None and p.slice_range[0] == p.slice_range[1]:
            if p.slice not in embeddings:
                embeddings[p.slice] = model.embed(stack[p.slice])
            result = model.segment_slice(embeddings[p.slice], p.box)
            mask = np.zeros(slices.shape, dtype=bool)
            mask[p.slice] = result.mask
            done = {"slices": [p.slice], "filled": [], "stopped": {}, "iou": round(result.iou, 4)}
        else:
            seg = model.segment_volume(
                stack,
                p.box,
                z=p.slice,
                z_range=p.slice_range,
                embeddings=embeddings,
                min_iou=None if p.slice_range is not None else min_iou,
                slice_step=slice_step,
            )
            mask = seg.mask
            done = {
                "slices": sorted(set(seg.slices)),
                "filled": sorted(seg.filled),
                "stopped": seg.stopped,
                "iou": round(float(np.nanmean(seg.iou)), 4),
            }
        label[mask] = s.value
        per_structure[s.name] = {**done, "voxels": int(mask.sum())}
    info = {
        "structures": per_structure,
        "encoded_slices": model.encoded_slices - encoded,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return label.transpose(2, 1, 0), info


# ------------------------------------------------------------------------------------------- box sources
def boxes_from_label(label: np.ndarray, names: dict[str, int]) -> list[Structure]:
    """One prompt per structure from a reference label (the challenge's rule): its 3D bounding box as an ROI.

    Args:
        label: ``(I, J, K)`` label map.
        names: ``{name: label value}``; values absent from ``label`` are left out.
    """
    out = []
    for name, value in names.items():
        where = np.nonzero(np.asarray(label) == value)
        if where[0].size == 0:
            continue
        (i0, j0, k0), (i1, j1, k1) = [int(w.min()) for w in where], [int(w.max()) for w in where]
        if i1 == i0 or j1 == j0:  # one voxel wide: widen it to a box LiteMedSAM accepts
            i1, j1 = max(i1, i0 + 1), max(j1, j0 + 1)
        out.append(Structure(name, int(value), BoxPrompt.from_roi([i0, i1, j0, j1, k0, k1])))
    return out


def _structure(entry: Any, where: str) -> Structure:
    if not isinstance(entry, dict):
        raise InputError(f"{where} must be an object with name, value and roi, got {entry!r}.")
    missing = [k for k in ("name", "value", "roi") if k not in entry]
    if missing:
        raise InputError(f"{where} lacks {missing}: each structure needs name, value and roi [i0, i1, j0, j1, k0, k1].")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**15:
        raise InputError(f"{where}.value must be a label value from 1 to 32767, got {value!r}.")
    roi = entry["roi"]
    if (
        not isinstance(roi, list)
        or len(roi) != 6
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in roi)
    ):
        raise InputError(f"{where}.roi must be 6 numbers [i0, i1, j0, j1, k0, k1], got {roi!r}.")
    return Structure(str(entry["name"]), value, BoxPrompt.from_roi(roi))


def read_box_file(path: str | os.PathLike) -> dict[str, list[Structure]]:
    """Boxes per image and structure from a JSON or CSV file.

    JSON: ``{"<image>": [{"name": "liver", "value": 1, "roi": [i0, i1, j0, j1, k0, k1]}, ...], ...}``.
    CSV: a header with :data:`BOX_FILE_COLUMNS` (``image,name,value,i0,i1,j0,j1,k0,k1``), one row per
    structure. ``<image>`` is the image's file name (``case.nii.gz``) or its path as given to the bundle;
    ``roi`` is inclusive voxel indices of the image file (``k0 == k1``: that slice only).

    Returns:
        ``{image: [Structure, ...]}``.

    Raises:
        InputError: a missing file, unknown extension, or a bad entry (naming the file, row and key).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"boxes_file {str(path)!r} does not exist.")
    out: dict[str, list[Structure]] = {}
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"boxes_file {path.name}: not valid JSON ({e}).") from e
        if not isinstance(content, dict):
            raise InputError(
                f"boxes_file {path.name}: must be an object {{image: [structures]}}, got {type(content).__name__}."
            )
        for image, entries in content.items():
            if not isinstance(entries, list):
                raise InputError(f"boxes_file {path.name}: [{image!r}] must be a list of structures.")
            out[image] = [_structure(e, f"boxes_file {path.name}: [{image!r}][{n}]") for n, e in enumerate(entries)]
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in BOX_FILE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(
                    f"boxes_file {path.name}: the header lacks {missing}; columns: {','.join(BOX_FILE_COLUMNS)}."
                )
            for n, row in enumerate(reader, start=2):
                where = f"boxes_file {path.name}: row {n}"
                try:
                    roi = [float(row[c]) for c in BOX_FILE_COLUMNS[3:]]
                    value = int(row["value"])
                except (TypeError, ValueError) as e:
                    raise InputError(f"{where}: value must be an integer and i0..k1 numbers ({e}).") from e
                out.setdefault(row["image"], []).append(
                    _structure({"name": row["name"], "value": value, "roi": roi}, where)
                )
    else:
        raise InputError(f"boxes_file {path.name}: a .json or .csv file is needed.")
    return out
