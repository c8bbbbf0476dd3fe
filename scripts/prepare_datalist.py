"""Write a datalist JSON (Medical Segmentation Decathlon form) for a dataset folder.

    python scripts/prepare_datalist.py --dataset_dir /data/kits23/dataset --preset kits23 --output datalist.json
    python scripts/prepare_datalist.py --dataset_dir /data/Task01_BrainTumour --preset msd --channel 0 --output b.json
    python scripts/prepare_datalist.py --dataset_dir /data/own --preset generic --labels '{"kidney": 1}' --output g.json
    python scripts/prepare_datalist.py --dataset_dir /data --preset json --datalist medsam2.json --output out.json

The output format (MSD form, read by :func:`monai.data.load_decathlon_datalist`), the
presets (folder layouts), label merges and multi-channel images are described in
:mod:`model_core.io.datalist`, which builds and writes the datalist; this is its command line.
"""

from __future__ import annotations

import json
import sys

import fire

from model_core.io.datasets import make_datalist
from model_core.io.datalist import write_datalist


def main(
    dataset_dir: str | None = None,
    preset: str = "generic",
    output: str = "datalist.json",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    relative: bool | str = True,
    channel: int | None = None,
    labels: dict | str | None = None,
    datalist: str | None = None,
    name: str | None = None,
) -> None:
    """Build the datalist (arguments as :func:`make_datalist`), write it to ``output`` and print a summary."""
    result = make_datalist(dataset_dir, preset, output=output, val_fraction=val_fraction, test_fraction=test_fraction,
                           seed=seed, relative=relative, channel=channel, labels=labels, datalist=datalist, name=name)
    path = write_datalist(result, output)
    print(json.dumps({"output": str(path), "name": result["name"], "preset": result["preset"],
                      "labels": result["labels"], "num_training": result["num_training"],
                      "num_validation": result["num_validation"], "num_test": result["num_test"]}))


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except ValueError as e:  # a boundary error: say what is wrong, without a traceback
        sys.exit(f"prepare_datalist: {e}")
