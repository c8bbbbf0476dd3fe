"""Training speed and peak memory of the bundle's train.json: steps per second, to size a run (e.g. KiTS23).

    # what benchmark_gpu.sh runs: Hiera-tiny at 512 px, bf16 autocast, 300 steps of the bundle's episode sizes
    PYTHONPATH=$PWD python scripts/benchmark_training.py --device cuda --steps 300 --output training.json
    # a CPU smoke run (seconds): the tiny preset at 64 px
    PYTHONPATH=$PWD python scripts/benchmark_training.py --device cpu --preset tiny --image_size 64 --steps 3 --warmup 1

The run is the bundle's own (``monai.bundle.ConfigWorkflow`` on ``train.json``) with its
defaults for what an episode holds (``num_support`` 4, ``num_query`` 8, ``batch_size`` 2,
``objects_per_episode`` 1; ``train_encoder`` frozen unless ``--train_encoder``), on generated
phantoms (:func:`model_core.io.phantoms.write_phantom_dataset`), validation off. ``precision``
is train.json's: ``bf16`` trains under bfloat16 autocast (Ignite's ``amp`` on CUDA).
Reported: the median step time after ``warmup`` steps as steps/s (and episodes/s), the
total time, and the peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak resident set on a CPU. One table is printed; ``--output`` writes it as JSON.
"""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from model_core.io.files import atomic_path
from model_core.io.phantoms import write_phantom_dataset
from model_core.modeling.precision import cpu_bf16_capability

ROOT = Path(__file__).resolve().parents[1]


def main(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int = 512,
    precision: str = "bf16",
    steps: int = 300,
    warmup: int = 10,
    train_encoder: str = "frozen",
    volumes: int = 4,
    depth: int = 32,
    device: str | None = None,
    threads: int | None = None,
    output: str | None = None,
) -> dict:
    """Args:
    preset, image_size: the model (random initial weights: the speed does not depend on them).
    precision: train.json's ``precision`` (``bf16``, ``fp32`` or ``auto``).
    steps: training steps (batches of ``batch_size`` episodes); warmup: steps left out of the median.
    train_encoder: train.json's ``train_encoder`` (``frozen``, ``all``, ...).
    volumes, depth: the phantom training set (128 x 128 slices, resized to ``image_size`` by the bundle).
    device: ``cpu`` or ``cuda`` (default: cuda when available).
    threads: torch CPU threads.
    output: JSON file to write.
    """
    if int(steps) < 1 or int(warmup) < 0 or int(warmup) >= int(steps):
        raise ValueError(f"steps must be at least 1 and warmup in [0, steps), got steps={steps}, warmup={warmup}.")
    if threads:
        torch.set_num_threads(int(threads))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    stamps: list[float] = []
    batch_size = int(json.loads((ROOT / "bundle/configs/train.json").read_text())["batch_size"])
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_phantom_dataset(f"{tmp}/data", train=volumes, validation=1, test=0, shape=(depth, 128, 128))
        workflow = ConfigWorkflow(
            config_file=str(ROOT / "bundle/configs/train.json"),
            workflow_type="train",
            datalist_file=datalist,
            bundle_root=tmp,
            ckpt_dir=f"{tmp}/models",
            output_dir=f"{tmp}/out",
            preset=preset,
            image_size=int(image_size),
            precision=precision,
            train_encoder=train_encoder,
            classes=[1, 2, 3],
            max_epochs=1,
            episodes_per_epoch=int(steps) * batch_size,
            val_interval=10**6,
            device=f"$torch.device('{device}')",
            **{"intensity#window": [0, 1]},
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.ITERATION_STARTED(once=1), lambda _: stamps.append(time.perf_counter()))

        def stamp(_):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        workflow.run()
        settings = {
            k: workflow.parser.get_parsed_content(k) for k in ("num_support", "num_query", "objects_per_episode")
        }
        workflow.finalize()
    step_times = [b - a for a, b in itertools.pairwise(stamps)]
    timed = step_times[int(warmup) :]
    median = statistics.median(timed)
    if device.startswith("cuda"):
        peak, measure = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak, measure = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    cpu = cpu_bf16_capability()
    record = {
        "preset": preset,
        "image_size": int(image_size),
        "precision": precision,
        "train_encoder": train_encoder,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu["processor"],
        "cpu": {k: cpu[k] for k in ("processor", "amx_bf16", "avx512_bf16")},
        "threads": torch.get_num_threads(),
        "steps": len(step_times),
        "warmup": int(warmup),
        "batch_size": batch_size,
        **settings,
        "median_step_s": median,
        "steps_per_s": 1 / median,
        "episodes_per_s": batch_size / median,
        "total_s": sum(step_times),
        "peak_memory_mib": peak,
        "memory_measure": measure,
    }
    print(
        f"\n{preset} at {image_size} px, {precision}, encoder {train_encoder}, on {device} ({record['device_name']}, "
        f"{record['threads']} threads); episodes of {settings['num_support']} support + {settings['num_query']} "
        f"query slices, {settings['objects_per_episode']} object(s), batch {batch_size}"
    )
    header = f"{'steps':>7}{'median step (s)':>17}{'steps/s':>10}{'episodes/s':>12}{'total (s)':>11}{'peak MiB':>11}"
    print(header)
    print("-" * len(header))
    print(
        f"{record['steps']:>7}{median:>17.3f}{record['steps_per_s']:>10.2f}{record['episodes_per_s']:>12.2f}"
        f"{record['total_s']:>11.1f}{peak:>11.0f}   ({measure})"
    )
    if output:
        with atomic_path(output) as tmp_file, open(tmp_file, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {output}")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
