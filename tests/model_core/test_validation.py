"""Input validation at the model boundary: bad input is a ValueError that says what is wrong."""

from __future__ import annotations

import pytest
import torch

from model_core import MemoryPolicy, SlicePrompt, build_icl_sam2
from model_core.predictor import VolumePredictor

S = 64  # model grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_icl_sam2("tiny", image_size=S)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, S, S, generator=g)


def _masks(n, k=1):
    m = torch.zeros(n, k, S, S, dtype=torch.bool)
    for j in range(k):
        m[:, j, 8 + 20 * j : 20 + 20 * j, 10:30] = True
    return m


@pytest.fixture(scope="module")
def support(model):
    return model.build_support_memory(_images(1), _masks(1, 2), object_ids=[3, 5])


# ----------------------------------------------------------- build_support_memory
@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(3, S, S), r"must have shape \(N, 3, 64, 64\), got \(3, 64, 64\)"),
        (torch.rand(1, 1, S, S), r"must have shape \(N, 3, 64, 64\), got \(1, 1, 64, 64\)"),
        (torch.rand(1, 4, S, S), r"must have shape \(N, 3, 64, 64\)"),
        (torch.rand(1, 3, 32, 32), r"are 32x32 but this model takes 64x64; resize"),
        (torch.rand(1, 3, S, 2 * S), r"are 64x128 but this model takes 64x64"),
        (torch.rand(1, 3, S, S) * 255, r"must be scaled to \[0, 1\].*CT window"),
        (torch.rand(1, 3, S, S) - 0.5, r"must be scaled to \[0, 1\]"),
        (torch.full((1, 3, S, S), float("nan")), r"must be scaled to \[0, 1\]"),
        (
            torch.randint(0, 255, (1, 3, S, S), dtype=torch.int32),
            r"must be float in \[0, 1\] or uint8, got torch\.int32",
        ),
        (torch.zeros(0, 3, S, S), r"is empty \(no slices\)"),
        (torch.rand(1, 3, S, S).numpy(), r"must be a torch\.Tensor"),
    ],
    ids=["ndim", "1ch", "4ch", "small", "non_square", "0_255", "negative", "nan", "int32", "empty", "numpy"],
)
def test_support_bad_images(model, images, match):
    masks = _masks(max(len(images), 1))
    before = model.encoded_slices
    with pytest.raises(ValueError, match=match) as e:
        model.build_support_memory(images, masks)
    assert "support images" in str(e.value)
    assert model.encoded_slices == before  # rejected before any encoding


@pytest.mark.parametrize(
    "masks,match",
    [
        (
            torch.ones(1, S, S, dtype=torch.bool),
            r"support masks must be a tensor of shape \(N, K, 64, 64\), got \(1, 64, 64\)",
        ),
        (
            torch.ones(1, 1, 32, 32, dtype=torch.bool),
            r"have shape \(1, 1, 32, 32\) but the images are \(1, 3, 64, 64\)",
        ),
        (torch.ones(2, 1, S, S, dtype=torch.bool), r"have shape \(2, 1, 64, 64\) but the images are \(1, 3, 64, 64\)"),
        (torch.ones(1, 0, S, S, dtype=torch.bool), r"have no object channel \(K = 0\)"),
        (torch.full((1, 1, S, S), 0.5), r"must be binary \(bool or 0/1\)"),
        ([[1]], r"must be a tensor of shape"),
    ],
    ids=["ndim", "size", "count", "no_objects", "soft", "list"],
)
def test_support_bad_masks(model, masks, match):
    with pytest.raises(ValueError, match=match):
        model.build_support_memory(_images(1), masks)


def test_support_object_without_foreground(model):
    masks = _masks(2, 3)
    masks[:, 1] = False  # object id 2 never appears
    with pytest.raises(
        ValueError, match=r"Support masks are empty for object\(s\) \[2\]: every object needs foreground"
    ):
        model.build_support_memory(_images(2), masks)
    with pytest.raises(ValueError, match=r"empty for object\(s\) \['liver'\]"):
        model.build_support_memory(_images(2), masks, object_ids=["spleen", "liver", "kidney"])


