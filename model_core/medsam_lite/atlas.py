"""LiteMedSAM against an atlas on the same grid: one tight box per region, Dice per region, in 2D and 3D.

What ``scripts/medsam_lite_real_mri.py`` measures on the Colin27 T1 with its AAL atlas; any
image with a label map on its grid works. Boxes come from the atlas, as the MedSAM and CVPR
2024 challenge evaluations make them:

- **2D**: on each chosen slice, every region with at least ``min_voxels`` voxels there gets the
  bounding box of its voxels on that slice (all of its pieces); Dice of LiteMedSAM's mask
  against the region on that slice.
- **3D**: every region gets its 3D bounding box ``(x_min, y_min, z_min, x_max, y_max, z_max)``
  (the challenge's box): its in-plane extent prompts the middle slice of ``z_min..z_max``, and
  :meth:`LiteMedSAM.segment_volume` propagates outward through those slices, each slice
  prompted by the previous mask's box. Dice over the volume.

Slices and boxes follow :mod:`model_core.medsam_lite.volume` (slices along ``k``, x = ``i``,
y = ``j``, MedSAM's intensity rule); each slice is encoded once for all regions.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from model_core.io.validation import InputError
from model_core.medsam_lite.model import LiteMedSAM, SliceEmbedding, box_from_mask, dice
from model_core.medsam_lite.volume import normalize_intensity, volume_slices

__all__ = ["dice", "evaluate_slices", "evaluate_volume", "evenly_spaced_slices", "slice_box_masks", "summary"]


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "mean", "median"}`` of Dice values (None when there are none)."""
    v = np.asarray(list(values), dtype=np.float64)
    return {
        "n": int(v.size),
        "mean": float(v.mean()) if v.size else None,
        "median": float(np.median(v)) if v.size else None,
    }


def evenly_spaced_slices(atlas: np.ndarray, count: int) -> list[int]:
    """``count`` slices ``k`` evenly spaced strictly inside the atlas's extent along ``k`` (not its first or last)."""
    if count < 1:
        raise InputError(f"num_slices must be at least 1, got {count}.")
    ks = np.nonzero(np.asarray(atlas).reshape(-1, np.shape(atlas)[2]).any(axis=0))[0]
    if ks.size == 0:
        raise InputError("The atlas is empty: no slice has a region.")
    return sorted({int(round(k)) for k in np.linspace(ks.min(), ks.max(), count + 2)[1:-1]})


def _region_values(atlas: np.ndarray, names: dict[str, int], regions: Sequence[str] | None) -> dict[str, int]:
    if regions is None:
        return dict(names)
    unknown = [r for r in regions if r not in names]
    if unknown:
        raise InputError(f"regions {unknown} are not in the atlas; it has e.g. {sorted(names)[:8]}...")
    return {r: names[r] for r in regions}


def evaluate_slices(
    model: LiteMedSAM,
    image: np.ndarray,
    atlas: np.ndarray,
    names: dict[str, int],
    slices: Sequence[int],
    regions: Sequence[str] | None = None,
    min_voxels: int = 100,
    modality: str = "MRI",
) -> dict[str, Any]:
    """2D: one tight box per region on each slice ``k`` of ``slices``; Dice per region, mean and median per slice.

    Args:
        image, atlas: ``(I, J, K)`` on the same grid.
        names: ``{region name: atlas value}``.
        regions: the names to evaluate (default all).
        min_voxels: a region is boxed on a slice only with at least this many voxels there.

    Returns:
        ``{"slices": {k: {"regions": {name: dice}, "n", "mean", "median"}}, "overall": {...}, "seconds"}``.
    """
    if np.shape(image) != np.shape(atlas):
        raise InputError(f"image {np.shape(image)} and atlas {np.shape(atlas)} must be on the same grid.")
    values = _region_values(atlas, names, regions)
    stack, labels = volume_slices(normalize_intensity(image, modality)), volume_slices(atlas)
    start, out, everything = time.perf_counter(), {}, []
    for k in slices:
        if not 0 <= int(k) < stack.shape[0]:
            raise InputError(f"slice {k} lies outside the volume's {stack.shape[0]} slices.")
        embedding: SliceEmbedding | None = None
        scores = {}
        for name, value in values.items():
            reference = labels[k] == value
            box = box_from_mask(reference)
            if reference.sum() < min_voxels or box is None or box[0] == box[2] or box[1] == box[3]:
                continue
            embedding = embedding or model.embed(stack[k])
            scores[name] = dice(model.segment_slice(embedding, box).mask, reference)
        everything += list(scores.values())
        out[int(k)] = {"regions": scores, **summary(scores.values())}
    return {"slices": out, "overall": summary(everything), "seconds": round(time.perf_counter() - start, 2)}


