"""Prompts on single slices: clicks, boxes and masks, and prompt sampling for training.

Coordinates are pixels of the model's input grid (``image_size`` x ``image_size``),
``(x, y)`` = (column, row), the convention of SAM2's predictors. Callers that work
in another grid (the original slice, a Slicer RAS point) convert at their boundary.

SAM2's prompt encoder already defines the encoding (labels 1/0 for positive and
negative clicks, 2/3 for a box's corners, -1 for padding); what sam2 lacks is a
typed, validated prompt for one object on one slice and the random prompts of
MedSAM-style training (jittered boxes), so they live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SlicePrompt", "PromptSampler", "BOX_LABELS", "PAD_LABEL"]

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

    def validate(self, image_size: int) -> "SlicePrompt":
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


class PromptSampler:
    """Random prompts on query slices during training.

    Per query slice one kind is drawn for the whole batch (so all tracks share a
    prompt structure and stay batched): none, one click, or a box. A click is a
    random foreground pixel of the ground truth; a box is the ground truth's
    bounding box with each side moved outward or inward by up to ``box_jitter``
    pixels (MedSAM uses 0-20 px). Objects absent from the slice get padding.

    Args:
        click_probability: chance that a query slice gets one positive click.
        box_probability: chance that a query slice gets a box.
        box_jitter: maximum shift in pixels of each box side.
        generator: optional torch generator for reproducibility.
    """

    def __init__(
        self,
        click_probability: float = 0.0,
        box_probability: float = 0.0,
        box_jitter: int = 20,
        generator: torch.Generator | None = None,
    ):
        if click_probability < 0 or box_probability < 0 or click_probability + box_probability > 1:
            raise ValueError("click_probability and box_probability must be >= 0 and sum to at most 1.")
        self.click_probability = click_probability
        self.box_probability = box_probability
        self.box_jitter = int(box_jitter)
        self.generator = generator

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def __call__(self, masks: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Sample prompts for one query slice.

        Args:
            masks: ``(N, H, W)`` bool ground truth of the N tracks on this slice.

        Returns:
            None (no prompt) or SAM2 ``point_inputs``: ``point_coords (N, P, 2)``
            float and ``point_labels (N, P)`` int32.
        """
        u = float(self._rand(1))
        if u < self.click_probability:
            return self._clicks(masks)
        if u < self.click_probability + self.box_probability:
            return self._boxes(masks)
        return None

    def _clicks(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        n = masks.shape[0]
        coords = torch.zeros(n, 1, 2)
        labels = torch.full((n, 1), PAD_LABEL, dtype=torch.int32)
        for i in range(n):
            ys, xs = masks[i].nonzero(as_tuple=True)
            if len(ys):
                j = int(self._rand(1) * len(ys))
                coords[i, 0] = torch.tensor([xs[j], ys[j]], dtype=torch.float32)
                labels[i, 0] = 1
        return {"point_coords": coords.to(masks.device), "point_labels": labels.to(masks.device)}

    def _boxes(self, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        n, h, w = masks.shape
        coords = torch.zeros(n, 2, 2)
        labels = torch.full((n, 2), PAD_LABEL, dtype=torch.int32)
        for i in range(n):
            ys, xs = masks[i].nonzero(as_tuple=True)
            if len(ys):
                box = torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)
                shift = (self._rand(4) * 2 - 1) * self.box_jitter
                box = box + shift
                box[0::2] = box[0::2].clamp(0, w - 1)
                box[1::2] = box[1::2].clamp(0, h - 1)
                corners = box.reshape(2, 2)  # jitter may swap the sides of a small object
                coords[i] = torch.stack([corners.min(0).values, corners.max(0).values])
                labels[i] = torch.tensor(BOX_LABELS, dtype=torch.int32)
        return {"point_coords": coords.to(masks.device), "point_labels": labels.to(masks.device)}
