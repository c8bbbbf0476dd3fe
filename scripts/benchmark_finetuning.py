"""Fine-tuning options compared through the bundle's train.json: full, frozen encoder, LoRA rank 4 and 16.

    # what the README's table ran (tiny preset, 64 px, CPU; about 23 min on 2 shared, busy cores)
    PYTHONPATH=$PWD python scripts/benchmark_finetuning.py --steps 40 --pretrain_steps 80 --batch_size 1 --num_query 2 \
        --volumes 3 --validation 1 --depth 10 --learning_rate 1e-3 --lora_learning_rate 1e-2 --output finetuning.json
    PYTHONPATH=$PWD python scripts/benchmark_finetuning.py --device cuda     # the defaults: longer runs, batch 2

There is no pretrained SAM2 offline, and fine-tuning a random network says little, so
the base is made first: the tiny preset is trained on phantoms for ``pretrain_steps``
(all of it trains) to segment two structures (blob and tube). Each method then
fine-tunes that base for the same ``steps`` on the third structure (block), which the
base never saw, with the same seed and episodes; the held-out Dice of the block on the
validation phantoms (in context, the support from one training volume) is measured
after fine-tuning, next to the base's own. Trainable parameters come from the
training log's counts, the step time is the median over the run's iterations.

Methods (the ``--trainable`` / ``--lora_*`` options of ``monai.bundle run training``):

- full: ``trainable all``;
- frozen encoder: ``trainable frozen`` (the bundle's default);
- LoRA rank r: ``trainable none``, adapters on ``lora_targets`` (all attention
  projections of Hiera, memory attention and the mask decoder's transformer), trained
  at ``lora_learning_rate`` (LoRA's adapters start at zero and usually take a larger
  rate than full fine-tuning).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from model_core.io.phantoms import PHANTOM_LABELS, write_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["image_encoder.attn", "memory_attention.attn", "mask_decoder.transformer"]


def _workflow(workdir: str, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "bundle/configs/train.json"),
        workflow_type="train",
        bundle_root=workdir,
        ckpt_dir=f"{workdir}/models",
        output_dir=f"{workdir}/out",
        **overrides,
    )
    workflow.initialize()
    return workflow


def _train(workdir: str, **overrides) -> dict:
    """One bundle training run: step times, trainable counts and the final validation Dice (if validated)."""
    workflow = _workflow(workdir, **overrides)
    parser = workflow.parser
    trainer, network = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("network")
    times, start = [], [0.0]
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: start.__setitem__(0, time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter() - start[0]))
    begin = time.perf_counter()
    workflow.run()
    wall = time.perf_counter() - begin
    evaluator = parser.get_parsed_content("validate#evaluator")
    summary = network.trainable_summary()
    workflow.finalize()
    return {
        "trainable_parameters": summary["total"]["trainable"],
        "total_parameters": summary["total"]["total"],
        "lora_parameters": summary["lora"]["total"],
        "steps": len(times),
        "step_s": statistics.median(times[1:] or times),
        "wall_s": wall,
        "dice": float(evaluator.state.metrics["val_mean_dice"]) if evaluator.state.metrics else None,
    }


def _evaluate(workdir: str, **overrides) -> float:
    """Held-out Dice of the network as built (the base), through the bundle's validation."""
    workflow = _workflow(workdir, **overrides)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return float(evaluator.state.metrics["val_mean_dice"])


def _report(result: dict) -> None:
    """The table and the JSON of a run."""
    c = result["settings"]
    print(
        f"\nFine-tuning on phantoms: tiny preset at {c['image_size']} px on {c['device']}, base pretrained "
        f"{c['pretrain_steps']} steps on blob+tube, then {c['steps']} steps (batch {c['batch_size']}, "
        f"{c['num_support']} "
        f"support + {c['num_query']} query slices) on block; held-out Dice of block on {c['validation']} volumes "
        f"(base before fine-tuning: {result['base_dice']:.3f})"
    )
    print(f"  {'method':<18} {'trainable params':>17} {'share':>7} {'s/step':>7} {'Dice':>6}")
    for r in result["rows"]:
        share = r["trainable_parameters"] / (r["total_parameters"] - r["lora_parameters"])
        print(
            f"  {r['method']:<18} {r['trainable_parameters']:>17,} {share:>7.1%} {r['step_s']:>7.3f} {r['dice']:>6.3f}"
        )
    print(json.dumps(result, indent=1))


