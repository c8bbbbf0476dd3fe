"""The masks of automatic proposals: a slice mask as the crop of its box (:class:`Region`), a generator mask on
one slice (:class:`SliceMask`), a 3D candidate linked from them (:class:`Candidate`) and a run's result
(:class:`Proposals`). The algorithm is :mod:`model_core.proposals`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["Candidate", "Proposals", "Region", "SliceMask"]


@dataclass
class Region:
    """A bool mask on an ``(H, W)`` slice, stored as the crop of its bounding box.

    A volume's generator masks are many (tens per slice, hundreds of slices); kept as
    crops they cost memory in proportion to the masks' boxes, not to the slices.

    Attributes:
        top, left: the crop's first row and column on the slice.
        crop: ``(h, w)`` bool.
        shape: ``(H, W)`` of the slice.
    """

    top: int
    left: int
    crop: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Region:
        """The region of an ``(H, W)`` bool mask."""
        mask = np.asarray(mask, dtype=bool)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        if rows.size == 0:
            return cls(0, 0, np.zeros((0, 0), bool), tuple(mask.shape))
        return cls(
            int(rows[0]), int(cols[0]), mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy(), tuple(mask.shape)
        )

    @property
    def bottom(self) -> int:
        return self.top + self.crop.shape[0]

    @property
    def right(self) -> int:
        return self.left + self.crop.shape[1]

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    def full(self) -> np.ndarray:
        """``(H, W)`` bool."""
        out = np.zeros(self.shape, bool)
        out[self.top : self.bottom, self.left : self.right] = self.crop
        return out

    def intersection(self, other: Region) -> int:
        r0, r1 = max(self.top, other.top), min(self.bottom, other.bottom)
        c0, c1 = max(self.left, other.left), min(self.right, other.right)
        if r0 >= r1 or c0 >= c1:
            return 0
        a = self.crop[r0 - self.top : r1 - self.top, c0 - self.left : c1 - self.left]
        b = other.crop[r0 - other.top : r1 - other.top, c0 - other.left : c1 - other.left]
        return int((a & b).sum())

    def union(self, other: Region) -> Region:
        if other.crop.size == 0:
            return Region(self.top, self.left, self.crop.copy(), self.shape)
        if self.crop.size == 0:
            return Region(other.top, other.left, other.crop.copy(), self.shape)
        top, left = min(self.top, other.top), min(self.left, other.left)
        crop = np.zeros((max(self.bottom, other.bottom) - top, max(self.right, other.right) - left), bool)
        for r in (self, other):
            crop[r.top - top : r.bottom - top, r.left - left : r.right - left] |= r.crop
        return Region(top, left, crop, self.shape)

    def window(self, full: np.ndarray) -> np.ndarray:
        """The part of an ``(H, W)`` array under this region's box."""
        return full[self.top : self.bottom, self.left : self.right]


@dataclass
class SliceMask:
    """One mask of sam2's generator on one slice.

    Attributes:
        slice: the slice index on the model grid.
        region: the mask (:class:`Region`, on the model grid).
        predicted_iou, stability_score: sam2's scores of the mask.
    """

    slice: int
    region: Region
    predicted_iou: float
    stability_score: float

    @classmethod
    def from_mask(cls, slice: int, mask: np.ndarray, predicted_iou: float, stability_score: float) -> SliceMask:
        """From an ``(H, W)`` bool mask."""
        return cls(int(slice), Region.from_mask(mask), float(predicted_iou), float(stability_score))

    @property
    def mask(self) -> np.ndarray:
        """``(H, W)`` bool (built on demand)."""
        return self.region.full()

    @property
    def area(self) -> int:
        return self.region.area


@dataclass
class Candidate:
    """A 3D candidate on the model grid: a group of linked slice masks.

    Attributes:
        members: ``[(slice, index in that slice's mask list)]`` of its generator masks.
        sources: those masks themselves.
        regions: ``{slice: Region}`` the union of its masks per slice (after overlap
            resolution: minus the voxels of better candidates).
        predicted_iou, stability_score: means over its masks; ``score`` is their product.
    """

    members: list[tuple[int, int]]
    sources: list[SliceMask]
    regions: dict[int, Region]
    predicted_iou: float
    stability_score: float

    @property
    def masks(self) -> dict[int, np.ndarray]:
        """``{slice: (H, W) bool}`` (built on demand)."""
        return {z: r.full() for z, r in self.regions.items()}

    @property
    def score(self) -> float:
        return self.predicted_iou * self.stability_score

    @property
    def voxels(self) -> int:
        return int(sum(r.area for r in self.regions.values()))

    @property
    def slices(self) -> list[int]:
        return sorted(z for z, r in self.regions.items() if r.area)

    def summary(self) -> dict[str, Any]:
        """The candidate on the model grid, as JSON-able numbers (``model_bbox`` is ``[[row0, col0, z0], [row1, col1,
        z1]]``).
        """
        rows = [np.nonzero(r.crop.any(1))[0] + r.top for r in self.regions.values() if r.area]
        cols = [np.nonzero(r.crop.any(0))[0] + r.left for r in self.regions.values() if r.area]
        slices = self.slices
        bbox = (
            [
                [int(min(r.min() for r in rows)), int(min(c.min() for c in cols)), slices[0]],
                [int(max(r.max() for r in rows)), int(max(c.max() for c in cols)), slices[-1]],
            ]
            if slices
            else None
        )
        return {
            "model_voxels": self.voxels,
            "model_slices": slices,
            "model_bbox": bbox,
            "masks": len(self.members),
            "predicted_iou": round(float(self.predicted_iou), 4),
            "stability_score": round(float(self.stability_score), 4),
            "score": round(float(self.score), 4),
        }


@dataclass
class Proposals:
    """Candidates of one volume in the image's original space.

    Attributes:
        label: ``(1, *original spatial shape)`` int16 ``MetaTensor`` (original affine): 0 background,
            candidate ``n`` has value ``n`` (1 = best score).
        candidates: one dict per candidate (see :func:`finalize_candidates`), in label order.
        info: counters (slices, generator masks, candidates before and after the filters, seconds).
        model_label: ``(S, S, D)`` int32 the label map on the model grid, before back-mapping and renumbering.
        model_candidates: the :class:`Candidate` of each value of ``model_label`` (value ``n`` = item ``n - 1``).
    """

    label: MetaTensor
    candidates: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    model_label: torch.Tensor | None = None
    model_candidates: list[Candidate] = field(default_factory=list)
