"""Train the tiny preset on generated phantoms and report held-out in-context Dice.

The learning check of model_core (and the README's demo until the bundle drives
it): several phantom volumes hold three structures of different shapes and
intensities; every episode asks for one of them, shown only by the support set.
Held-out volumes are segmented whole (every slice), in context, and scored with
3D Dice per structure. Prints the loss/Dice curve as it goes.

    python scripts/train_phantoms.py            # 2000 steps, about 12 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import math
import time

import fire
import torch

from model_core import MemoryPolicy, PromptSampler, build_icl_sam2, save_checkpoint
from model_core.episodes import EpisodeSampler, evaluate_in_context
from model_core.losses import ICLSAM2Loss
from model_core.phantoms import PHANTOM_LABELS, make_phantom


def warmup_cosine(progress: float, warmup: float = 0.05) -> float:
    """LR factor at ``progress`` in [0, 1] of the budget: linear warm-up, then cosine to 0."""
    if progress < warmup:
        return 0.01 + 0.99 * progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min((progress - warmup) / (1 - warmup), 1.0)))


def main(
    minutes: float = 20.0,
    max_steps: int = 2000,
    image_size: int = 96,
    depth: int = 24,
    train_volumes: int = 8,
    test_volumes: int = 3,
    batch_size: int = 2,
    objects_per_episode: int = 3,
    num_support: int = 3,
    num_query: int = 4,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    eval_every_minutes: float = 2.5,
    train_encoder: str = "all",
    click_probability: float = 0.0,
    box_probability: float = 0.0,
    policy: str = "recent",
    seed: int = 0,
    threads: int | None = None,
    save: str | None = None,
) -> dict:
    """Train and evaluate; returns (and prints as JSON) the final numbers.

    Args:
        max_steps: training steps; the LR schedule runs over them, so the result does
            not depend on the machine's speed (2000 steps took 11-14 min on 2 CPU cores).
        minutes: wall-clock cap on training (evaluation excluded); the schedule follows
            whichever of steps or time runs out first.
        image_size: model input size (phantoms are generated at this size).
        depth: slices per phantom volume.
        train_volumes, test_volumes: phantoms to train on / hold out.
        batch_size: episodes per step.
        objects_per_episode: classes per episode, sharing its slices (so that only the
            support masks tell the tracks apart).
        num_support, num_query: support slices and query slices per episode.
        lr: AdamW learning rate (warm-up then cosine to 0 over the time budget).
        weight_decay: AdamW weight decay.
        grad_clip: gradient max-norm (SAM2 uses 0.1 when fine-tuning; from random
            weights a larger one trains faster).
        eval_every_minutes: held-out evaluation interval.
        train_encoder: ``frozen``, ``neck`` or ``all`` (the tiny preset has random weights: train it).
        click_probability, box_probability: chance that a query slice gets a click or a
            box (MedSAM-style jitter of up to 20 px) during training.
        policy: memory policy for evaluation.
        seed: random seed.
        threads: torch CPU threads (default: torch's choice).
        save: optional path of the final checkpoint.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    classes = list(PHANTOM_LABELS.values())
    shape = (depth, image_size, image_size)
    train = [make_phantom(shape, seed=seed * 1000 + i) for i in range(train_volumes)]
    test = [make_phantom(shape, seed=seed * 1000 + 500 + i) for i in range(test_volumes)]
    model = build_icl_sam2("tiny", image_size=image_size)
    model.set_trainable(train_encoder)
    sampler = EpisodeSampler(train, classes, num_support, num_query, image_size, objects_per_episode, seed=seed)
    loss_fn = ICLSAM2Loss()
    prompt_sampler = PromptSampler(click_probability, box_probability, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.param_groups(lr, weight_decay=weight_decay), lr=lr)
    # the schedule follows the fraction of the budget used (time or steps, whichever ends first)
    budget = {"trained": 0.0, "step": 0}

    def progress(_: int) -> float:
        return max(budget["trained"] / (minutes * 60), budget["step"] / max_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: warmup_cosine(progress(i)))
    eval_policy = MemoryPolicy(policy)

    def evaluate() -> tuple[float, dict[int, float]]:
        model.eval()
        scores = evaluate_in_context(model, train[0], test, classes, num_support, policy=eval_policy)
        model.train()
        per_class = {c: sum(v) / len(v) for c, v in scores.items()}
        return sum(per_class.values()) / len(per_class), per_class

    curve = []
    t_eval = time.perf_counter()
    dice0, per_class0 = evaluate()
    print(f"untrained: held-out in-context Dice {dice0:.3f} {per_class0} ({time.perf_counter() - t_eval:.1f}s)", flush=True)
    curve.append({"step": 0, "minutes": 0.0, "dice": dice0})
    model.train()
    trained = 0.0
    next_eval = eval_every_minutes * 60
    step, running = 0, None
    while step < max_steps and trained < minutes * 60:
        t0 = time.perf_counter()
        batch = sampler.sample(batch_size)
        prompts = [prompt_sampler(batch["query_masks"][:, q].flatten(0, 1)) for q in range(num_query)]
        out = model(batch["support_images"], batch["support_masks"], batch["query_images"], prompts)
        losses = loss_fn(out, batch["query_masks"])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        step += 1
        trained += time.perf_counter() - t0
        budget.update(trained=trained, step=step)
        scheduler.step()
        value = float(losses["loss"].detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 25 == 0:
            print(f"step {step:5d}  {trained / 60:5.1f} min  loss {running:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
        if trained >= next_eval:
            next_eval += eval_every_minutes * 60
            dice, per_class = evaluate()
            print(f"step {step:5d}  {trained / 60:5.1f} min  held-out Dice {dice:.3f} {per_class}", flush=True)
            curve.append({"step": step, "minutes": round(trained / 60, 2), "loss": running, "dice": dice})
    if curve[-1]["step"] != step:
        dice, per_class = evaluate()
        curve.append({"step": step, "minutes": round(trained / 60, 2), "loss": running, "dice": dice})
    else:
        dice = curve[-1]["dice"]
    result = {
        "untrained_dice": round(dice0, 4),
        "final_dice": round(dice, 4),
        "final_dice_per_class": {str(c): round(v, 4) for c, v in per_class.items()},
        "steps": step,
        "train_minutes": round(trained / 60, 2),
        "tracks_per_second": round(step * batch_size * objects_per_episode / max(trained, 1e-9), 3),
        "episodes_per_second": round(step * batch_size / max(trained, 1e-9), 3),
        "curve": curve,
    }
    print(f"final: held-out in-context Dice {dice:.3f} (untrained {dice0:.3f}) after {step} steps, {trained / 60:.1f} min")
    print(json.dumps(result))
    if save:
        save_checkpoint(model, save)
        print(f"saved {save}")
    return result


def cli(**kwargs) -> None:
    """Command line entry: same arguments as :func:`main`, prints instead of returning."""
    main(**kwargs)


if __name__ == "__main__":
    fire.Fire(cli)
