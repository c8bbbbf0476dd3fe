"""The network's input contract: volumes to slices, slices to three channels, labels to masks.

What every caller of the network (training episodes, the bundle's inferer, the app's
service, automatic proposals) hands it: ``(N, 3, H, W)`` float slices in [0, 1] at the
model's image size and ``(N, K, H, W)`` bool masks. Defined once here; the network checks
it (:meth:`~model_core.modeling.network.InContextSAM2.check_images`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CHANNEL_MODES", "as_slices", "class_masks", "slice_channels", "volume_to_slices"]


def as_slices(volume: torch.Tensor) -> torch.Tensor:
    """MONAI's channel-first ``(1, H, W, D)`` (RAS: axial slices last) to ``(D, H, W)``."""
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"Expected a single-channel volume (1, H, W, D), got {tuple(volume.shape)}.")
    return torch.as_tensor(volume)[0].permute(2, 0, 1).contiguous()


CHANNEL_MODES = ("replicate", "2.5d")


def slice_channels(volume: Any, indices: Sequence[int], image_size: int, mode: str = "replicate") -> torch.Tensor:
    """Model input for some slices of a ``(D, H, W)`` volume in [0, 1]: ``(n, 3, image_size, image_size)``.

    Only the requested slices are read, so ``volume`` may be a memory-mapped array.

    Args:
        volume: ``(D, H, W)`` array or tensor.
        indices: slice indices.
        image_size: model input size (slices are resized when they differ).
        mode: ``replicate`` (the slice in all three channels, as SAM2 sees a grey image)
            or ``2.5d`` (slices z-1, z, z+1 as the channels, repeated at the volume's ends).
    """
    if mode not in CHANNEL_MODES:
        raise ValueError(f"channel mode must be one of {CHANNEL_MODES}, got {mode!r}.")
    idx = np.asarray(list(indices), dtype=np.int64)
    depth = volume.shape[0]
    if mode == "replicate":
        v = torch.as_tensor(np.asarray(volume[idx]), dtype=torch.float32)[:, None].expand(-1, 3, -1, -1)
    else:
        neighbours = np.stack([idx - 1, idx, idx + 1], axis=1).clip(0, depth - 1)  # (n, 3)
        flat = np.asarray(volume[neighbours.reshape(-1)])
        v = torch.as_tensor(flat, dtype=torch.float32).view(len(idx), 3, *flat.shape[-2:])
    if tuple(v.shape[-2:]) != (image_size, image_size):
        v = F.interpolate(v, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return v.contiguous()


def volume_to_slices(volume: np.ndarray | torch.Tensor, image_size: int, mode: str = "replicate") -> torch.Tensor:
    """``(D, H, W)`` intensities in [0, 1] to model input ``(D, 3, image_size, image_size)`` (see
    :func:`slice_channels`).
    """
    return slice_channels(volume, range(volume.shape[0]), image_size, mode)


def class_masks(label: np.ndarray | torch.Tensor, classes: Sequence[int], image_size: int) -> torch.Tensor:
    """``(D, H, W)`` label map to ``(D, K, image_size, image_size)`` bool, one channel per class (nearest resize)."""
    lab = torch.as_tensor(np.asarray(label))
    m = torch.stack([lab == c for c in classes], dim=1).float()
    if tuple(m.shape[-2:]) != (image_size, image_size):
        m = F.interpolate(m, size=(image_size, image_size), mode="nearest")
    return m > 0.5
