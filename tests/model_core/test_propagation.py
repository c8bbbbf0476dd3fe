"""Volume propagation: bounded memory, shared features, directions, support reuse, prompts, policies."""

from __future__ import annotations

import pytest
import torch

from model_core import MemoryPolicy, SlicePrompt, SupportMemory, build_icl_sam2
from model_core.modeling.memory import FrameEntry, MemoryBank
from model_core.predictor import VolumePredictor

SIZE = 64


def _volume(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)


def _masks(n: int, k: int) -> torch.Tensor:
    m = torch.zeros(n, k, SIZE, SIZE, dtype=torch.bool)
    for j in range(k):
        m[:, j, 6 + 18 * j : 20 + 18 * j, 10:40] = True
    return m


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_icl_sam2("tiny", image_size=SIZE, encoder_batch_size=4)
    with torch.no_grad():  # decisive random weights (see test_reference_equivalence._sharpen)
        for mlp in m.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
        m.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(4.0)
    return m


@pytest.fixture(scope="module")
def support(model):
    return model.build_support_memory(_volume(2, 1), _masks(2, 3), object_ids=[4, 5, 6])


@pytest.mark.slow
def test_memory_is_bounded_independent_of_depth(model, support, monkeypatch):
    sizes = []
    add = MemoryBank.add

    def recording_add(self, entry):
        add(self, entry)
        with_feats = sum(e.maskmem_features is not None for e in self.entries.values())
        sizes.append((len(self.entries), with_feats))

    monkeypatch.setattr(MemoryBank, "add", recording_add)
    peaks = {}
    for depth in (10, 40):
        sizes.clear()
        state = VolumePredictor(model).init_state(_volume(depth, 2), support)
        for _ in VolumePredictor(model).propagate(state, direction="forward"):
            assert len(state.features.cache) <= max(state.features.capacity, model.encoder_batch_size)
        peaks[depth] = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert peaks[40][0] <= model.max_obj_ptrs_in_encoder  # pointers: the last 15 slices + current
    assert peaks[40][1] <= model.num_maskmem  # spatial memories: the last num_maskmem - 1 + current
    assert peaks[40] == (model.max_obj_ptrs_in_encoder, model.num_maskmem)  # the window really fills
    assert peaks[10][0] == 10  # short volume: everything fits


@pytest.mark.slow
def test_objects_share_each_slice_features_and_encoder_is_batched(model, support, monkeypatch):
    depth = 10
    calls = []
    forward = type(model.image_encoder).forward

    def counting_forward(self, x):
        calls.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(type(model.image_encoder), "forward", counting_forward)
    before = model.encoded_slices
    pred = VolumePredictor(model).segment_volume(_volume(depth, 3), support)
    assert pred.masks.shape == (3, depth, SIZE, SIZE)  # three objects...
    assert model.encoded_slices - before == depth  # ...from one encoding of each slice
    assert calls == [4, 4, 2]  # batches of encoder_batch_size


@pytest.mark.slow
def test_directions_and_start_slice(model, support):
    depth, start = 12, 5
    images = _volume(depth, 4)
    state = VolumePredictor(model).init_state(images, support)
    order = [z for z, _ in VolumePredictor(model).propagate(state, start_slice=start, direction="forward")]
    assert order == list(range(start, depth))
    assert not state.tracked[:start].any() and state.tracked[start:].all()
    state = VolumePredictor(model).init_state(images, support)
    order = [z for z, _ in VolumePredictor(model).propagate(state, start_slice=start, direction="backward")]
    assert order == list(range(start, -1, -1))
    state = VolumePredictor(model).init_state(images, support)
    order = [z for z, _ in VolumePredictor(model).propagate(state, start_slice=start, direction="both")]
    assert order == list(range(start, depth)) + list(range(start, -1, -1))
    assert state.tracked.all() and not state.tracked_reverse[start + 1 :].any() and state.tracked_reverse[:start].all()


class _KeepsNothing(dict):
    """A memory table that never keeps a memory: every warm start rebuilds it, as before memories were kept."""

    def __setitem__(self, key, value):
        pass


