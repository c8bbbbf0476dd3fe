"""Training forward, loss, prompts for training, freezing, and that the network learns."""

from __future__ import annotations

import pytest
import torch

from model_core import PromptSampler
from model_core.io.phantoms import PHANTOM_LABELS, make_phantom
from model_core.training import build_training_network
from model_core.training.episodes import EpisodeSampler
from model_core.training.losses import ICLSAM2Loss

SIZE = 64


@pytest.fixture(scope="module")
def sampler():
    volumes = [make_phantom((16, SIZE, SIZE), seed=i) for i in range(4)]
    return EpisodeSampler(volumes, list(PHANTOM_LABELS.values()), num_support=2, num_query=3, image_size=SIZE, seed=0)


@pytest.mark.slow
def test_forward_returns_three_candidates_ious_and_object_scores(sampler):
    torch.manual_seed(0)
    model = build_training_network("tiny", image_size=SIZE, trainable="all")
    batch = sampler.sample(2)
    masks = torch.cat([batch["support_masks"], ~batch["support_masks"]], dim=2)  # K = 2 objects
    prompts = PromptSampler(box_probability=1.0, generator=torch.Generator().manual_seed(0))
    query_masks = torch.cat([batch["query_masks"], ~batch["query_masks"]], dim=2)
    box = prompts(query_masks[:, 1].flatten(0, 1))
    out = model(batch["support_images"], masks, batch["query_images"], [None, box, None])
    assert len(out["multimask_logits"]) == 3
    assert out["multimask_logits"][0].shape == (4, 3, SIZE, SIZE)  # B*K tracks, 3 candidates
    assert out["multimask_logits"][1].shape == (4, 1, SIZE, SIZE)  # a box gives one mask, as in SAM2
    assert out["ious"][0].shape == (4, 3) and out["object_score_logits"][2].shape == (4, 1)
    loss = ICLSAM2Loss()(out, query_masks)
    assert set(loss) == {"loss", "focal", "dice", "iou", "class"} and torch.isfinite(loss["loss"])


@pytest.mark.slow
def test_freezing_and_parameter_groups(sampler):
    model = build_training_network("tiny", image_size=SIZE, trainable="all")
    model.set_trainable("frozen")
    batch = sampler.sample(1)
    out = model(batch["support_images"], batch["support_masks"], batch["query_images"])
    ICLSAM2Loss()(out, batch["query_masks"])["loss"].backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.memory_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.memory_attention.parameters())
    assert {g["name"] for g in model.param_groups(1e-4)} == {"rest", "rest_no_decay"}
    model.set_trainable("neck")
    assert not any(p.requires_grad for p in model.image_encoder.trunk.parameters())
    assert all(p.requires_grad for p in model.image_encoder.neck.parameters())
    model.set_trainable("all")
    groups = {g["name"]: g for g in model.param_groups(1e-4, encoder_lr=1e-5)}
    assert groups["image_encoder"]["lr"] == 1e-5 and groups["rest"]["lr"] == 1e-4
    assert groups["rest_no_decay"]["weight_decay"] == 0.0
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="Unknown trainable group .some."):
        model.set_trainable("some")


