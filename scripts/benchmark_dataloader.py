"""Does the bundle's training loop gain from DataLoader workers? Episode loading alone vs a training epoch.

    python scripts/benchmark_dataloader.py --datalist bundle/data/phantoms/datalist.json   # after icl-sam2 demo

For each ``num_workers``: the time to draw one epoch of episode batches from
``train#dataloader`` alone, then the time of one epoch of ``train#trainer`` (tiny preset,
validation off), both through the bundle's own ``train.json``. Workers can at most hide
the loading time, and they take CPU cores from the step.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import fire
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def main(
    datalist: str = "bundle/data/phantoms/datalist.json", workers=(0, 2), image_size: int = 96, episodes: int = 60
) -> list[dict]:
    """Args:
    datalist: a phantom datalist (``icl-sam2 phantoms`` writes one).
    workers: the ``num_workers`` values to compare.
    image_size: the tiny preset's input size.
    episodes: episodes in the timed epoch (batches of 2).
    """
    labels = json.loads(Path(datalist).read_text())["labels"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nw in workers:
            parser = ConfigParser()
            parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
            for key, value in {
                "bundle_root": tmp,
                "ckpt_dir": f"{tmp}/models",
                "output_dir": f"{tmp}/out",
                "preset": "tiny",
                "image_size": image_size,
                "datalist_file": str(Path(datalist).resolve()),
                "classes": sorted(labels.values()),
                "intensity#window": [0, 1],
                "train_encoder": "all",
                "num_support": 3,
                "num_query": 4,
                "objects_per_episode": 3,
                "batch_size": 2,
                "episodes_per_epoch": episodes,
                "max_epochs": 1,
                "val_interval": 10**6,
                "num_workers": int(nw),
            }.items():
                parser[key] = value
            start = time.perf_counter()
            batches = sum(1 for _ in parser.get_parsed_content("train#dataloader"))
            loading = time.perf_counter() - start
            trainer = parser.get_parsed_content("train#trainer")
            start = time.perf_counter()
            trainer.run()
            epoch = time.perf_counter() - start
            rows.append(
                {
                    "num_workers": int(nw),
                    "batches": batches,
                    "loading_s_per_batch": round(loading / batches, 4),
                    "training_s_per_iteration": round(epoch / batches, 3),
                }
            )
            print(
                f"num_workers={nw}: loading alone {loading / batches:.3f} s/batch, "
                f"training {epoch / batches:.3f} s/iteration ({batches} batches)",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    fire.Fire(main)