@pytest.mark.slow
def test_support_foreground_on_one_slice_is_enough(model):
    masks = _masks(2, 1)
    masks[0] = False
    mem = model.build_support_memory(_images(2), masks)
    assert mem.num_slices == 2 and mem.object_ids == [1]


def test_support_object_ids_length(model):
    with pytest.raises(ValueError, match=r"Got 3 object ids for 2 mask channels"):
        model.build_support_memory(_images(1), _masks(1, 2), object_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"Got 1 object ids for 2 mask channels"):
        model.build_support_memory(_images(1), _masks(1, 2), object_ids=[1])


def test_boundary_values_and_float_masks_accepted(model):
    images = _images(1)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0.0, 1.0
    mem = model.build_support_memory(images, _masks(1).float())
    assert mem.object_ids == [1] and mem.image_size == S


def test_uint8_images_equal_float_over_255(model):
    u = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    masks = _masks(1, 1)
    a = model.build_support_memory(u, masks)
    b = model.build_support_memory(u.float() / 255.0, masks)
    assert torch.equal(a.maskmem_features, b.maskmem_features)
    assert torch.equal(a.obj_ptr, b.obj_ptr)
    # and not trivially: raw 0..255 values (if they had been accepted unscaled) would differ
    c = model.build_support_memory(_images(1, seed=5), masks)
    assert not torch.equal(a.maskmem_features, c.maskmem_features)


# ----------------------------------------------------------- init_state / segment_volume
def test_query_wrong_size(model, support):
    with pytest.raises(ValueError, match=r"query images are 32x32 but this model takes 64x64"):
        VolumePredictor(model).init_state(torch.rand(2, 3, 32, 32), support)
    with pytest.raises(ValueError, match=r"query images must be scaled to \[0, 1\]"):
        VolumePredictor(model).segment_volume(torch.rand(2, 3, S, S) * 2, support)


def test_support_from_other_architecture(model):
    torch.manual_seed(0)
    other = build_icl_sam2("tiny", image_size=96)
    images = torch.rand(1, 3, 96, 96)
    masks = torch.zeros(1, 1, 96, 96, dtype=torch.bool)
    masks[0, 0, 20:40, 20:40] = True
    foreign = other.build_support_memory(images, masks)
    with pytest.raises(ValueError, match=r"built by a different model .*'image_size': 96.*Rebuild it with this model"):
        VolumePredictor(model).init_state(_images(2), foreign)
    with pytest.raises(ValueError, match=r"built by a different model"):
        VolumePredictor(model).segment_volume(_images(2), foreign)


def test_unknown_object_in_select(model, support):
    with pytest.raises(ValueError, match=r"Objects \[7\] are not in the support set \(it has \[3, 5\]\)"):
        VolumePredictor(model).init_state(_images(2), support, object_ids=[5, 7])
    with pytest.raises(ValueError, match=r"Objects \[1\] are not in the support set"):
        support.select_objects([1])
    state = VolumePredictor(model).init_state(_images(2), support, object_ids=[5])
    assert state.object_ids == [5] and state.num_objects == 1


def test_empty_object_ids(model, support):
    with pytest.raises(ValueError, match="Nothing to segment"):
        VolumePredictor(model).init_state(_images(2), None, object_ids=[])


def test_propagate_needs_support_or_prompt(model):
    before = model.encoded_slices
    with pytest.raises(ValueError, match=r"Objects \[1\] have neither a support set nor a prompt"):
        VolumePredictor(model).segment_volume(_images(2))
    state = VolumePredictor(model).init_state(_images(2), None, object_ids=[1, 2])
    with pytest.raises(ValueError, match=r"Objects \[1, 2\] have neither a support set nor a prompt; add one first"):
        next(VolumePredictor(model).propagate(state))
    assert model.encoded_slices == before


