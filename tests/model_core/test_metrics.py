"""HD95 and NSD through MONAI's Ignite handlers come out in mm, from each case's own affine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric

from model_core.workflows.metrics import MetricInMillimetres, voxel_spacing


def _case(spacing: tuple[float, float, float], shift_axis: int) -> tuple[MetaTensor, MetaTensor]:
    """A cube and the same cube moved by one voxel along ``shift_axis``, one-hot (2, 16, 16, 16)."""
    truth = torch.zeros(16, 16, 16)
    truth[4:12, 4:12, 4:12] = 1
    pred = torch.roll(truth, 1, dims=shift_axis)
    affine = np.diag([*spacing, 1.0])
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]])  # rotated axes, same lengths
    one_hot = lambda m: MetaTensor(torch.stack([1 - m, m]), affine=torch.as_tensor(affine))  # noqa: E731
    return one_hot(pred), one_hot(truth)


def _run_handler(metric, cases) -> torch.Tensor:
    engine = Engine(lambda e, batch: batch)
    handler = IgniteMetricHandler(metric_fn=MetricInMillimetres(metric), output_transform=lambda out: out)
    handler.attach(engine, "m")
    engine.run([([p], [t]) for p, t in cases], max_epochs=1)
    return torch.as_tensor(metric.get_buffer()).flatten()


def test_voxel_spacing_reads_the_affine_columns():
    pred, _ = _case((0.5, 2.0, 3.0), 0)
    assert voxel_spacing(pred) == pytest.approx((2.0, 0.5, 3.0))  # axes are permuted by the rotation
    with pytest.raises(ValueError, match="affine"):
        voxel_spacing(torch.zeros(1, 4, 4, 4))


def test_hd95_is_in_mm_per_case():
    # the affine swaps the first two axes: array axis 0 has 2 mm voxels, axis 1 has 1 mm
    cases = [_case((1.0, 2.0, 1.0), 0), _case((1.0, 2.0, 1.0), 1), _case((1.0, 1.0, 3.0), 2)]
    hd95 = _run_handler(HausdorffDistanceMetric(include_background=False, percentile=95), cases)
    assert hd95.tolist() == pytest.approx([2.0, 1.0, 3.0])


def test_nsd_tolerance_is_in_mm():
    cases = [_case((1.0, 2.0, 1.0), 0), _case((1.0, 2.0, 1.0), 1)]
    nsd = _run_handler(SurfaceDiceMetric(class_thresholds=[1.5], include_background=False), cases)
    assert nsd[0] < 0.95  # a 2 mm shift exceeds the 1.5 mm tolerance on the moved faces
    assert nsd[1] == pytest.approx(1.0)  # a 1 mm shift is within it
