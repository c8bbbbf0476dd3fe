"""``icl-sam2 onnx-export`` and ``scripts/benchmark_onnx.py`` run for real (tiny preset, small size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_sam2.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # this checkout's model_core first (a script's own folder, not the repository, is on sys.path)
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, check=check, timeout=600
    )


@pytest.mark.slow
def test_export_command_writes_a_pair_that_agrees(tmp_path, icl_sam2_command):
    out = subprocess.run(
        [
            *icl_sam2_command,
            "onnx-export",
            "--model",
            "sam2",
            "--preset",
            "tiny",
            "--image_size",
            "64",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    result = json.loads(out[out.index("{") :])
    assert result["opset"] == 18 and result["max_abs_logit_diff"] < 1e-3
    assert Path(result["encoder"]).is_file() and Path(result["decoder"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_decoder.onnx", "tiny_encoder.onnx"]


def test_commands_reject_unknown_models(tmp_path, capsys):
    with pytest.raises(SystemExit) as bad:
        main(["onnx-export", "--model", "medsam2", "--output_dir", str(tmp_path)])
    assert bad.value.code == 2 and "model must be one of sam2, medsam_lite, got 'medsam2'" in capsys.readouterr().err
    refused = _run(
        "scripts/benchmark_onnx.py", "--models", "sam2,lite", "--output", str(tmp_path / "b.json"), check=False
    )
    assert refused.returncode != 0 and "models must name sam2 and/or medsam_lite" in refused.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_benchmark_script_prints_one_table_and_writes_json(tmp_path):
    output = tmp_path / "bench.json"
    out = _run(
        "scripts/benchmark_onnx.py",
        "--models",
        "sam2",
        "--preset",
        "tiny",
        "--image_size",
        "64",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--output",
        str(output),
        "--workdir",
        str(tmp_path),
    ).stdout
    report = json.loads(output.read_text())
    result = report["results"]["tiny"]
    assert result["encoder_ms"]["torch fp32"] > 0 and result["decoder_ms"]["onnxruntime"] > 0
    assert result["max_abs_logit_diff_onnx_vs_torch"] < 1e-3
    rows = [line for line in out.splitlines() if line.startswith("tiny @64")]
    assert [row.split()[2] for row in rows] == ["encoder", "decoder"]
    if not report["cpu"]["bf16"]:  # this CPU has no bf16: said, not timed
        assert result["encoder_ms"]["torch bf16"] is None and "not supported on this CPU" in rows[0]