def test_oracle_needs_ground_truth(model, support):
    before = model.encoded_slices
    with pytest.raises(ValueError, match=r"oracle policy .* needs ground_truth"):
        VolumePredictor(model).segment_volume(_images(2), support, policy=MemoryPolicy("oracle"))
    with pytest.raises(ValueError, match=r"ground_truth must be \(D, K, H, W\) with \(D, K\) = \(2, 2\)"):
        VolumePredictor(model).segment_volume(
            _images(2), support, policy=MemoryPolicy("oracle"), ground_truth=torch.zeros(3, 2, S, S, dtype=torch.bool)
        )
    assert model.encoded_slices == before


def test_unknown_policy():
    with pytest.raises(ValueError, match=r"Unknown memory policy 'best'; use 'recent', 'scored' or 'oracle'"):
        MemoryPolicy("best")
    with pytest.raises(ValueError, match="pool_size must be at least 1"):
        MemoryPolicy("scored", pool_size=0)


def test_bad_direction(model, support):
    with pytest.raises(ValueError, match=r"direction must be 'forward', 'backward' or 'both', got 'up'"):
        VolumePredictor(model).segment_volume(_images(2), support, direction="up")
    state = VolumePredictor(model).init_state(_images(2), support)
    with pytest.raises(ValueError, match="direction must be"):
        next(VolumePredictor(model).propagate(state, direction="sideways"))


@pytest.mark.parametrize("start", [2, 5, -1])
def test_start_slice_out_of_range(model, support, start):
    before = model.encoded_slices
    with pytest.raises(ValueError, match=rf"Slice {start} is outside the volume \(slices 0\.\.1\)"):
        VolumePredictor(model).segment_volume(_images(2), support, start_slice=start)
    assert model.encoded_slices == before


# ----------------------------------------------------------- SlicePrompt.validate
@pytest.mark.parametrize(
    "prompt,match",
    [
        (
            SlicePrompt(points=[[64.0, 10.0]], labels=[1]),
            r"Point \[64\.0, 10\.0\] lies outside the 64x64 image; .*\[0, 63\]",
        ),
        (SlicePrompt(points=[[10.0, 10.0], [3.0, -1.0]], labels=[1, 0]), r"Point \[3\.0, -1\.0\] lies outside"),
        (SlicePrompt(box=[10, 10, 10, 20]), r"zero or negative size; need x0 < x1 and y0 < y1"),
        (SlicePrompt(box=[10, 30, 20, 20]), r"zero or negative size"),
        (SlicePrompt(box=[10, 10, 70, 20]), r"Box corner \[70\.0, 20\.0\] lies outside the 64x64 image"),
        (SlicePrompt(box=[10, 10, 20]), r"A box is \(x0, y0, x1, y1\); got 3 numbers"),
        (
            SlicePrompt(points=[[5.0, 5.0]], labels=[2]),
            r"Point labels must be 1 \(foreground\) or 0 \(background\), got \[2\]",
        ),
        (SlicePrompt(points=[[5.0, 5.0]], labels=[-1]), r"Point labels must be 1"),
        (SlicePrompt(points=[[5.0, 5.0], [6.0, 6.0]], labels=[1]), r"Got 2 points but 1 labels"),
        (SlicePrompt(points=[[5.0, 5.0]]), r"Points and labels must be given together"),
        (SlicePrompt(labels=[1], box=[1, 1, 5, 5]), r"Points and labels must be given together"),
        (SlicePrompt(points=[[5.0, 5.0]], labels=[1], mask=torch.ones(S, S)), r"mask prompt cannot be combined"),
        (SlicePrompt(box=[1, 1, 5, 5], mask=torch.ones(S, S)), r"mask prompt cannot be combined"),
        (SlicePrompt(mask=torch.ones(32, 32)), r"A mask prompt must be 64x64 \(the model grid\), got \(32, 32\)"),
        (SlicePrompt(mask=torch.ones(1, S, S)), r"A mask prompt must be 64x64"),
        (SlicePrompt(), r"needs at least one of: points with labels, a box, or a mask"),
    ],
    ids=[
        "point_x_out",
        "point_y_negative",
        "box_zero_width",
        "box_inverted",
        "box_out",
        "box_3_numbers",
        "label_2",
        "label_pad",
        "count_mismatch",
        "points_no_labels",
        "labels_no_points",
        "mask_and_points",
        "mask_and_box",
        "mask_size",
        "mask_3d",
        "empty",
    ],
)
def test_slice_prompt_invalid(prompt, match):
    with pytest.raises(ValueError, match=match):
        prompt.validate(S)


