"""Where the demo's training time goes: seconds per iteration of the bundle's training loop, per setting.

    python scripts/benchmark_training_step.py --output training_step.json
    python scripts/benchmark_training_step.py --sizes [64] --precisions [fp32] --iterations 3   # a quick check

For each image size x precision x encoder setting (``all``: the image encoder trains, the demo's
recipe; ``frozen``: it does not, and its features are cached), the tiny preset's ``train#trainer``
of ``bundle/configs/train.json`` runs on phantoms with the demo's episode settings (batches of 2
episodes, 3 support and 4 query slices, 3 structures), validation off. The first iterations warm up;
the table gives the median seconds per iteration of the rest (wall clock and this process's CPU time)
and episodes per second. The CPU is named, with its bf16 instructions, because ``precision auto``
picks bf16 where they exist.
"""

from __future__ import annotations

import ast
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import fire
from ignite.engine import Events
from monai.bundle import ConfigParser

from icl_sam2.demo import machine, phantom_training_args
from model_core.io.phantoms import write_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]


def _value(text: str):
    """A command-line value as ``monai.bundle run`` reads it (numbers as numbers, words as strings)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _recipe_overrides() -> dict:
    """The demo's recipe (``phantom_training_args``) as config overrides."""
    args = phantom_training_args(steps=2, epochs=1)
    return {args[i][2:]: _value(args[i + 1]) for i in range(0, len(args), 2)}


def time_loop(tmp: str, size: int, precision: str, encoder: str, iterations: int, warmup: int) -> dict:
    datalist = write_phantom_dataset(f"{tmp}/phantoms_{size}", train=4, validation=1, test=0, shape=(24, size, size))
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    overrides = {
        **{k: v for k, v in _recipe_overrides().items() if k not in ("episodes_per_epoch", "max_epochs")},
        "bundle_root": tmp,
        "ckpt_dir": f"{tmp}/models_{size}_{precision}_{encoder}",
        "output_dir": f"{tmp}/out",
        "preset": "tiny",
        "image_size": size,
        "datalist_file": datalist,
        "classes": [1, 2, 3],
        "intensity#window": [0, 1],
        "precision": precision,
        "train_encoder": encoder,
        "feature_cache_slices": 10000 if encoder == "frozen" else 0,
        "episodes_per_epoch": 2 * (iterations + warmup),
        "max_epochs": 1,
        "val_interval": 10**6,
    }
    if encoder == "frozen":
        overrides["encoder_learning_rate"] = overrides["learning_rate"]
    for key, value in overrides.items():
        parser[key] = value
    trainer = parser.get_parsed_content("train#trainer")
    marks: list[tuple[float, float]] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: marks.append((time.perf_counter(), time.process_time()))
    )
    start = (time.perf_counter(), time.process_time())
    trainer.run()
    points = [start, *marks][warmup:]
    wall = [b[0] - a[0] for a, b in itertools.pairwise(points)]
    cpu = [b[1] - a[1] for a, b in itertools.pairwise(points)]
    step = statistics.median(wall)
    return {
        "image_size": size,
        "precision": precision,
        "encoder": encoder,
        "iterations": len(wall),
        "s_per_iteration": round(step, 4),
        "cpu_s_per_iteration": round(statistics.median(cpu), 4),
        "episodes_per_s": round(2 / step, 2),
    }


def main(
    sizes=(64, 96),
    precisions=("fp32", "bf16"),
    encoders=("all", "frozen"),
    iterations: int = 20,
    warmup: int = 3,
    output: str | None = None,
) -> list[dict]:
    """Args:
    sizes: image sizes of the tiny preset.
    precisions: ``fp32``, ``bf16`` (emulated, and slow, on CPUs without bf16 instructions).
    encoders: ``all`` (the encoder trains: the demo) and ``frozen`` (features cached).
    iterations: timed iterations per setting (after ``warmup``).
    output: a JSON file for the rows and the machine.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for precision in precisions:
                for encoder in encoders:
                    rows.append(time_loop(tmp, int(size), precision, encoder, int(iterations), int(warmup)))
                    print(json.dumps(rows[-1]), flush=True)
    cpu = machine()
    print(f"\n{cpu['processor']}, {cpu['cores']} cores, AVX512-BF16 {cpu['avx512_bf16']}, AMX-BF16 {cpu['amx_bf16']}")
    print(f"{'size':>5} {'precision':>9} {'encoder':>8} {'s/iter':>8} {'CPU s/iter':>10} {'episodes/s':>10}")
    for r in rows:
        print(
            f"{r['image_size']:>5} {r['precision']:>9} {r['encoder']:>8} {r['s_per_iteration']:>8.3f} "
            f"{r['cpu_s_per_iteration']:>10.3f} {r['episodes_per_s']:>10.2f}"
        )
    if output:
        Path(output).write_text(json.dumps({"machine": cpu, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    fire.Fire(main)
