"""scripts/benchmark_proposals.py runs (tiny preset, one slice) and prints one JSON row per points_per_side."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # a subprocess that imports torch, sam2 and MONAI
def test_benchmark_prints_a_row_per_grid(run_script):
    out = run_script(
        "benchmark_proposals.py",
        "--preset",
        "tiny",
        "--image_size",
        64,
        "--slices",
        1,
        "--points_per_side",
        "[2,3]",
        "--device",
        "cpu",
    ).stdout
    rows = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    assert [r["points_per_side"] for r in rows] == [2, 3]
    assert all(r["seconds_per_slice"] > 0 and r["masks_per_slice"] >= 0 and r["candidates"] >= 0 for r in rows)
