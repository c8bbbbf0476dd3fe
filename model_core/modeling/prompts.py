"""Prompts on single slices: clicks, boxes and masks (training samples them: :mod:`model_core.training.prompts`).

Coordinates are pixels of the model's input grid (``image_size`` x ``image_size``),
``(x, y)`` = (column, row), the convention of SAM2's predictors. Callers that work
in another grid (the original slice, a Slicer RAS point) convert at their boundary.

SAM2's prompt encoder already defines the encoding (labels 1/0 for positive and
negative clicks, 2/3 for a box's corners, -1 for padding); what sam2 lacks is a
typed, validated prompt for one object on one slice, so it lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BOX_LABELS", "PAD_LABEL", "SlicePrompt"]

#: Labels SAM2 uses for the top-left and bottom-right corners of a box.
BOX_LABELS = (2, 3)
#: Label SAM2's prompt encoder treats as "not a point" (padding).
PAD_LABEL = -1


@dataclass
class SlicePrompt:
    """User input for one object on one slice.

    Attributes:
        points: ``(P, 2)`` float (x, y) click positions, or None.
        labels: ``(P,)`` int, 1 = positive (object), 0 = negative (background).
        box: ``(4,)`` float ``(x0, y0, x1, y1)`` with ``x0 < x1`` and ``y0 < y1``, or None.
        mask: ``(H, W)`` bool mask on the model grid, or None. A mask cannot be
            combined with points or a box (as in SAM2's predictors).
    """

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    box: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    _validated_size: int | None = field(default=None, repr=False)

    def validate(self, image_size: int) -> SlicePrompt:
        """Check shapes and ranges against a square grid; returns a normalised copy.

        Raises:
            ValueError: what is wrong with the prompt and how to fix it.
        """
        points, labels, box, mask = self.points, self.labels, self.box, self.mask
        if points is None and box is None and mask is None:
            raise ValueError("A prompt needs at least one of: points with labels, a box, or a mask.")
        if mask is not None and (points is not None or box is not None):
            raise ValueError("A mask prompt cannot be combined with points or a box on the same slice.")
        if (points is None) != (labels is None):
            raise ValueError("Points and labels must be given together (one label per point).")
        if points is not None:
            points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
            labels = torch.as_tensor(labels, dtype=torch.int32).reshape(-1)
            if points.shape[0] != labels.shape[0]:
                raise ValueError(f"Got {points.shape[0]} points but {labels.shape[0]} labels.")
            if not torch.isin(labels, torch.tensor([0, 1], dtype=torch.int32)).all():
                raise ValueError(f"Point labels must be 1 (foreground) or 0 (background), got {labels.tolist()}.")
            _check_inside(points, image_size, "Point")
        if box is not None:
            box = torch.as_tensor(box, dtype=torch.float32).reshape(-1)
            if box.numel() != 4:
                raise ValueError(f"A box is (x0, y0, x1, y1); got {box.numel()} numbers.")
            if not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"Box {box.tolist()} has zero or negative size; need x0 < x1 and y0 < y1.")
            _check_inside(box.reshape(2, 2), image_size, "Box corner")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.shape != (image_size, image_size):
                raise ValueError(
                    f"A mask prompt must be {image_size}x{image_size} (the model grid), got {tuple(mask.shape)}."
                )
            mask = mask.bool()
        return SlicePrompt(points, labels, box, mask, _validated_size=image_size)

    def point_inputs(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
        """SAM2's ``point_inputs`` dict (batch 1): a box becomes two points labelled 2 and 3."""
        if self.mask is not None:
            return None
        coords, labels = [], []
        if self.box is not None:
            coords.append(self.box.reshape(2, 2))
            labels.append(torch.tensor(BOX_LABELS, dtype=torch.int32))
        if self.points is not None:
            coords.append(self.points)
            labels.append(self.labels)
        return {
            "point_coords": torch.cat(coords)[None].to(device),
            "point_labels": torch.cat(labels)[None].to(device),
        }


def _check_inside(xy: torch.Tensor, image_size: int, what: str) -> None:
    bad = (xy < 0) | (xy > image_size - 1)
    if bad.any():
        i = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(
            f"{what} {xy[i].tolist()} lies outside the {image_size}x{image_size} image; "
            f"coordinates are (x, y) pixels in [0, {image_size - 1}]."
        )
