"""model_core's `recent` policy computes what Meta's SAM2VideoPredictor computes.

Same random weights, same input tensors: support slices through add_new_mask and
query slices through propagate_in_video (in-context), and clicks/boxes/masks
through add_new_points_or_box / add_new_mask with forward and backward
propagation (interactive), on SAM2, SAM2.1 and the tiny preset.
"""

from __future__ import annotations

import pytest
import torch

from model_core import SlicePrompt, build_icl_sam2
from model_core.predictor import VolumePredictor
from model_core.reference import build_reference_predictor, reference_in_context, reference_interactive

SIZE = 64
PRESETS = ["tiny", "sam2.1_hiera_tiny", "sam2_hiera_tiny"]


pytestmark = pytest.mark.slow  # SAM2 Hiera-tiny on CPU: minutes


def _volume(n: int, seed: int) -> torch.Tensor:
    """Smooth random slices in [0, 1]: blobs give the encoder something to see."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


def _support_masks(s: int) -> torch.Tensor:
    m = torch.zeros(s, 2, SIZE, SIZE, dtype=torch.bool)
    for j in range(s):
        m[j, 0, 8 + j : 30 + j, 10:28] = True
        m[j, 1, 34:52, 20 + 2 * j : 50] = True
    return m


def _ours(model, state, **kwargs) -> torch.Tensor:
    out = torch.zeros(state.num_objects, state.num_slices, SIZE, SIZE)
    for z, logits in VolumePredictor(model).propagate(state, **kwargs):
        out[:, z] = logits[:, 0].cpu()
    return out


def _assert_agree(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert (ours - ref).abs().max() <= 1e-3
    a, b = ours > 0, ref > 0
    union = (a | b).sum()
    iou = 1.0 if union == 0 else float((a & b).sum() / union)
    assert iou >= 0.999


def _sharpen(model) -> None:
    """Make random weights decisive: larger mask logits, objects predicted present.

    At initialisation SAM2's logits sit within +/-0.05 of zero, where a 1e-3
    tolerance could not tell memories apart. Scaling the hypernetwork outputs and
    biasing the object-score head (both models get the same weights) makes the
    comparison discriminate, which the control in the in-context test checks.
    """
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(4.0)


@pytest.fixture(scope="module", params=PRESETS)
def pair(request):
    torch.manual_seed(0)
    model = build_icl_sam2(request.param, image_size=SIZE)
    _sharpen(model)
    return model, build_reference_predictor(model)


def test_in_context_recent_equals_sam2_video_predictor(pair):
    model, predictor = pair
    S, D = 3, 9  # D > num_maskmem: the sliding window of recent memories is exercised
    support_images, masks, query = _volume(S, 1), _support_masks(S), _volume(D, 2)
    ref = reference_in_context(predictor, support_images, masks, query)
    support = model.build_support_memory(support_images, masks, object_ids=[0, 1])
    ours = _ours(model, VolumePredictor(model).init_state(query, support), direction="forward")
    _assert_agree(ours, ref)
    assert ref.abs().max() > 1.0 and 0.05 < (ref > 0).float().mean() < 0.95  # decisive, non-trivial masks

    # the tolerance discriminates: a support set with one slice less moves the logits well beyond it
    fewer = model.build_support_memory(support_images[:2], masks[:2], object_ids=[0, 1])
    other = _ours(model, VolumePredictor(model).init_state(query, fewer), direction="forward")
    assert (other - ref).abs().max() > 1e-2


def test_interactive_points_box_and_correction_equal_sam2(pair):
    model, predictor = pair
    D = 10
    images = _volume(D, 3)
    first = [
        (3, 0, {"points": [[20.0, 30.0], [40.0, 10.0]], "labels": [1, 0]}),
        (3, 1, {"box": [10.0, 12.0, 50.0, 40.0]}),
        (5, 0, {"points": [[25.0, 25.0]], "labels": [1]}),
    ]
    # a click on a slice tracked by the first round: a correction with memory and previous logits
    second = [(7, 1, {"points": [[30.0, 30.0]], "labels": [1]})]
    rounds = [(first, 3), (second, 7)]
    ref = reference_interactive(predictor, images, rounds)

    state = VolumePredictor(model).init_state(images, object_ids=[0, 1])
    for prompts, start in rounds:
        for z, obj, kw in prompts:
            VolumePredictor(model).add_prompt(
                state, z, obj, SlicePrompt(points=kw.get("points"), labels=kw.get("labels"), box=kw.get("box"))
            )
        ours = _ours(model, state, start_slice=start, direction="both")
    # slices not re-written by the second round keep the first round's result in `state`
    for z in range(D):
        ours[:, z] = torch.nn.functional.interpolate(state.low_res_logits[z], size=(SIZE, SIZE), mode="bilinear")[:, 0]
    _assert_agree(ours, ref)


def test_mask_prompt_equals_add_new_mask(pair):
    model, predictor = pair
    D = 6
    images = _volume(D, 4)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[12:40, 16:44] = True
    ref = reference_interactive(predictor, images, [([(2, 0, {"mask": mask})], 2)])
    state = VolumePredictor(model).init_state(images, object_ids=[0])
    VolumePredictor(model).add_prompt(state, 2, 0, SlicePrompt(mask=mask))
    ours = _ours(model, state, direction="both")
    _assert_agree(ours, ref)
