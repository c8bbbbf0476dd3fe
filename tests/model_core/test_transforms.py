"""ChannelArgmaxd: MONAI's AsDiscreted with an argmax over channels that does not stall, the same answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted

from model_core.io.transforms import ChannelArgmaxd, channel_argmax

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_channel_argmax_equals_torch_with_ties_and_nan(channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 3, (channels, 7, 6, 5), generator=g).float()  # few values: many ties
    x[:, 0, 0, 0] = 1.0  # a tie across every channel
    if channels > 1:
        x[1, 1, 1, 1] = float("nan")
        x[channels - 1, 1, 1, 1] = float("nan")  # two NaN: the first wins, as in torch
        x[channels - 1, 2, 2, 2] = float("nan")
    expected = torch.argmax(x, dim=0, keepdim=True)
    got = channel_argmax(x)
    assert got.dtype == torch.long and got.shape == (1, 7, 6, 5)
    assert torch.equal(got, expected)
    # a non-contiguous input (channels last in memory) gives the same
    assert torch.equal(channel_argmax(x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)), expected)


def test_channel_argmaxd_equals_monai_asdiscreted_and_keeps_meta():
    g = torch.Generator().manual_seed(0)
    affine = torch.diag(torch.tensor([0.8, 1.2, 2.5, 1.0], dtype=torch.float64))
    pred = MetaTensor(torch.rand(4, 9, 8, 5, generator=g), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    label = MetaTensor(torch.randint(0, 4, (1, 9, 8, 5), generator=g).float(), affine=affine)
    settings = {"keys": ["pred", "label"], "argmax": [True, False], "to_onehot": [4, 4]}  # train.json's use
    ours = ChannelArgmaxd(**settings)({"pred": pred, "label": label})
    monai = AsDiscreted(**settings)({"pred": pred, "label": label})
    for key in ("pred", "label"):
        assert torch.equal(ours[key].as_tensor(), monai[key].as_tensor())
        assert torch.equal(ours[key].affine, monai[key].affine)
    assert ours["pred"].meta["filename_or_obj"] == "case.nii.gz"
    single = ChannelArgmaxd(keys="pred", argmax=True)({"pred": pred})["pred"]  # inference.json's use
    assert isinstance(single, MetaTensor) and torch.equal(single.as_tensor(), pred.as_tensor().argmax(0, keepdim=True))
    numpy_in = ChannelArgmaxd(keys="pred", argmax=True)({"pred": pred.as_tensor().numpy()})["pred"]
    assert np.array_equal(np.asarray(numpy_in), pred.as_tensor().argmax(0, keepdim=True).numpy())


def test_the_bundle_discretizes_with_it():
    """The bundle's inference and validation postprocessing (and so the app and ``icl-sam2 segment``) use it."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "argmax" in node:
                found.append(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in ("inference.json", "train.json"):
        walk(json.loads((ROOT / "bundle" / "configs" / name).read_text()))
    assert found and set(found) == {"model_core.io.transforms.ChannelArgmaxd"}, found
