"""``icl-sam2 demo``, the README's first command, on short settings."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from model_core.io.mricron import available

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, env=env, check=check, timeout=1200)


@pytest.mark.slow
def test_main_job_runs_the_bundle_end_to_end(tmp_path, icl_sam2_command):
    """The README's first command (short settings): train, evaluate, infer and the real-MRI evaluation."""
    out = _run(
        *icl_sam2_command,
        "demo",
        "--steps",
        "4",
        "--epochs",
        "2",
        "--image_size",
        "64",
        "--bundle_root",
        str(tmp_path / "bundle"),
    ).stdout
    assert "-m monai.bundle run training --config_file bundle/configs/train.json" in out  # each step shown as a command
    assert "Held-out phantoms" in out
    for model in ("untrained", "trained"):
        rows = [line.split() for line in out.splitlines() if line.strip().startswith(f"{model} ")]
        assert [r[1] for r in rows][:4] == ["blob", "tube", "block", "mean"]
        assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)  # Dice
    labels = sorted((tmp_path / "bundle" / "outputs" / "inference").glob("*_seg.nii.gz"))
    assert len(labels) == 2 and len(list(labels[0].parent.glob("*_confidence.json"))) == 2
    assert (tmp_path / "bundle" / "models" / "model_final.pt").exists()
    assert ("Real T1 MRI" in out) == available()
