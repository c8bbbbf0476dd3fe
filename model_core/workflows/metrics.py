"""Surface metrics in millimetres for MONAI's Ignite metric handlers.

MONAI's ``HausdorffDistanceMetric`` and ``SurfaceDiceMetric`` take the voxel
spacing as a call argument, but ``IgniteMetricHandler`` calls a metric with
``(y_pred, y)`` only, so through the handlers distances come out in voxels. The
spacing is in the label's affine (a ``MetaTensor`` after inversion to the
original grid); :class:`MetricInMillimetres` reads it there and passes it on.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric

__all__ = ["MetricInMillimetres", "voxel_spacing"]


def voxel_spacing(image: torch.Tensor) -> tuple[float, ...]:
    """Voxel size in mm along each spatial axis of a channel-first ``MetaTensor`` ``(C, *spatial)``.

    Raises:
        ValueError: ``image`` carries no affine.
    """
    if not isinstance(image, MetaTensor):
        raise ValueError("Distances in mm need the image's affine; pass MetaTensors (MONAI's LoadImaged keeps it).")
    affine = np.asarray(image.affine, dtype=np.float64)
    ndim = image.ndim - 1
    return tuple(float(v) for v in np.sqrt((affine[:ndim, :ndim] ** 2).sum(0)))


class MetricInMillimetres:
    """Wrap a spacing-aware MONAI metric so each case is measured with its own voxel size.

    Used as ``IgniteMetricHandler(metric_fn=MetricInMillimetres(SurfaceDiceMetric(...)))``;
    everything else (``reset``, ``aggregate``, ``get_buffer``) is the wrapped metric's.

    Args:
        metric: e.g. ``HausdorffDistanceMetric(percentile=95)`` or
            ``SurfaceDiceMetric(class_thresholds=[2.0])`` (tolerances then in mm).
    """

    def __init__(self, metric: CumulativeIterationMetric):
        self.metric = metric

    def __call__(self, y_pred: Sequence[torch.Tensor] | torch.Tensor, y: Sequence[torch.Tensor] | torch.Tensor) -> None:
        """Args:
        y_pred, y: one-hot ``(B, C, *spatial)`` batches or lists of ``(C, *spatial)``; the
            spacing is read from ``y`` (the reference on its original grid).
        """
        for pred, truth in zip(y_pred, y):
            self.metric(pred[None], truth[None], spacing=voxel_spacing(truth))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)