def evaluate_volume(
    model: LiteMedSAM,
    image: np.ndarray,
    atlas: np.ndarray,
    names: dict[str, int],
    regions: Sequence[str] | None = None,
    min_voxels: int = 1000,
    modality: str = "MRI",
    slice_step: int = 1,
) -> dict[str, Any]:
    """3D: each region from its 3D bounding box, propagated from the middle slice; Dice per region, mean and median.

    Args:
        min_voxels: regions with fewer voxels in the volume are left out.
        slice_step: propagation's step where masks agree (see :meth:`LiteMedSAM.segment_volume`).

    Returns:
        ``{"regions": {name: {"dice", "slices", "reference_slices"}}, "overall": {...}, "encoded_slices", "seconds"}``.
    """
    if np.shape(image) != np.shape(atlas):
        raise InputError(f"image {np.shape(image)} and atlas {np.shape(atlas)} must be on the same grid.")
    values = _region_values(atlas, names, regions)
    stack, labels = volume_slices(normalize_intensity(image, modality)), volume_slices(atlas)  # (K, J, I)
    start, encoded = time.perf_counter(), model.encoded_slices
    embeddings: dict[int, SliceEmbedding] = {}
    out = {}
    for name, value in values.items():
        reference = labels == value
        if reference.sum() < min_voxels:
            continue
        z, y, x = np.nonzero(reference)
        if x.min() == x.max() or y.min() == y.max():
            continue
        box = (int(x.min()), int(y.min()), int(z.min()), int(x.max()), int(y.max()), int(z.max()))
        seg = model.segment_volume(stack, box, embeddings=embeddings, slice_step=slice_step)
        out[name] = {
            "dice": dice(seg.mask, reference),
            "slices": len(seg.slices),
            "reference_slices": int(z.max() - z.min() + 1),
        }
    return {
        "regions": out,
        "overall": summary(r["dice"] for r in out.values()),
        "encoded_slices": model.encoded_slices - encoded,
        "seconds": round(time.perf_counter() - start, 2),
    }


def slice_box_masks(model: LiteMedSAM, volume: np.ndarray, reference: np.ndarray, min_voxels: int = 1) -> np.ndarray:
    """LiteMedSAM given the structure's tight box on every slice that has it (the 2D baseline, an oracle prompt
    per slice); slices without the structure stay empty.

    Args:
        volume: ``(D, H, W)`` intensities (each slice scaled by :meth:`LiteMedSAM.prepare`).
        reference: ``(D, H, W)`` bool, the structure.
        min_voxels: slices where the structure has fewer voxels get no box.

    Returns:
        ``(D, H, W)`` bool.
    """
    reference = np.asarray(reference, bool)
    out = np.zeros(reference.shape, bool)
    for z in range(reference.shape[0]):
        box = box_from_mask(reference[z])
        if reference[z].sum() < min_voxels or box is None or box[0] == box[2] or box[1] == box[3]:
            continue
        out[z] = model.segment_slice(np.asarray(volume[z]), box).mask
    return out