def test_the_pass_back_reads_the_memories_tracking_kept_and_a_changed_slice_drops_its_own(model, monkeypatch):
    """A ``both`` run's backward pass attends to the forward pass's slices next to the start. Their memories are
    the ones tracking encoded (SAM2's predictor keeps them too), so the memory encoder runs for none of them
    again; each equals what the encoder makes from the stored result, so the answer is the rebuilt one's.
    A new result on a slice drops its memory."""
    depth, start = 16, 5
    images = _volume(depth, 7)
    reach = (model.num_maskmem - 1) * model.memory_temporal_stride_for_eval + 1
    click = SlicePrompt(points=[[30.0, 30.0]], labels=[1])
    encoded, encode = [], type(model).encode_memory
    monkeypatch.setattr(type(model), "encode_memory", lambda self, *a, **k: encoded.append(1) or encode(self, *a, **k))
    runs = []
    for memories in (None, _KeepsNothing()):
        predictor = VolumePredictor(model)
        state = predictor.init_state(images, object_ids=[1])
        if memories is not None:
            state.memories = memories
        predictor.add_prompt(state, start, 1, click)
        encoded.clear()
        runs.append({z: logits.clone() for z, logits in predictor.propagate(state, start, "both")})
        if memories is None:
            assert encoded == []  # none rebuilt
            # steps 1 .. reach - 1 of either pass: what a pass back from this start attends to
            near = [start + d * sign for sign in (1, -1) for d in range(1, reach)]
            assert sorted(state.memories) == sorted(z for z in near if 0 <= z < depth)
            for z, kept in state.memories.items():
                with torch.inference_mode():
                    feats, _, sizes = state.features.get(z, 1)
                    rebuilt, _ = model.encode_memory(
                        feats, sizes, state.low_res_logits[z], state.object_score_logits[z], from_points=False
                    )
                assert kept.dtype == model.memory_storage_dtype
                torch.testing.assert_close(kept, rebuilt.to(kept.dtype), atol=1e-5, rtol=1e-5)
            kept_state = state
        else:
            assert len(encoded) == reach - 1  # the forward pass's memories next to the start, rebuilt
    assert runs[0].keys() == runs[1].keys()
    for z in runs[0]:
        torch.testing.assert_close(runs[0][z], runs[1][z], atol=1e-4, rtol=1e-4)

    VolumePredictor(model).add_prompt(kept_state, start + 2, 1, click)  # a new result there
    assert start + 2 not in kept_state.memories and start + 1 in kept_state.memories
    kept_state.forget([start + 1])
    assert start + 1 not in kept_state.memories


@pytest.mark.slow
def test_support_memory_is_reusable_movable_and_savable(model, support, tmp_path):
    images = _volume(6, 5)
    first = VolumePredictor(model).segment_volume(images, support, return_logits=True)
    path = tmp_path / "support.pt"
    support.save(str(path))
    loaded = SupportMemory.load(str(path)).to("cpu")
    again = VolumePredictor(model).segment_volume(images, loaded, return_logits=True)
    assert torch.equal(first.logits, again.logits)
    # used for another volume without rebuilding
    other = VolumePredictor(model).segment_volume(_volume(6, 6), loaded)
    assert other.masks.shape == first.masks.shape
    # a subset of objects, reordered
    sub = VolumePredictor(model).segment_volume(images, support, object_ids=[6, 4], return_logits=True)
    assert sub.object_ids == [6, 4]
    assert torch.allclose(sub.logits[0].float(), first.logits[2].float(), atol=1e-2)
    with pytest.raises(ValueError, match="not an ICL-SAM2 support memory"):
        torch.save({"x": 1}, str(tmp_path / "bad.pt"))
        SupportMemory.load(str(tmp_path / "bad.pt"))


