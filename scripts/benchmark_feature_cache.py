"""Training speed with and without the frozen-encoder feature cache, through the bundle's train.json.

    python scripts/benchmark_feature_cache.py                       # sam2.1_hiera_tiny at 256 px, CPU
    python scripts/benchmark_feature_cache.py --image_size 512 --device cuda

Both runs train the same config (image encoder frozen, the default) on phantoms for
``epochs`` epochs; one sets ``feature_cache_slices``. The first epoch fills the
cache, later ones reuse it; the cache hit rate and the time per iteration of each
epoch are printed. Validation is off so only training is timed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import fire
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from model_core.io.phantoms import write_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]


def _train(datalist: str, workdir: str, cache_slices: int, **overrides) -> tuple[list[float], float]:
    """Seconds per iteration of each epoch, and the cache hit rate over the run."""
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "bundle/configs/train.json"),
        workflow_type="train",
        datalist_file=datalist,
        bundle_root=workdir,
        ckpt_dir=f"{workdir}/models",
        output_dir=f"{workdir}/out",
        feature_cache_slices=cache_slices,
        **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    per_epoch: list[float] = []
    start = [0.0]
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: start.__setitem__(0, time.perf_counter()))
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: per_epoch.append((time.perf_counter() - start[0]) / e.state.epoch_length)
    )
    workflow.run()
    workflow.finalize()
    cache = workflow.parser.get_parsed_content("network").feature_cache
    hit_rate = cache.hits / max(cache.hits + cache.misses, 1) if cache is not None else 0.0
    return per_epoch, hit_rate


def main(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int = 256,
    epochs: int = 3,
    iterations: int = 10,
    volumes: int = 4,
    depth: int = 16,
    device: str | None = None,
    threads: int | None = None,
) -> None:
    """Args:
    preset, image_size: the model (random weights).
    epochs, iterations: training length (iterations of 2 episodes per epoch).
    volumes, depth: phantom training set (volumes x depth slices is what the cache can hold).
    device: ``cpu`` or ``cuda`` (default: cuda when available).
    threads: torch CPU threads.
    """
    if threads:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_phantom_dataset(f"{tmp}/data", train=volumes, validation=1, test=0, shape=(depth, 96, 96))
        settings = dict(
            preset=preset,
            image_size=image_size,
            classes=[1, 2, 3],
            objects_per_episode=3,
            batch_size=2,
            episodes_per_epoch=2 * iterations,
            max_epochs=epochs,
            val_interval=10**6,
            device=f"$torch.device('{device}')",
            **{"intensity#window": [0, 1]},
        )
        results = {}
        for name, slices in (("no cache", 0), ("feature cache", volumes * depth)):
            results[name] = _train(datalist, f"{tmp}/{name.replace(' ', '_')}", slices, **settings)
    print(
        f"\n{preset} at {image_size} px on {device}, encoder frozen, {iterations} iterations x {epochs} epochs, "
        f"{volumes} volumes x {depth} slices"
    )
    for name, (per_epoch, hit_rate) in results.items():
        epochs_text = "  ".join(f"{t:.3f}" for t in per_epoch)
        print(f"  {name:<14} s/iteration by epoch: {epochs_text}   cache hit rate {hit_rate:.0%}")
    base, cached = results["no cache"][0], results["feature cache"][0]
    print(f"  speed-up in the last epoch: {base[-1] / cached[-1]:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
