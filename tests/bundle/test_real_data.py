"""The bundle on real MRI: the Colin27 T1 template and its AAL atlas (Debian package mricron-data).

A small study is cut from them by model_core.io.mricron: a support slab and two query
slabs from other heights of the brain, at other in-plane crops and resolutions, stored in other
orientations (one LPS, one with the slice axis first), each with the atlas labels resampled the
same way. Evaluation and inference run through ``monai.bundle run`` with ``--modality MRI`` and
random tiny weights, so what is checked is the plumbing on real data (percentile scaling,
reorientation, resizing and its inverse, metrics, label values, file names), not accuracy.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model_core.io.mricron import ATLAS, NAMES, REGIONS, T1, available, make_study

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not available(),
        reason=f"real-data test needs the Debian package mricron-data ({T1}, {ATLAS}, {NAMES}); "
        "install it with `apt-get install mricron-data` (.ci/run does)",
    ),
]

SIZE = 64


def _bundle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("colin27")
    datalist = Path(make_study(str(root)))
    content = json.loads(datalist.read_text())
    assert list(content["labels"]) == list(REGIONS)
    assert [e["image"] for e in content["test"]] == [e["image"] for e in content["validation"]]
    assert all(set(e) == {"image"} for e in content["test"])
    cases = {}
    for name, entry in zip(("support", "upper", "lower"), content["training"] + content["validation"]):
        paths = {key: str(root / entry[key]) for key in ("image", "label")}
        image, label = nib.load(paths["image"]), nib.load(paths["label"])
        assert paths["image"].endswith(f"{name}_t1.nii.gz") and image.shape == label.shape
        assert np.array_equal(image.affine, label.affine)
        cases[name] = {**paths, "shape": image.shape, "affine": image.affine}
    assert nib.aff2axcodes(cases["support"]["affine"]) == ("R", "A", "S")
    assert nib.aff2axcodes(cases["upper"]["affine"]) == ("L", "P", "S")
    assert nib.aff2axcodes(cases["lower"]["affine"]) == ("S", "R", "A")
    assert cases["lower"]["shape"][0] == 12  # slice axis first
    classes = list(content["labels"].values())
    common = [
        "--datalist_file",
        str(datalist),
        "--preset",
        "tiny",
        "--image_size",
        str(SIZE),
        "--modality",
        "MRI",
        "--classes",
        json.dumps(classes),
        "--checkpoint",
        "$None",
    ]  # random weights (MONAI drops None overrides; "null" is a path)
    return {
        "root": root,
        "datalist": datalist,
        "cases": cases,
        "classes": classes,
        "class_names": dict(content["labels"]),
        "common": common,
    }


def test_evaluation_on_real_mri_writes_per_case_metrics(study):
    out = study["root"] / "metrics"
    result = _bundle(
        "--config_file",
        "['bundle/configs/train.json','bundle/configs/evaluate.json']",
        *study["common"],
        "--ckpt_dir",
        str(study["root"] / "models"),
        "--output_dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_mean_dice" in result.stderr + result.stdout
    queries = [study["cases"][n]["image"] for n in ("upper", "lower")]
    columns = {f"class{i}" for i in range(len(study["classes"]))} | {"mean"}
    for name in ("val_mean_dice", "val_nsd", "val_hd95"):
        with open(out / f"{name}_raw.csv") as f:
            rows = list(csv.DictReader(f))
        assert [row["filename"] for row in rows] == queries  # one row per query case, in datalist order
        assert columns <= set(rows[0])
        assert (out / f"{name}_summary.csv").exists()
        for row in rows:
            values = [float(row[c]) for c in columns]
            if name == "val_hd95":
                assert all(v >= 0 or math.isnan(v) for v in values)
            else:
                assert all(0.0 <= v <= 1.0 or math.isnan(v) for v in values)


def test_inference_on_real_mri_writes_label_maps_in_query_space(study):
    out = study["root"] / "inference"
    queries = {n: study["cases"][n] for n in ("upper", "lower")}
    result = _bundle(
        "--config_file",
        "['bundle/configs/train.json','bundle/configs/inference.json']",
        *study["common"],
        "--class_names",
        json.dumps(study["class_names"]),
        "--query_images",
        json.dumps([q["image"] for q in queries.values()]),
        "--output_dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name, query in queries.items():
        seg = nib.load(str(out / f"{name}_t1_seg.nii.gz"))
        assert seg.shape == query["shape"]  # the query's own grid, not the model's
        assert np.allclose(seg.affine, query["affine"], atol=1e-4)  # and its orientation
        assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(query["affine"])
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, *study["classes"]}  # AAL values, not indices
        report = json.loads((out / f"{name}_t1_confidence.json").read_text())
        assert report["image"] == query["image"]
        assert set(report["confidence"]) == set(REGIONS)
        assert all(0.0 <= v <= 1.0 for v in report["confidence"].values())
