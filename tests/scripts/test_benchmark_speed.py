"""The speed benchmarks of issue 21 run as their docs say (small settings): encoders, challenge cases, training, GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_encoder_benchmark_times_each_backend_and_reports_autos_choice(tmp_path, run_script):
    out = tmp_path / "encoders.json"
    done = run_script(
        "benchmark_encoders.py",
        *("--models", "tiny", "--backends", "torch,onnxruntime", "--runs", "1", "--warmup", "0"),
        *("--cache_dir", str(tmp_path / "cache"), "--output", str(out)),
    )
    report = json.loads(out.read_text())
    cells = report["results"]["tiny"]["backends"]
    assert cells["torch"]["ms_per_slice"] > 0 and cells["onnxruntime"]["max_abs_diff_vs_torch_fp32"] < 1e-3
    assert report["results"]["tiny"]["auto"]["chosen"] in report["results"]["tiny"]["auto"]["seconds_per_slice"]
    assert f"CPU: {report['cpu']['processor']}" in done.stdout and "auto chooses" in done.stdout


def test_training_benchmark_reports_steps_per_second_and_peak_memory(tmp_path, run_script):
    out = tmp_path / "training.json"
    run_script(
        "benchmark_training.py",
        *("--device", "cpu", "--preset", "tiny", "--image_size", "64", "--precision", "fp32"),
        *("--steps", "2", "--warmup", "1", "--volumes", "2", "--depth", "8", "--output", str(out)),
    )
    record = json.loads(out.read_text())
    assert record["steps"] == 2 and record["steps_per_s"] > 0 and record["peak_memory_mib"] > 0
    assert (record["num_support"], record["num_query"], record["batch_size"]) == (4, 8, 2)  # the bundle's episodes


def test_challenge_benchmark_times_cases_and_compares_answers(tmp_path, run_script):
    out = tmp_path / "challenge.json"
    done = run_script(
        "benchmark_challenge.py",
        *("--cases", "1", "--extent", "3,3", "--configs", "torch:1,onnxruntime:2", "--output", str(out)),
        timeout=1800,
    )
    report = json.loads(out.read_text())
    slow, fast = report["rows"]
    assert slow["config"] == "torch:1" and slow["precision"] == "fp32" and slow["median_s"] > 0
    assert fast["config"] == "onnxruntime:2" and fast["dice_vs_reference_min"] >= 0.99
    assert "median s" in done.stdout and report["cpu"]["processor"] in done.stdout


def test_gpu_script_smoke_run_on_a_cpu(tmp_path):
    """``SMOKE=1 bash scripts/benchmark_gpu.sh``: the compiled comparison with Meta's vos_optimized predictor and the
    training run, at the tiny size on a CPU (the GPU run is the same commands at Hiera-tiny 512)."""
    # PYTHON: this interpreter (the script's default is the GPU machine's python3)
    env = {**os.environ, "SMOKE": "1", "SECTIONS": "compiled training", "TQDM_DISABLE": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "scripts/benchmark_gpu.sh", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "icl.jsonl").read_text().splitlines()]
    # bf16 on a CPU at random weights: measured mask IoU 0.989 against Meta's predictor on this AMD EPYC (the
    # script's own agreement flag asks 0.99, for the GPU run); the smoke run checks the plumbing and a close answer
    assert len(records) == 1 and records[0]["mask_iou"] >= 0.97, records
    assert (records[0]["compile"], records[0]["reference_predictor"]) == ("max-autotune", "SAM2VideoPredictorVOS")
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 3
    assert "exit" not in (tmp_path / "log.txt").read_text()
