"""A propagation pass that stops where the structure ends (issue 21): what it reaches, encodes and leaves.

The mechanics run on random tiny weights whose object score is forced (always absent, always
present). Whether the stopped pass gives the full pass's masks is a question for weights that
segment: the tests marked slow use the tiny preset trained on phantoms (``trained_tiny``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core import SlicePrompt, build_icl_sam2, load_checkpoint
from model_core.io.phantoms import make_phantom
from model_core.predictor import VolumePredictor
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64


@functools.cache
def _model(object_score_bias: float):
    """Random tiny weights with decisive masks and an object score of ``object_score_bias`` on every slice."""
    torch.manual_seed(0)
    model = build_icl_sam2("tiny", image_size=SIZE)
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].weight.zero_()
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(object_score_bias)
    return model.eval()


def _click(state, predictor, z: int) -> None:
    predictor.add_prompt(state, z, 1, SlicePrompt(points=torch.tensor([[30.0, 30.0]]), labels=torch.tensor([1])))


def _images(depth: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    low = torch.rand(depth, 3, SIZE // 8, SIZE // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def test_a_pass_stops_after_n_absent_slices_past_the_prompts_and_encodes_only_what_it_reached():
    model = _model(-20.0)  # the object is absent everywhere
    predictor = VolumePredictor(model)
    state = predictor.init_state(_images(20), object_ids=[1], feature_cache_slices=20)
    for z in (10, 14):
        _click(state, predictor, z)
    before = model.encoded_slices
    order = [z for z, _ in predictor.propagate(state, 10, "both", stop_after_absent=3)]
    # forward: on to the last prompted slice (14), already 5 absent slices by then; backward: 10, 9, 8
    assert order == [10, 11, 12, 13, 14, 10, 9, 8]
    assert model.encoded_slices - before == 5  # 11, 12, 13, 9, 8 (10 and 14 were encoded by the clicks)
    assert sorted(state.features.cache) == list(range(8, 15))
    assert state.tracked[:, 0].nonzero().flatten().tolist() == [8, 9, 10, 11, 12, 13, 14]


def test_slices_beyond_the_stop_are_left_as_a_new_state_has_them():
    model = _model(-20.0)
    predictor = VolumePredictor(model)
    images = _images(12)
    used = predictor.init_state(images, object_ids=[1])
    _click(used, predictor, 5)
    assert len(list(predictor.propagate(used, 5, "both"))) == 13  # the full pass: every slice, 5 twice
    assert bool(used.tracked.all())
    # as a replay does (no warm start): slices 4..0 of the full pass would otherwise be memories of the forward pass
    stopped = [z for z, _ in predictor.propagate(used, 5, "both", warm_start=False, stop_after_absent=2)]
    fresh = predictor.init_state(images, object_ids=[1])
    _click(fresh, predictor, 5)
    assert [z for z, _ in predictor.propagate(fresh, 5, "both", stop_after_absent=2)] == stopped == [5, 6, 5, 4]
    assert torch.equal(used.tracked, fresh.tracked)
    for name in ("low_res_logits", "object_score_logits", "obj_ptr", "iou"):
        assert torch.allclose(getattr(used, name), getattr(fresh, name), atol=1e-5), name


def test_a_present_object_never_stops_the_pass_and_zero_is_the_full_pass():
    model = _model(20.0)
    predictor = VolumePredictor(model)
    images = _images(9)
    runs = {}
    for stop in (0, 1):
        state = predictor.init_state(images, object_ids=[1])
        _click(state, predictor, 4)
        runs[stop] = [(z, logits) for z, logits in predictor.propagate(state, 4, "both", stop_after_absent=stop)]
    assert [z for z, _ in runs[1]] == [z for z, _ in runs[0]] == [4, 5, 6, 7, 8, 4, 3, 2, 1, 0]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(runs[0], runs[1]))


@pytest.mark.parametrize("kwargs", [{"stop_after_absent": -1}, {"stop_after_absent": 1.5}, {"absent_score": "x"}])
def test_bad_stopping_options_are_refused_when_propagate_is_called(kwargs):
    model = _model(0.0)
    predictor = VolumePredictor(model)
    state = predictor.init_state(_images(3), object_ids=[1])
    _click(state, predictor, 1)
    with pytest.raises(ValueError, match="stop_after_absent|absent_score"):
        predictor.propagate(state, **kwargs)


# ------------------------------------------------------------------ trained weights


@pytest.fixture(scope="module")
def trained(trained_tiny):
    model = build_icl_sam2("tiny", image_size=trained_tiny["image_size"])
    load_checkpoint(model, trained_tiny["checkpoint"])
    return model.eval()


def _extent(mask: np.ndarray) -> tuple[int, int]:
    zs = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
    return int(zs[0]), int(zs[-1])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [100, 101, 102])
def test_the_stopped_pass_equals_the_full_pass_where_the_structure_is(trained, seed):
    """Phantoms the model has not seen (16 slices, as trained), each structure clicked on the middle of its extent.

    Checked: the stopped pass gives the full pass's masks on the structure's slices and on every slice it reached.
    Where it stops is the model's object score: the bf16-trained test model's was clean (absent, -0.9, outside the
    region it segmented), so passes stopped N slices past it; the fp32-trained one (the recipe since issue 22) keeps
    a present score on some empty slices and may reach an end of the volume, so the stopping point is printed, not
    asserted.
    """
    n = ServiceConfig.stop_after_absent
    image, label = make_phantom((16, SIZE, SIZE), seed=seed)
    slices = torch.from_numpy(image)[:, None].expand(-1, 3, -1, -1)
    predictor = VolumePredictor(trained)
    for value in (1, 2, 3):
        truth = label == value
        lo, hi = _extent(truth)
        z = (lo + hi) // 2
        ys, xs = np.nonzero(truth[z])
        c = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        click = SlicePrompt(points=torch.tensor([[float(xs[c]), float(ys[c])]]), labels=torch.tensor([1]))
        masks, reached = {}, {}
        for stop in (0, n):
            state = predictor.init_state(slices, object_ids=[1])
            predictor.add_prompt(state, z, 1, click)
            reached[stop] = [s for s, _ in predictor.propagate(state, z, "both", stop_after_absent=stop)]
            up = torch.nn.functional.interpolate(state.low_res_logits[:, 0], size=(SIZE, SIZE), mode="bilinear")
            masks[stop] = up[:, 0].numpy() > 0
        on = slice(lo, hi + 1)
        assert masks[0][on].any(), (seed, value)  # not two empty answers
        assert _dice(masks[n][on], masks[0][on]) >= 0.99, (seed, value)
        # every slice the stopped pass reached is one the full pass reached, with the same mask
        ran = sorted(set(reached[n]))
        assert set(ran) <= set(reached[0]) and z in ran, (seed, value)
        assert _dice(masks[n][ran], masks[0][ran]) >= 0.99, (seed, value)
        print(f"seed {seed} structure {value}: {len(ran)} of {len(set(reached[0]))} slices reached")


@pytest.mark.slow
def test_a_click_on_a_small_structure_encodes_a_fraction_of_a_deep_volume(trained_tiny, tmp_path):
    """Through the service, as the app runs it: the default stops where the blob ends, 0 encodes every slice.

    The volume: a 16-slice phantom (as the model was trained) between 40 copies of its first and of its last
    slice, which no structure reaches; the blob then covers a few of the 96 slices.
    """
    core, core_label = make_phantom((16, SIZE, SIZE), seed=7)
    assert not core_label[0].any() and not core_label[-1].any()
    pad = 40
    image = np.concatenate([np.repeat(core[:1], pad, 0), core, np.repeat(core[-1:], pad, 0)])
    label = np.pad(core_label, ((pad, pad), (0, 0), (0, 0)))
    depth = image.shape[0]
    path = str(tmp_path / "deep.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(1, 2, 0)), np.eye(4)), path)
    truth = label == 1
    lo, hi = _extent(truth)
    z = (lo + hi) // 2
    ys, xs = np.nonzero(truth[z])
    click = [[int(xs[len(xs) // 2]), int(ys[len(ys) // 2]), z]]  # [i, j, k]: file order (x, y, slice)
    answers = {}
    n = ServiceConfig.stop_after_absent
    for stop in (n, 0):
        service = SegmentationService(
            ServiceConfig(
                bundle_dir=str(ROOT / "bundle"),
                labels=trained_tiny["labels"],
                checkpoint=trained_tiny["checkpoint"],
                preset="tiny",
                image_size=trained_tiny["image_size"],
                window=(0, 1),
                stop_after_absent=stop,
            )
        )
        answers[stop] = service.interact("ann", path, "blob", foreground=click)
    full, stopped = answers[0].info, answers[n].info
    assert full["encoded_slices"] == depth and full["propagated_slices"] == depth + 1
    segmented = np.asarray(answers[0].label)[0] > 0  # (i, j, k)
    seg_lo, seg_hi = _extent(segmented.transpose(2, 0, 1))
    # never more work than the full pass, and encoded only where a pass reached (the stopping point is the model's
    # object score: printed; with the bf16-trained test model it encoded the blob's slices plus 2 N of 96)
    assert stopped["encoded_slices"] == stopped["propagated_slices"] - 1 <= full["encoded_slices"], stopped
    print(f"structure over slices {lo}-{hi}, segmented {seg_lo}-{seg_hi}: stopped pass encoded {stopped}")
    assert torch.equal(torch.as_tensor(answers[n].label), torch.as_tensor(answers[0].label))
