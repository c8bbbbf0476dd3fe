"""``icl-sam2 coco``: export, verify (exit status 1 on a mismatch) and a bad argument, through the command's main();
once more as the installed command in a real process (slow: the process imports MONAI)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from icl_sam2.cli import main
from model_core.io.phantoms import write_phantom_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_export_then_verify_from_the_command_line(tmp_path, capsys):
    datalist = write_phantom_dataset(tmp_path / "data", train=1, validation=0, test=0, shape=(6, 16, 16))
    out = tmp_path / "coco"
    main(
        [
            "coco",
            "export",
            "--datalist",
            datalist,
            "--output_dir",
            str(out),
            "--encoding",
            "polygon",
            "--window",
            "[0,1]",
            "--include_empty",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["training"]
    assert summary["images"] == 6 and summary["categories"] == 3 and Path(summary["json"]).is_file()
    assert len(list((out / "training").glob("*.png"))) == 6

    main(["coco", "verify", "--coco_json", summary["json"]])  # a clean check returns (exit status 0)
    assert json.loads(capsys.readouterr().out)["ok"] is True

    label_path = tmp_path / "data" / "case000_label.nii.gz"
    label = np.asarray(nib.load(label_path).dataobj).copy()
    label[label == 1] = 2  # the blob relabelled as tube
    nib.save(nib.Nifti1Image(label, np.eye(4)), label_path)
    with pytest.raises(SystemExit) as failed:
        main(["coco", "verify", "--coco_json", summary["json"], "--max_mismatches", "2"])
    assert failed.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and len(report["mismatches"]) == 2 < report["mismatch_records"]

    with pytest.raises(SystemExit) as bad:
        main(["coco", "export", "--datalist", datalist, "--output_dir", str(out), "--axis", "oblique"])
    assert bad.value.code == 2 and "icl-sam2: axis='oblique' is unknown" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_runs_as_a_process(tmp_path, icl_sam2_command):
    datalist = write_phantom_dataset(tmp_path / "data", train=1, validation=0, test=0, shape=(6, 16, 16))
    done = subprocess.run(
        [
            *icl_sam2_command,
            "coco",
            "export",
            "--datalist",
            datalist,
            "--output_dir",
            str(tmp_path / "coco"),
            "--window",
            "0,1",
            "--axis",
            "coronal",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])["training"]
    pngs = list((tmp_path / "coco" / "training").glob("*_coronal_*.png"))
    assert summary["images"] > 0 and len(pngs) == summary["images"]
