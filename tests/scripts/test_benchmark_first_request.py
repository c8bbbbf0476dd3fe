"""scripts/benchmark_first_request.py runs as the docs give it (tiny settings) and reports what it claims."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_first_request_benchmark_reports_both_schedules(run_script, tmp_path):
    output = tmp_path / "first_request.json"
    done = run_script(
        "benchmark_first_request.py",
        "--variants",
        "['immediate:64','idle:64']",
        "--preset",
        "tiny",
        "--volumes",
        "3",
        "--shape",
        "[32,32,8]",
        "--output",
        output,
    )
    assert "First request with automatic scoring on" in done.stdout and "CPU " in done.stdout
    rows = {row["scoring"]: row for row in json.loads(output.read_text())}
    for row in rows.values():
        assert row["first_request_s"] > 0 and row["click_after_next_samples_s"] > 0
        assert row["processor"] and "avx512_bf16" in row and "load_average" in row
    assert rows["immediate"]["scoring_runs"] >= 1  # MONAI Label's: a run at start-up, one more per Next Sample
    assert rows["idle"]["scoring_runs"] == 0  # the app's: none while a user works (none at start-up)
