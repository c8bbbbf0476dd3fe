"""InContextInferer: support encoded once, rebuilt only when the weights change; MONAI layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_core import build_icl_sam2
from model_core.workflows.inferers import InContextInferer, support_slice_choice

SIZE = 64


@pytest.mark.slow
def test_support_is_built_once_and_rebuilt_after_weights_change():
    torch.manual_seed(0)
    model = build_icl_sam2("tiny", image_size=SIZE)
    calls = []

    def builder():
        calls.append(1)
        masks = torch.zeros(2, 2, SIZE, SIZE, dtype=torch.bool)
        masks[:, 0, 5:20, 5:20] = True
        masks[:, 1, 30:50, 30:50] = True
        return model.build_support_memory(torch.rand(2, 3, SIZE, SIZE), masks, object_ids=[1, 2])

    inferer = InContextInferer(builder)
    volumes = torch.rand(2, 1, SIZE, SIZE, 5)
    out = inferer(volumes, model)
    assert out.shape == (2, 3, SIZE, SIZE, 5)  # background + 2 classes, channel first
    assert torch.allclose(out[:, 1:].max(1).values + out[:, 0], torch.ones(2, SIZE, SIZE, 5))
    inferer(volumes[:1], model)
    assert len(calls) == 1  # reused across volumes and calls
    with torch.no_grad():
        model.memory_encoder.pix_feat_proj.weight.add_(0.01)  # "training" changed the weights
    inferer(volumes[:1], model)
    assert len(calls) == 2
    assert len(inferer.last_confidence) == 1 and inferer.last_confidence[0].shape == (2,)
    with pytest.raises(ValueError, match=r"takes \(B, 1, H, W, D\) volumes"):
        inferer(torch.rand(1, SIZE, SIZE, 5), model)


def test_support_slice_choice_is_deterministic_and_covers_every_class():
    lab_a = np.zeros((10, 4, 4), np.int16)
    lab_a[2:6, 1, 1] = 1
    lab_b = np.zeros((8, 4, 4), np.int16)
    lab_b[5:8, 2, 2] = 2
    picks = support_slice_choice([lab_a, lab_b], [1, 2], per_class=2)
    assert picks == support_slice_choice([lab_a, lab_b], [1, 2], per_class=2)
    assert any(v == 0 and 2 <= z < 6 for v, z in picks) and any(v == 1 and 5 <= z < 8 for v, z in picks)
    assert len(picks) == 4
    with pytest.raises(ValueError, match="Class 3 is absent from the support set"):
        support_slice_choice([lab_a], [3], per_class=1)


def test_merge_labels_kits_style():
    from model_core.io.transforms import merge_labels

    label = torch.tensor([0, 1, 2, 3, 2])
    assert merge_labels(label, {1: [1, 2]}).tolist() == [0, 1, 1, 0, 1]  # kidney + tumour; cyst -> background
    assert merge_labels(label, None) is label
