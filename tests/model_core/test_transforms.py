"""ChannelArgmaxd: MONAI's AsDiscreted with an argmax over channels that does not stall, the same answers;
postprocess_slices: the bundle's postprocessing on the slices where an object can win, the same labels."""

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


class _Recorded:
    """A postprocessing that records the shape of each ``pred`` it is given."""

    def __init__(self, postprocessing):
        self.postprocessing, self.shapes = postprocessing, []

    def __call__(self, data):
        self.shapes.append(tuple(data["pred"].shape))
        return self.postprocessing(data)


#: (the image file's affine, its shape): stored RAS, LPS, sagittal (slices along i), coronal with a flip (along j)
ORIENTATIONS = {
    "ras": (np.diag([0.8, 0.8, 2.5, 1.0]), (40, 30, 24)),
    "lps": (np.diag([-0.8, -1.2, 2.5, 1.0]), (40, 30, 24)),
    "sagittal": (np.array([[0, 0, -2.0, 0], [0.9, 0, 0, 0], [0, 1.1, 0, 0], [0, 0, 0, 1.0]]), (20, 36, 30)),
    "coronal": (np.array([[1.0, 0, 0, 5], [0, 0, 2.0, 3], [0, -1.0, 0, 7], [0, 0, 0, 1.0]]), (36, 18, 30)),
}


def _chain(orientation: str, pixdim, folder: Path):
    """A volume of ``ORIENTATIONS[orientation]`` preprocessed as the bundle does (orientation, optional spacing,
    in-plane resize to 16 px), and a recorded postprocessing that inverts it and takes the argmax."""
    import nibabel as nib
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, Resized, Spacingd

    affine, shape = ORIENTATIONS[orientation]
    path = folder / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), affine), path)
    steps = [LoadImaged("image", image_only=False), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")]
    steps += [Spacingd("image", pixdim=pixdim, mode="bilinear")] if pixdim else []
    preprocessing = Compose([*steps, Resized("image", spatial_size=(16, 16, -1), mode="bilinear")])
    inverse = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
    postprocessing = _Recorded(Compose([inverse, ChannelArgmaxd("pred", argmax=True)]))
    return preprocessing({"image": str(path)})["image"], postprocessing


def _whole(postprocessing: _Recorded, image, probabilities):
    """The bundle's way: the whole volume's probabilities through the postprocessing."""
    ops = list(image.applied_operations)
    pred = MetaTensor(probabilities.clone(), meta=dict(image.meta), applied_operations=ops)
    return postprocessing.postprocessing({"image": image, "pred": pred})["pred"]


@pytest.mark.parametrize("pixdim", [None, (1.0, 1.0, 2.0)], ids=["slices_kept", "resampled"])
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_postprocessing_of_the_slices_an_object_can_win_equals_the_whole_volume(orientation, pixdim, tmp_path):
    """Labels, affine and shape as the whole volume's postprocessing gives them: two objects, a NaN, a tie with the
    background, nothing at all; only the slab is postprocessed when the preprocessing keeps the slices, the whole
    volume when a ``Spacing`` resampled them."""
    from model_core.io.transforms import postprocess_slices, slices_objects_can_win

    shape = ORIENTATIONS[orientation][1]
    image, postprocessing = _chain(orientation, pixdim, tmp_path)
    depth = image.shape[-1]
    g = torch.Generator().manual_seed(1)
    for start, stop, extra in ((3, 6, None), (depth - 2, depth, "nan"), (7, 8, "tie"), (5, 5, None)):
        probabilities = torch.rand(3, 16, 16, depth, generator=g) * 0.3
        probabilities[1, 2:9, 3:12, start:stop] = 0.9
        probabilities[2, 8:14, 1:6, start:stop] = 0.95
        if extra == "nan":
            probabilities[2, 0, 0, start] = float("nan")
        probabilities[0] = 1 - probabilities[1:].amax(0)
        if extra == "tie":  # an object equal to the background on one voxel: the background wins
            probabilities[:, 4, 4, start] = torch.tensor([0.5, 0.5, 0.1])
        expected_slab = (start, stop) if stop > start else None
        assert slices_objects_can_win(probabilities) == expected_slab
        whole = _whole(postprocessing, image, probabilities)
        postprocessing.shapes.clear()
        got = postprocess_slices(postprocessing, image, probabilities)
        assert got.shape == whole.shape == (1, *shape)
        assert torch.equal(got.as_tensor(), whole.as_tensor())
        assert torch.allclose(got.affine, whole.affine.to(got.affine.dtype))
        assert np.array_equal(np.asarray(got.meta["spatial_shape"]), np.asarray(shape))
        slab = (stop - start) if stop > start else 1
        assert postprocessing.shapes == [(3, 16, 16, depth if pixdim else slab)]
        # given as a function of the slices: the whole volume is asked for once (to find the slab), the same labels
        asked: list[tuple[int, int]] = []

        def lazily(a: int, b: int, asked=asked, probabilities=probabilities) -> torch.Tensor:
            asked.append((a, b))
            return probabilities[..., a:b]

        got = postprocess_slices(postprocessing, image, lazily)
        assert torch.equal(got.as_tensor(), whole.as_tensor()) and asked == [(0, depth)]
    assert (whole > 0).sum() == 0  # the last case: nothing, and the slab path gives the empty volume


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_changed_slices_mapped_into_the_previous_answer_equal_the_whole_volume(orientation, tmp_path):
    """A follow-up's way: only the slices whose probabilities changed go through the postprocessing, into a copy of
    the previous answer, which stays as it was; the result is the whole volume's."""
    from model_core.io.transforms import postprocess_slices

    image, postprocessing = _chain(orientation, None, tmp_path)
    depth = image.shape[-1]
    g = torch.Generator().manual_seed(2)
    before = torch.rand(3, 16, 16, depth, generator=g) * 0.3
    before[1, 2:9, 3:12, 3:7] = 0.9
    before[0] = 1 - before[1:].amax(0)
    previous = postprocess_slices(postprocessing, image, before)
    kept = previous.clone()
    after = before.clone()
    after[2, 6:14, 1:9, 5:9] = 0.8  # the click grew another object over slices 5-8 and moved the first on 5-6
    after[1, 2:9, 3:12, 5:7] = 0.2
    after[0] = 1 - after[1:].amax(0)
    postprocessing.shapes.clear()
    got = postprocess_slices(postprocessing, image, after, (5, 9), previous)
    assert postprocessing.shapes == [(3, 16, 16, 4)]
    assert torch.equal(got.as_tensor(), _whole(postprocessing, image, after).as_tensor())
    assert torch.equal(previous.as_tensor(), kept.as_tensor())  # not changed
    # given as a function of the slices: only the changed slices are asked for
    asked: list[tuple[int, int]] = []
    lazily = postprocess_slices(
        postprocessing, image, lambda a, b: asked.append((a, b)) or after[..., a:b], (5, 9), previous
    )
    assert torch.equal(lazily.as_tensor(), got.as_tensor()) and asked == [(5, 9)]
    with pytest.raises(ValueError, match="both"):
        postprocess_slices(postprocessing, image, after, (5, 9))
