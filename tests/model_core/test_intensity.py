"""Intensity scaling to [0, 1]: a HU window for CT, per-volume percentiles for MRI."""

from __future__ import annotations

import pytest
import torch

from model_core.io.transforms import intensity_scaling


def test_ct_window_clips_and_scales():
    image = torch.tensor([[-1000.0, -200.0, 50.0, 300.0, 2000.0]])
    out = intensity_scaling("CT", window=(-200, 300))({"image": image})["image"]
    assert torch.allclose(torch.as_tensor(out), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_mri_percentiles_scale_each_volume_by_its_own_range():
    image = torch.arange(1001, dtype=torch.float32)[None] * 7.0 + 100.0  # arbitrary MRI units
    out = torch.as_tensor(intensity_scaling("MRI", percentiles=(1, 99))({"image": image})["image"])
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 500] == pytest.approx(0.5, abs=1e-3)  # the median maps to the middle
    assert (out[0, :10] == 0).all() and (out[0, -10:] == 1).all()  # the tails are clipped


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modality": "PET"}, "modality must be 'CT' or 'MRI'"),
        ({"modality": "CT", "window": (300, -200)}, "max > min"),
        ({"modality": "MR", "percentiles": (99, 1)}, "lower < upper"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        intensity_scaling(**kwargs)
