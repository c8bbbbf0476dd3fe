"""Prompts simulated on training query slices: clicks and boxes drawn from ground-truth masks.

As sam2's training samples points and boxes from the target mask, with configured
probabilities, so the network learns to take corrections as well as memories.
"""

from __future__ import annotations

import torch

from model_core.modeling.prompts import BOX_LABELS, PAD_LABEL

__all__ = ["PromptSampler"]


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
