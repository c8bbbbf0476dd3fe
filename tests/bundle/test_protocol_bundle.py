"""The CVPR 2025 interactive protocol as a bundle workflow (``train.json + protocol.json``) on phantoms.

With the tiny model trained on phantoms (the ``trained_tiny`` fixture): corrective clicks change the answer,
every file and column is written, and bad cases are failed rows while the others run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from icl_sam2.protocol import run_protocol

pytestmark = pytest.mark.slow


def _overrides(trained_tiny, datalist, output_dir, mode, **more):
    return {
        "datalist_file": str(datalist),
        "support_datalist_file": trained_tiny["datalist"],
        "checkpoint": None if mode == "medsam_lite" else trained_tiny["checkpoint"],
        "output_dir": str(output_dir),
        "protocol#output_dir": str(output_dir),
        "classes": sorted(trained_tiny["labels"].values()),
        "preset": "tiny",
        "image_size": trained_tiny["image_size"],
        "intensity#window": [0, 1],
        "device": "$torch.device('cpu')",
        "protocol#mode": mode,
        **more,
    }


@pytest.fixture(scope="module")
def cases(trained_tiny, tmp_path_factory):
    """The held-out phantoms, plus two bad cases: a label without structure 3, and a label off the image's grid."""
    root = Path(trained_tiny["datalist"]).parent
    folder = tmp_path_factory.mktemp("protocol_cases")
    datalist = json.loads(Path(trained_tiny["datalist"]).read_text())
    good = [{k: str(root / v) for k, v in e.items()} for e in datalist["validation"]]
    label = nib.load(good[0]["label"])
    data = np.asarray(label.dataobj).copy()
    data[data == 3] = 0
    nib.save(nib.Nifti1Image(data, label.affine), str(folder / "no_block_label.nii.gz"))
    nib.save(nib.Nifti1Image(data[:, :-4], label.affine), str(folder / "off_grid_label.nii.gz"))
    entries = [
        *good,
        {"image": good[0]["image"], "label": str(folder / "no_block_label.nii.gz")},
        {"image": good[0]["image"], "label": str(folder / "off_grid_label.nii.gz")},
    ]
    path = folder / "datalist.json"
    path.write_text(json.dumps({"validation": entries}))
    return {"datalist": path, "good": len(good)}


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def interactive(trained_tiny, cases, tmp_path_factory):
    """The interactive mode (a box on the middle slice, then 5 clicks) over the cases: the summary and the CSV."""
    folder = tmp_path_factory.mktemp("protocol_interactive")
    summary = run_protocol(_overrides(trained_tiny, cases["datalist"], folder, "interactive"))
    return {"summary": summary, "rows": _rows(folder / "protocol_interactive.csv"), "folder": folder}


def test_every_file_and_column_is_complete_and_bad_cases_are_failed_rows(interactive, cases):
    summary, rows = interactive["summary"], interactive["rows"]
    assert json.loads((interactive["folder"] / "protocol_interactive_summary.json").read_text()) == summary
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    # 3 structures in each good case, 2 in the one without the block; the off-grid case is one failed row
    assert len(ok) == 3 * cases["good"] + 2
    assert len(failed) == 2 and summary["failed"] == 2
    assert any("absent" in r["error"] and "structure 3" in r["error"] for r in failed)
    assert any("off_grid_label" in r["error"] for r in failed)
    for row in ok:
        for i in range(6):
            assert row[f"dsc_{i}"] != "" and row[f"nsd_{i}"] != "" and row[f"seconds_{i}"] != ""
        assert row["clicks_to_dsc_0.9"] == "not reached" or 0 <= int(row["clicks_to_dsc_0.9"]) <= 5
        clicks = json.loads(row["clicks"])
        assert len(clicks) == 6 and "box" in clicks[0]  # the box, then five clicks
        assert 0 <= float(row["dsc_auc"]) <= 5 and float(row["final_dsc"]) == float(row["dsc_5"])
    initial = np.mean([float(r["dsc_0"]) for r in ok])
    assert summary["DSC"]["per_step"][0] == pytest.approx(initial, abs=1e-3)
    assert len(summary["NSD"]["per_step"]) == 6 and summary["seconds_per_interaction"] > 0


def test_every_click_reaches_the_model_and_changes_its_answer(interactive):
    """The corrections take effect: the answer moves after the clicks in most structures (not whether it improves).

    Whether clicks raise the DSC is the model's quality, not the protocol's, and the tests' model was never trained
    on its prompt-only path (docs/quality.md): trained alike, it went from mean DSC 0.100 after the box to 0.216 after
    5 clicks on an AMD EPYC, and from 0.092 to 0.076 on an Intel Xeon with AMX-BF16, whose arithmetic trained
    another model. A protocol that dropped the clicks, or scored the box's answer again, leaves every row flat.
    """
    ok = [r for r in interactive["rows"] if r["status"] == "ok"]
    moved = [r for r in ok if max(abs(float(r[f"dsc_{i}"]) - float(r["dsc_0"])) for i in range(1, 6)) > 1e-4]
    assert len(moved) >= len(ok) / 2, [[r[f"dsc_{i}"] for i in range(6)] for r in ok]
    initial = np.mean([float(r["dsc_0"]) for r in ok])
    final = np.mean([float(r["dsc_5"]) for r in ok])
    print(f"mean DSC {initial:.3f} after the box, {final:.3f} after 5 clicks; {len(moved)} of {len(ok)} moved")


def test_in_context_then_clicks_and_the_box_only_baseline(trained_tiny, cases, tmp_path):
    datalist = json.loads(cases["datalist"].read_text())
    one = cases["datalist"].with_name("one.json")
    one.write_text(json.dumps({"validation": datalist["validation"][:1]}))
    summary = run_protocol(_overrides(trained_tiny, one, tmp_path, "in_context", **{"protocol#num_clicks": 2}))
    assert summary["scored"] == 3 and summary["failed"] == 0 and summary["initial_prompt"] == "support"
    assert len(summary["DSC"]["per_step"]) == 3 and all(0 <= v <= 1 for v in summary["DSC"]["per_step"])
    summary = run_protocol(_overrides(trained_tiny, one, tmp_path, "medsam_lite", **{"classes": [1]}))
    rows = _rows(tmp_path / "protocol_medsam_lite.csv")
    assert summary["scored"] == 1 and len(rows) == 1 and rows[0]["initial_prompt"] == "box3d"
    assert "dsc_1" not in rows[0] and json.loads(rows[0]["clicks"])[0]["box3d"]  # no corrections
    assert float(rows[0]["dsc_0"]) > 0.5  # LiteMedSAM's real weights find the blob from its 3D box