def test_slice_prompt_valid_is_normalised():
    p = SlicePrompt(points=[[0, 0], [63, 63]], labels=[1, 0], box=[0, 0, 63, 63]).validate(S)
    assert p.points.dtype == torch.float32 and p.points.shape == (2, 2)
    assert p.labels.dtype == torch.int32
    inputs = p.point_inputs()
    assert inputs["point_coords"].shape == (1, 4, 2)
    assert inputs["point_labels"].tolist() == [[2, 3, 1, 0]]
    m = SlicePrompt(mask=torch.ones(S, S, dtype=torch.uint8)).validate(S)
    assert m.mask.dtype == torch.bool and m.point_inputs() is None


def test_add_prompt_bad_slice_and_object(model, support):
    state = VolumePredictor(model).init_state(_images(2), support)
    prompt = SlicePrompt(points=[[10.0, 10.0]], labels=[1])
    before = model.encoded_slices
    with pytest.raises(ValueError, match=r"Slice 2 is outside the volume \(slices 0\.\.1\)"):
        VolumePredictor(model).add_prompt(state, 2, 3, prompt)
    with pytest.raises(ValueError, match=r"Slice -1 is outside the volume"):
        VolumePredictor(model).add_prompt(state, -1, 3, prompt)
    with pytest.raises(ValueError, match=r"Unknown object 7; this volume's objects are \[3, 5\]"):
        VolumePredictor(model).add_prompt(state, 0, 7, prompt)
    with pytest.raises(ValueError, match=r"lies outside the 64x64 image"):
        VolumePredictor(model).add_prompt(state, 0, 3, SlicePrompt(points=[[100.0, 10.0]], labels=[1]))
    with pytest.raises(ValueError, match=r"Unknown object 9"):
        VolumePredictor(model).segment_volume(_images(2), support, prompts={(0, 9): prompt})
    assert model.encoded_slices == before
    assert all(not p for p in state.prompts)


@pytest.mark.slow
def test_support_from_same_architecture_with_other_weights(model):
    """Presets share sizes; the fingerprint also covers preset and weights."""
    torch.manual_seed(1)
    other = build_icl_sam2("tiny", image_size=S)  # same preset and size, other weights
    foreign = other.build_support_memory(_images(1), _masks(1))
    with pytest.raises(ValueError, match=r"built by a different model"):
        VolumePredictor(model).init_state(_images(2), foreign)
    big = build_icl_sam2("sam2_hiera_tiny", image_size=S)
    with pytest.raises(ValueError, match=r"'preset': 'sam2_hiera_tiny'"):
        VolumePredictor(model).init_state(_images(2), big.build_support_memory(_images(1), _masks(1)))


def test_label_map_is_not_taken_for_a_mask(model):
    labels = torch.zeros(1, 1, S, S, dtype=torch.int64)
    labels[0, 0, 5:20, 5:20] = 1
    labels[0, 0, 30:40, 30:40] = 2
    with pytest.raises(ValueError, match="split a label map into one channel per label value"):
        model.build_support_memory(_images(1), labels)


def test_propagate_checks_arguments_when_called(model, support):
    state = VolumePredictor(model).init_state(_images(2), support)
    with pytest.raises(ValueError, match="direction must be"):
        VolumePredictor(model).propagate(state, direction="bad")  # no next(): the error comes at the call
