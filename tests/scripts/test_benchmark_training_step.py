"""scripts/benchmark_training_step.py runs the bundle's training loop per setting and names the CPU (small settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_benchmark_times_each_setting_and_names_the_cpu(tmp_path):
    output = tmp_path / "steps.json"
    done = subprocess.run(
        [sys.executable, "scripts/benchmark_training_step.py", "--sizes", "[64]", "--precisions", "[fp32]"]
        + ["--encoders", "[all,frozen]", "--iterations", "2", "--warmup", "1", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert [(r["encoder"], r["iterations"]) for r in result["rows"]] == [("all", 2), ("frozen", 2)]
    assert all(r["s_per_iteration"] > 0 and r["episodes_per_s"] > 0 for r in result["rows"])
    assert result["machine"]["processor"] in done.stdout and "AVX512-BF16" in done.stdout