def test_loss_follows_sam2_recipe():
    loss = ICLSAM2Loss()
    target = torch.zeros(1, 1, 1, 8, 8, dtype=torch.bool)
    target[..., 2:6, 2:6] = True
    good = torch.where(target[0, 0], 10.0, -10.0).float()[:, None]  # (1, 1, 8, 8)
    bad = -good
    # best of three: the loss only sees the best candidate, whichever slot it is in
    outs = [
        {
            "multimask_logits": [torch.cat([bad, good, bad], 1)],
            "ious": [torch.tensor([[0.0, 1.0, 0.0]])],
            "object_score_logits": [torch.tensor([[10.0]])],
        },
        {
            "multimask_logits": [torch.cat([bad, bad, good], 1)],
            "ious": [torch.tensor([[0.0, 0.0, 1.0]])],
            "object_score_logits": [torch.tensor([[10.0]])],
        },
    ]
    a, b = loss(outs[0], target), loss(outs[1], target)
    assert torch.allclose(a["loss"], b["loss"]) and a["focal"] < 1e-4 and a["dice"] < 0.05 and a["iou"] < 1e-4
    worst = loss(
        {
            "multimask_logits": [bad.repeat(1, 3, 1, 1)],
            "ious": [torch.ones(1, 3)],
            "object_score_logits": [torch.tensor([[-10.0]])],
        },
        target,
    )
    assert worst["loss"] > 10 * a["loss"] + 1
    # an absent object: no mask or IoU loss, only the object score is trained
    empty = torch.zeros_like(target)
    absent = loss(outs[0], empty)
    assert absent["focal"] == 0 and absent["dice"] == 0 and absent["iou"] == 0 and absent["class"] > 5


def test_prompt_sampler():
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 10:20, 30:40] = True
    masks[1, 40:60, 5:25] = True
    g = torch.Generator().manual_seed(0)
    clicks = PromptSampler(click_probability=1.0, generator=g)(masks)
    for i in range(2):
        x, y = clicks["point_coords"][i, 0].long().tolist()
        assert masks[i, y, x] and clicks["point_labels"][i, 0] == 1
    assert clicks["point_labels"][2, 0] == -1  # absent object: padding
    boxes = PromptSampler(box_probability=1.0, box_jitter=20, generator=g)(masks)
    assert boxes["point_labels"][0].tolist() == [2, 3]
    exact = torch.tensor([[30.0, 10.0], [39.0, 19.0]])
    assert (boxes["point_coords"][0] - exact).abs().max() <= 20
    assert PromptSampler(generator=g)(masks) is None
    with pytest.raises(ValueError, match="sum to at most 1"):
        PromptSampler(click_probability=0.8, box_probability=0.5)


@pytest.mark.slow
def test_loss_falls_on_a_tiny_in_context_task(sampler):
    torch.manual_seed(0)
    model = build_training_network("tiny", image_size=SIZE, trainable="all")
    model.set_trainable("all")
    optimizer = torch.optim.AdamW(model.param_groups(1e-3), lr=1e-3)
    loss_fn = ICLSAM2Loss()
    losses = []
    for _ in range(40):
        batch = sampler.sample(4)
        loss = loss_fn(
            model(batch["support_images"], batch["support_masks"], batch["query_images"]), batch["query_masks"]
        )["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-8:]) / 8
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first


def test_episodes_share_slices_across_classes():
    volumes = [make_phantom((16, SIZE, SIZE), seed=i) for i in range(3)]
    classes = list(PHANTOM_LABELS.values())
    sampler = EpisodeSampler(
        volumes, classes, num_support=3, num_query=4, image_size=SIZE, objects_per_episode=3, seed=1
    )
    batch = sampler.sample(2)
    assert batch["support_images"].shape == (2, 3, 3, SIZE, SIZE)
    assert batch["support_masks"].shape == (2, 3, 3, SIZE, SIZE) and batch["support_masks"].dtype == torch.bool
    assert batch["query_images"].shape == (2, 4, 3, SIZE, SIZE) and batch["query_masks"].shape == (2, 4, 3, SIZE, SIZE)
    for b in range(2):
        # every class has support foreground, and the classes do not overlap
        assert batch["support_masks"][b].flatten(2).any(-1).any(0).all()
        assert batch["support_masks"][b].sum(1).max() <= 1
        assert batch["query_masks"][b].any()
    with pytest.raises(ValueError, match="objects_per_episode must be between 1 and 3"):
        EpisodeSampler(volumes, classes, 2, 2, SIZE, objects_per_episode=4)
    with pytest.raises(ValueError, match="at least two volumes"):
        EpisodeSampler(volumes[:1], classes, 2, 2, SIZE)
