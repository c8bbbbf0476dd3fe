"""scripts/nifti_to_coco.py: export, verify (exit status 1 on a mismatch) and a bad argument, through its main();
once more as a real process (slow: the process imports MONAI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model_core.io.phantoms import write_phantom_dataset
from scripts.nifti_to_coco import main

ROOT = Path(__file__).resolve().parents[2]


def test_export_then_verify_from_the_command_line(tmp_path, capsys):
    datalist = write_phantom_dataset(tmp_path / "data", train=1, validation=0, test=0, shape=(6, 16, 16))
    out = tmp_path / "coco"
    main(["export", "--datalist", datalist, "--output_dir", str(out), "--encoding", "polygon", "--window", "[0,1]",
          "--include_empty"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["training"]
    assert summary["images"] == 6 and summary["categories"] == 3 and Path(summary["json"]).is_file()
    assert len(list((out / "training").glob("*.png"))) == 6

    main(["verify", "--coco_json", summary["json"]])  # a clean check returns (exit status 0)
    assert json.loads(capsys.readouterr().out)["ok"] is True

    label_path = tmp_path / "data" / "case000_label.nii.gz"
    label = np.asarray(nib.load(label_path).dataobj).copy()
    label[label == 1] = 2  # the blob relabelled as tube
    nib.save(nib.Nifti1Image(label, np.eye(4)), label_path)
    with pytest.raises(SystemExit) as failed:
        main(["verify", "--coco_json", summary["json"], "--max_mismatches", "2"])
    assert failed.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and len(report["mismatches"]) == 2 < report["mismatch_records"]

    with pytest.raises(SystemExit, match="nifti_to_coco: axis='oblique' is unknown"):
        main(["export", "--datalist", datalist, "--output_dir", str(out), "--axis", "oblique"])


@pytest.mark.slow
def test_the_script_runs_as_a_process(tmp_path):
    datalist = write_phantom_dataset(tmp_path / "data", train=1, validation=0, test=0, shape=(6, 16, 16))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's model_core, not an installed one
    done = subprocess.run([sys.executable, "scripts/nifti_to_coco.py", "export", "--datalist", datalist,
                           "--output_dir", str(tmp_path / "coco"), "--window", "0,1", "--axis", "coronal"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])["training"]
    pngs = list((tmp_path / "coco" / "training").glob("*_coronal_*.png"))
    assert summary["images"] > 0 and len(pngs) == summary["images"]
