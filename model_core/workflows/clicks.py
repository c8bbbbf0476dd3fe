"""Simulated corrective clicks and the scores of the CVPR 2025 interactive 3D segmentation protocol.

The challenge "Foundation models for interactive 3D biomedical image segmentation" scores a tool by
an initial prompt followed by corrective clicks, each placed where the error is largest:

- :func:`next_click`: the error is split into missed voxels (reference, not predicted) and false
  voxels (predicted, not reference); the largest connected region of either (in 3D, by volume) gets
  the click, at its voxel farthest from the region's border (Euclidean distance in mm, the image's
  edge counting as border). A missed region gets a foreground click, a false one a background click.
- :func:`curve_auc`: area under DSC (or NSD) against interaction number (initial prompt = 0, then
  one per click), trapezoids of width 1, so 5 clicks give at most 5.
- :func:`clicks_to_reach`: the first interaction whose DSC reaches a target (0 = the initial prompt).

Why here: MONAI has the distance transform (``monai.transforms.utils.distance_transform_edt``, used
below) and its DeepGrow click transforms (``AddGuidanceFromPointsd``, ``SpatialCropGuidanced``) draw
random clicks inside a label for training; neither places the challenge's click on a prediction's
error, and scipy has the connected components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.transforms.utils import distance_transform_edt
from scipy import ndimage

__all__ = ["Click", "centre_click", "clicks_to_reach", "curve_auc", "middle_slice_box", "next_click"]


@dataclass(frozen=True)
class Click:
    """One simulated click on a ``(D, H, W)`` volume.

    Attributes:
        z, y, x: voxel indices (slice, row, column).
        positive: True for a foreground click (in a missed region), False for background (in a false one).
        region_voxels: size of the error region it corrects.
        depth_mm: its distance from the region's border (mm).
    """

    z: int
    y: int
    x: int
    positive: bool
    region_voxels: int
    depth_mm: float


def _deepest(region: np.ndarray, spacing: Sequence[float]) -> tuple[tuple[int, int, int], float]:
    """The voxel of ``region`` (bool ``(D, H, W)``) farthest from its border, the volume's edge included."""
    padded = np.pad(region, 1)  # the image's edge is a border: a click is never placed on the last voxel
    distance = distance_transform_edt(torch.from_numpy(padded[None].astype(np.float32)), sampling=list(spacing))
    distance = np.asarray(distance)[0][1:-1, 1:-1, 1:-1]
    deepest = distance.max()
    # ties (a slab's whole mid-plane is equally deep): the deepest voxel nearest their centre, not the first found
    ties = np.argwhere(distance >= deepest - 1e-6)
    scale = np.asarray(spacing, dtype=np.float64)
    index = ties[int(np.argmin((((ties - ties.mean(0)) * scale) ** 2).sum(1)))]
    return tuple(int(i) for i in index), float(deepest)


def next_click(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> Click | None:
    """The challenge's next corrective click: in the largest error region, at its point farthest from its border.

    Args:
        prediction, reference: ``(D, H, W)`` bool masks on one grid.
        spacing: voxel size in mm along ``(D, H, W)``.

    Returns:
        The :class:`Click`, or None when the prediction equals the reference (nothing to correct).

    Raises:
        ValueError: the masks differ in shape or are not 3D.
    """
    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise ValueError(
            f"prediction {prediction.shape} and reference {reference.shape} must be (D, H, W) masks on one grid."
        )
    best: tuple[int, bool, np.ndarray] | None = None
    for positive, error in ((True, reference & ~prediction), (False, prediction & ~reference)):
        if not error.any():
            continue
        components, _ = ndimage.label(error)  # 6-connected in 3D
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (int(sizes[largest - 1]), positive, components == largest)
    if best is None:
        return None
    size, positive, region = best
    (z, y, x), depth = _deepest(region, spacing)
    return Click(z, y, x, positive, size, depth)


def centre_click(reference: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Click:
    """The initial click "at the structure's centre": its voxel farthest from its border (inside it even
    when the structure is not convex), as the challenge's first click.

    Raises:
        ValueError: the reference is empty.
    """
    reference = np.asarray(reference, bool)
    if not reference.any():
        raise ValueError("The structure is absent from the reference: no centre to click.")
    components, _ = ndimage.label(reference)
    largest = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    (z, y, x), depth = _deepest(largest, spacing)
    return Click(z, y, x, True, int(largest.sum()), depth)


def middle_slice_box(reference: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    """The initial box: the challenge's middle slice of the structure's 3D bounding box
    (``int(z_min + (z_max - z_min) / 2)``) and the bounding box ``(x0, y0, x1, y1)`` (inclusive voxels) of the
    structure on that slice.

    Raises:
        ValueError: the reference is empty.
    """
    reference = np.asarray(reference, bool)
    zs = np.nonzero(reference.reshape(reference.shape[0], -1).any(1))[0]
    if zs.size == 0:
        raise ValueError("The structure is absent from the reference: no box to draw.")
    z = int(zs.min() + (zs.max() - zs.min()) / 2)
    if not reference[z].any():  # a structure in pieces along z: the nearest slice that has it
        z = int(zs[np.argmin(np.abs(zs - z))])
    ys, xs = np.nonzero(reference[z])
    return z, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def curve_auc(values: Sequence[float]) -> float | None:
    """Area under a score against interaction number (trapezoids of width 1); None for fewer than two points."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if v.size < 2:
        return None
    return float(((v[1:] + v[:-1]) / 2).sum())


def clicks_to_reach(dsc: Sequence[float], target: float = 0.9) -> int | None:
    """Interactions needed to reach ``target`` DSC (0: the initial prompt did); None when never reached."""
    for i, value in enumerate(dsc):
        if value is not None and value >= target:
            return i
    return None