@pytest.mark.slow
def test_clicks_on_top_of_support_update_the_result(model, support):
    depth, z = 8, 3
    images = _volume(depth, 7)
    state = VolumePredictor(model).init_state(images, support, object_ids=[4])
    before = torch.stack([logits[0, 0] for _, logits in VolumePredictor(model).propagate(state)])
    # a negative click where the object is predicted, then a positive one where it is not
    # (random weights: the direction of the change is not asserted, only that it happens)
    ys, xs = (before[z] > 0).nonzero(as_tuple=True)
    ny, nx = (before[z] <= 0).nonzero(as_tuple=True)
    assert len(ys) and len(ny)
    neg = (float(xs[len(xs) // 2]), float(ys[len(ys) // 2]))
    pos = (float(nx[len(nx) // 2]), float(ny[len(ny) // 2]))
    first = VolumePredictor(model).add_prompt(state, z, 4, SlicePrompt(points=[neg], labels=[0]))
    assert not torch.allclose(first, before[z])  # the click changed this slice
    second = VolumePredictor(model).add_prompt(state, z, 4, SlicePrompt(points=[pos], labels=[1]), replace=False)
    assert state.prompts[0][z].points.shape == (2, 2)  # clicks accumulate
    assert not torch.allclose(second, first)  # prompting the slice again updates it
    after = torch.zeros_like(before)
    for s, logits in VolumePredictor(model).propagate(state, start_slice=z, direction="both"):
        after[s] = logits[0, 0]
    # the prompted slice keeps its prompted result; the change propagates in both directions
    assert torch.allclose(after[z], second, atol=1e-5)
    assert not torch.allclose(after[z + 1], before[z + 1])
    assert not torch.allclose(after[z - 1], before[z - 1])


@pytest.mark.slow
def test_scored_and_oracle_policies_choose_other_memories(model, support):
    depth = 20
    images = _volume(depth, 8)
    recent = VolumePredictor(model).segment_volume(images, support, return_logits=True)
    gt = torch.zeros(depth, 3, SIZE, SIZE, dtype=torch.bool)
    gt[:, :, 10:30, 10:30] = True
    for name in ("scored", "oracle"):
        policy = MemoryPolicy(name, pool_size=8, w_similarity=2.0)
        pred = VolumePredictor(model).segment_volume(
            images, support, policy=policy, ground_truth=gt, return_logits=True
        )
        assert pred.masks.shape == recent.masks.shape
        # identical while fewer memories exist than slots, different once selection kicks in
        assert torch.equal(pred.logits[:, :2], recent.logits[:, :2])
        assert not torch.equal(pred.logits, recent.logits)


def _entry(step, iou, true_iou, k=1):
    return FrameEntry(
        slice_index=step,
        step=step,
        maskmem_features=torch.zeros(k, 2, 1, 1),
        obj_ptr=torch.zeros(k, 4),
        object_score_logits=torch.full((k, 1), 5.0),
        iou=torch.full((k,), iou),
        embedding=torch.ones(4),
        true_iou=torch.full((k,), true_iou),
    )


def test_memory_bank_selection_rules():
    pos = torch.zeros(1, 2, 1, 1)
    oracle = MemoryBank(MemoryPolicy("oracle", num_memories=2, pool_size=3), 7, 16, 1, pos)
    for step, t in enumerate([0.9, 0.1, 0.8, 0.2, 0.3]):
        oracle.add(_entry(step, 0.5, t))
    assert len(oracle) == 3  # bounded by pool_size (the 2 most recent are always kept)
    assert oracle.select(5, 1, None) == [(0, 4)]  # highest true IoU first
    scored = MemoryBank(MemoryPolicy("scored", num_memories=1, w_recency=0.0, w_similarity=0.0), 7, 16, 1, pos)
    for step, iou in enumerate([0.2, 0.95, 0.4]):
        scored.add(_entry(step, iou, 0.0))
    assert scored.select(3, 1, torch.ones(4)) == [(1,)]  # best predicted IoU
    view = scored.view(3, (1,), [0], to_key=lambda s: 100 + s)
    assert list(view) == [102]  # re-keyed to the frame just before the current one
    recent = MemoryBank(MemoryPolicy("recent"), num_maskmem=3, max_obj_ptrs=4, stride=1, maskmem_pos_enc=pos)
    for step in range(6):
        recent.add(_entry(step, 0.5, 0.0))
    assert sorted(recent.entries) == [2, 3, 4, 5]  # pointer window
    assert [s for s, e in sorted(recent.entries.items()) if e.maskmem_features is not None] == [3, 4, 5]


@pytest.mark.slow
def test_prediction_outputs(model, support):
    depth = 5
    pred = VolumePredictor(model).segment_volume(_volume(depth, 9), support, output_size=(40, 48), return_logits=True)
    assert pred.masks.shape == (3, depth, 40, 48) and pred.logits.dtype == torch.float16
    assert pred.iou.shape == (depth, 3) and pred.object_score_logits.shape == (depth, 3)
    conf = pred.confidence()
    assert conf.shape == (3,) and ((conf >= 0) & (conf <= 1)).all() and conf.max() > 0
    labels = pred.label_map()
    assert labels.shape == (depth, 40, 48)
    assert set(labels.unique().tolist()) <= {0, 4, 5, 6}
    assert (labels == 6).sum() == pred.masks[2].sum()  # the last object wins overlaps
