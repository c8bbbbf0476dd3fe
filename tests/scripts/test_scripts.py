"""The benchmark scripts and the checkpoint download script run for real (small settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, env=env, check=check, timeout=600)


@pytest.mark.slow
def test_benchmark_compares_with_sam2_and_agrees():
    out = _run(
        sys.executable,
        "scripts/benchmark_icl.py",
        "--preset",
        "tiny",
        "--image_size",
        "64",
        "--depth",
        "6",
        "--support",
        "2",
        "--objects",
        "2",
        "--warmup",
        "0",
    ).stdout
    assert "masks agree: yes" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ours"]["seconds"] > 0 and result["reference"]["seconds"] > 0 and result["max_abs_logit_diff"] <= 1e-3


def test_download_script_lists_every_checkpoint_and_rejects_unknown_names():
    listing = _run("bash", "scripts/download_checkpoints.sh", "--list").stdout
    names = [line.split("\t")[0] for line in listing.strip().splitlines()]
    for name in ["sam2_hiera_tiny", "sam2.1_hiera_large", "MedSAM2_latest", "MedSAM2_pretrain"]:
        assert name in names
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt" in listing
    bad = _run("bash", "scripts/download_checkpoints.sh", "/tmp", "no_such_model", check=False)
    assert bad.returncode == 2 and "sam2.1_hiera_tiny" in bad.stderr + bad.stdout


@pytest.mark.slow
def test_load_test_is_bounded_and_reports_every_figure(tmp_path):
    out = _run(
        sys.executable,
        "scripts/load_test.py",
        "--clients",
        "3",
        "--requests_per_client",
        "2",
        "--images",
        "2",
        "--shape",
        "[8,64,64]",
        "--deadline",
        "300",
        "--workdir",
        str(tmp_path),
    ).stdout
    figures = dict(line.split(": ", 1) for line in (line.strip() for line in out.splitlines()) if ": " in line)
    assert figures["error_count"] == "0", out
    assert "(n=6)" in figures["client_latency"] and "(n=6)" in figures["server_time"]
    for key in ("info_during_burst", "listing_during_burst", "label_upload_during_burst"):
        assert figures[key] != "none", out  # each probe answered at least once while the clients ran
    assert figures["busy_answers_503"] == "0" and figures["sessions_and_reported_mib"].startswith("3 -> 6 sessions"), (
        out
    )
    assert float(figures["reported_per_session_mib"]) > 0 and "growth_per_session_mib" in figures, out
    refused = _run(sys.executable, "scripts/load_test.py", "--url", "http://10.1.2.3:8000", check=False)
    assert refused.returncode != 0 and "must be a loopback address" in refused.stderr + refused.stdout
