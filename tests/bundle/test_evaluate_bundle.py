"""Evaluation through the bundle: full volumes, Dice/NSD/HD95 with MONAI's metrics, per-case CSVs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_core.io.phantoms import write_phantom_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[2]

COMMON = ["--preset", "tiny", "--image_size", "64", "--intensity#window", "[0,1]", "--classes", "[1,2,3]"]
CONFIGS = "['bundle/configs/train.json','bundle/configs/evaluate.json']"


pytestmark = pytest.mark.slow  # monai.bundle runs in subprocesses


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    datalist = make_dataset(str(root / "data"), train=3, validation=2, test=0, shape=(12, 64, 64))
    _run(
        "training",
        "--config_file",
        "bundle/configs/train.json",
        "--datalist_file",
        datalist,
        *COMMON,
        "--max_epochs",
        "1",
        "--episodes_per_epoch",
        "4",
        "--num_support",
        "2",
        "--num_query",
        "3",
        "--train_encoder",
        "all",
        "--ckpt_dir",
        str(root / "models"),
        "--output_dir",
        str(root / "train"),
    )
    return datalist, root


def test_evaluation_writes_per_case_and_summary_metrics(trained):
    datalist, root = trained
    out_dir = root / "metrics"
    result = _run(
        "--config_file",
        CONFIGS,
        "--datalist_file",
        datalist,
        *COMMON,
        "--ckpt_dir",
        str(root / "models"),
        "--output_dir",
        str(out_dir),
    )
    assert "val_mean_dice" in result.stderr + result.stdout
    with open(out_dir / "val_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    validation = json.loads(Path(datalist).read_text())["validation"]
    assert len(rows) == len(validation)  # one row per case
    assert {"class0", "class1", "class2", "mean"} <= set(rows[0])  # per class
    for name in ("val_mean_dice", "val_nsd", "val_hd95"):
        assert (out_dir / f"{name}_summary.csv").exists()
    for row in rows:
        assert 0.0 <= float(row["mean"]) <= 1.0


def test_class_absent_from_support_is_a_clear_error(trained):
    datalist, root = trained
    out = _run(
        "--config_file",
        CONFIGS,
        "--datalist_file",
        datalist,
        *COMMON[:-2],
        "--classes",
        "[1,9]",
        "--ckpt_dir",
        str(root / "models"),
        "--output_dir",
        str(root / "bad"),
        check=False,
    )
    assert out.returncode != 0
    assert "Class 9 is absent from the support set" in out.stderr