def main(
    steps: int = 100,
    pretrain_steps: int = 200,
    image_size: int = 64,
    volumes: int = 4,
    validation: int = 2,
    depth: int = 16,
    learning_rate: float = 3e-4,
    lora_learning_rate: float = 3e-3,
    batch_size: int = 2,
    num_query: int = 3,
    device: str = "cpu",
    output: str | None = None,
    workdir: str | None = None,
) -> dict:
    """Args:
        steps: fine-tuning iterations of every method (batches of ``batch_size`` episodes).
        pretrain_steps: iterations that make the base (two structures, everything trains).
        image_size: the tiny preset's input size.
        volumes, validation, depth: phantom training and held-out volumes, slices per volume.
        learning_rate: of full and frozen-encoder fine-tuning (and of pretraining).
        lora_learning_rate: of the LoRA adapters.
        batch_size: episodes per iteration.
        num_query: query slices per episode (2 support slices).
        device: ``cpu`` or ``cuda``.
        output: also write the result as JSON to this file.
        workdir: where data and models go (default a temporary folder, removed afterwards).

    Returns:
        ``{"settings", "base_dice", "rows"}`` (what the JSON holds).
    """
    common = {
        "preset": "tiny",
        "image_size": image_size,
        "intensity#window": [0, 1],
        "num_support": 2,
        "num_query": num_query,
        "objects_per_episode": 1,
        "batch_size": batch_size,
        "grad_clip": 1.0,
        "warmup_fraction": 0.05,
        "device": f"$torch.device('{device}')",
        "num_workers": 0,
    }
    new_class = [PHANTOM_LABELS["block"]]
    methods = {
        "full fine-tuning": {
            "trainable": "all",
            "learning_rate": learning_rate,
            "encoder_learning_rate": learning_rate,
        },
        "frozen encoder": {"trainable": "frozen", "learning_rate": learning_rate},
        **{
            f"LoRA rank {r}": {
                "trainable": "none",
                "lora_rank": r,
                "lora_targets": LORA_TARGETS,
                "learning_rate": lora_learning_rate,
            }
            for r in (4, 16)
        },
    }
    rows = []
    with tempfile.TemporaryDirectory() if workdir is None else contextlib.nullcontext(workdir) as tmp:
        datalist = write_phantom_dataset(
            f"{tmp}/data", train=volumes, validation=validation, test=0, shape=(depth, image_size, image_size)
        )
        print(f"pretraining the base: {pretrain_steps} steps on blob and tube ...", flush=True)
        base = _train(
            f"{tmp}/base",
            datalist_file=datalist,
            classes=[PHANTOM_LABELS["blob"], PHANTOM_LABELS["tube"]],
            trainable="all",
            learning_rate=learning_rate,
            encoder_learning_rate=learning_rate,
            episodes_per_epoch=batch_size * pretrain_steps,
            max_epochs=1,
            val_interval=10**6,
            **common,
        )
        checkpoint = f"{tmp}/base/models/model_final.pt"
        tuned = {
            **common,
            "datalist_file": datalist,
            "classes": new_class,
            "pretrained_checkpoint": checkpoint,
            "episodes_per_epoch": batch_size * steps,
            "max_epochs": 1,
            "val_interval": 1,
        }
        base_dice = _evaluate(f"{tmp}/base_eval", **tuned)
        print(
            f"base: {base['wall_s'] / 60:.1f} min; held-out Dice of the unseen structure before fine-tuning "
            f"{base_dice:.3f}",
            flush=True,
        )
        for name, options in methods.items():
            print(f"{name} ...", flush=True)
            result = _train(f"{tmp}/{name.replace(' ', '_')}", **tuned, **options)
            rows.append({"method": name, **{k: v for k, v in options.items() if k != "lora_targets"}, **result})
            print(f"  {result['step_s']:.3f} s/step, Dice {result['dice']:.3f}", flush=True)
    result = {
        "settings": {
            "preset": "tiny",
            "image_size": image_size,
            "steps": steps,
            "pretrain_steps": pretrain_steps,
            "batch_size": batch_size,
            "num_support": 2,
            "num_query": num_query,
            "volumes": volumes,
            "validation": validation,
            "depth": depth,
            "device": device,
            "learning_rate": learning_rate,
            "lora_learning_rate": lora_learning_rate,
            "lora_targets": LORA_TARGETS,
            "torch_threads": torch.get_num_threads(),
        },
        "base_dice": base_dice,
        "rows": rows,
    }
    _report(result)
    if output:
        Path(output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    fire.Fire(main)
