"""``icl-sam2 protocol`` (the docs' command, on the trained tiny model) and ``icl-sam2 brain-atlas`` at a tiny size,
run as a user runs them: as processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from model_core.io.mricron import T1

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run(command, *args, timeout=1800):
    return subprocess.run(
        [*command, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


def test_the_docs_protocol_command_writes_the_rows_and_the_summary(icl_sam2_command, trained_tiny, tmp_path):
    # docs/quality.md: icl-sam2 protocol --datalist bundle/data/phantoms/datalist.json
    #   --checkpoint bundle/models/model.pt --output_dir bundle/outputs/protocol (after `icl-sam2 demo`)
    done = _run(
        icl_sam2_command,
        "protocol",
        *("--datalist", trained_tiny["datalist"], "--checkpoint", trained_tiny["checkpoint"]),
        *("--output_dir", str(tmp_path), "--num_clicks", "2"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "protocol_interactive_summary.json").read_text())
    assert json.loads(done.stdout[done.stdout.index("{") :]) == summary
    assert summary["scored"] == 6 and summary["failed"] == 0  # 2 held-out phantoms x 3 structures
    assert (tmp_path / "protocol_interactive.csv").read_text().count("\n") == 7


def test_a_mistake_is_one_line_and_exit_code_2(icl_sam2_command, tmp_path):
    done = _run(icl_sam2_command, "protocol", "--datalist", str(tmp_path / "missing.json"), "--mode", "interactive")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("icl-sam2: --datalist") and "Traceback" not in done.stderr
    done = _run(icl_sam2_command, "protocol", "--datalist", str(tmp_path), "--mode", "clicks_only")
    assert done.returncode == 2 and "--mode must be one of" in done.stderr


@pytest.mark.skipif(not T1.is_file(), reason="needs the Debian package mricron-data (apt-get install mricron-data)")
def test_the_brain_atlas_pipeline_at_a_tiny_size(icl_sam2_command, tmp_path):
    """Data, two training steps, the bundle's evaluation, three protocol modes and the box baselines on one
    small held-out structure: the pipeline runs and reports every figure; the figures themselves need the full run."""
    done = _run(
        icl_sam2_command,
        "brain-atlas",
        *("--output_dir", str(tmp_path), "--steps", "2", "--epochs", "1", "--image_size", "64"),
        *("--heldout", '["Amygdala_L"]', "--label_sets", '["aal"]', "--views", '["full","zoom"]'),
        *("--margin", "1", "--num_clicks", "1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "brain_atlas.json").read_text())
    row = result["structures"]["Amygdala_L"]
    for key in ("icl_dice", "icl_nsd", "medsam_box3d_dsc", "medsam_slice_boxes_dsc", "interactive_final_dsc"):
        assert 0.0 <= row[key] <= 1.0, key
    assert len(row["in_context_dsc_per_step"]) == 2 and len(row["medsam_box3d_dsc_per_step"]) == 1
    assert result["machine"]["cpu"] and result["seconds"]["training"] > 0
    assert "| Amygdala_L |" in done.stdout and "| mean |" in done.stdout
    # nothing in the training labels marks the held-out structure
    study = json.loads((tmp_path / "data" / "datalist.json").read_text())
    assert 41 not in study["classes"]  # Amygdala_L in aal.nii.txt
    entry = study["heldout"][0]
    assert len(entry["support_slices"]) == 3 and not set(entry["support_slices"]) & set(entry["query_slices"])
