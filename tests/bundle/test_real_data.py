"""The bundle on real MRI: the Colin27 T1 template and its AAL atlas (Debian package mricron-data).

A small study is cut from them: a support slab and two query slabs from other heights of the
brain, at other in-plane crops and resolutions, stored in other orientations (one LPS, one with
the slice axis first), each with the atlas labels resampled the same way. Evaluation and
inference run through ``monai.bundle run`` with ``--modality MRI`` and random tiny weights,
so what is checked is the plumbing on real data (percentile scaling, reorientation, resizing and
its inverse, metrics, label values, file names), not accuracy.
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

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = Path("/usr/share/mricron/templates")
T1, ATLAS, NAMES = TEMPLATES / "ch2.nii.gz", TEMPLATES / "aal.nii.gz", TEMPLATES / "aal.nii.txt"

pytestmark = pytest.mark.skipif(
    not (T1.is_file() and ATLAS.is_file() and NAMES.is_file()),
    reason=f"real-data test needs the Debian package mricron-data ({T1}, {ATLAS}, {NAMES}); "
           "install it with `apt-get install mricron-data` (.ci/run does)",
)

SIZE = 64
# four large AAL regions present in every slab below: left/right precentral and middle frontal gyri
REGIONS = ("Precentral_L", "Precentral_R", "Frontal_Mid_L", "Frontal_Mid_R")

# Views of the 1 mm template: voxel ranges (start, stop) per axis, steps (mm), axes to flip, axis order.
VIEWS = {
    # support: 2 mm, whole axial plane, 12 slices from z = +25 mm, RAS like the template
    "support": dict(ranges=((0, 181), (0, 217), (96, 120)), steps=(2, 2, 2), flips=(), order=(0, 1, 2)),
    # query 1: the 12 slices above the support, another crop, stored LPS (x and y reversed)
    "upper": dict(ranges=((10, 171), (20, 207), (120, 144)), steps=(2, 2, 2), flips=(0, 1), order=(0, 1, 2)),
    # query 2: 12 slices below the support, 3 mm in-plane, stored slice axis first (S, R, A)
    "lower": dict(ranges=((0, 181), (0, 217), (72, 96)), steps=(3, 3, 2), flips=(), order=(2, 0, 1)),
}


def aal_names() -> dict[str, int]:
    """``{region name: label value}`` from the atlas's text file (``value name code`` per line)."""
    names = {}
    for line in NAMES.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[parts[1]] = int(parts[0])
    return names


def cut(data: np.ndarray, affine: np.ndarray, ranges, steps, flips, order) -> tuple[np.ndarray, np.ndarray]:
    """Crop and subsample ``data`` (nearest voxel), reverse and reorder its axes, with the matching affine."""
    index = tuple(slice(a, b, s) for (a, b), s in zip(ranges, steps))
    out = data[index]
    grid = np.eye(4)
    grid[:3, :3] = np.diag(steps)
    grid[:3, 3] = [a for a, _ in ranges]
    affine = affine @ grid
    for axis in flips:
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, out.shape[axis] - 1
        out, affine = np.flip(out, axis), affine @ flip
    permute = np.eye(4)
    permute[:3, :3] = np.eye(3)[:, list(order)]  # new axis i is old axis order[i]
    return np.ascontiguousarray(out.transpose(order)), affine @ permute


def _bundle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("colin27")
    t1, atlas = nib.load(str(T1)), nib.load(str(ATLAS))
    assert np.allclose(t1.affine, atlas.affine) and t1.shape == atlas.shape
    t1_data, atlas_data = np.asarray(t1.dataobj), np.asarray(atlas.dataobj)
    names = aal_names()
    classes = [names[r] for r in REGIONS]
    cases = {}
    for name, view in VIEWS.items():
        image, affine = cut(t1_data, t1.affine, **view)
        label, label_affine = cut(atlas_data, atlas.affine, **view)
        assert np.array_equal(affine, label_affine)
        # the affine is right: a voxel of the view lies where the same value lies in the template
        for ijk in ([0, 0, 0], [s - 1 for s in image.shape], [s // 2 for s in image.shape]):
            src = np.rint(nib.affines.apply_affine(np.linalg.inv(t1.affine), nib.affines.apply_affine(affine, ijk)))
            assert image[tuple(ijk)] == t1_data[tuple(src.astype(int))]
        present = set(np.unique(label).tolist())
        assert set(classes) <= present, f"{name} lacks {set(classes) - present}"
        paths = {}
        for key, array, dtype in (("image", image, np.int16), ("label", label, np.uint8)):
            paths[key] = str(root / f"{name}_{'t1' if key == 'image' else 'aal'}.nii.gz")
            nib.save(nib.Nifti1Image(array.astype(dtype), affine), paths[key])
        cases[name] = {**paths, "shape": image.shape, "affine": affine}
    assert nib.aff2axcodes(cases["upper"]["affine"]) == ("L", "P", "S")
    assert nib.aff2axcodes(cases["lower"]["affine"]) == ("S", "R", "A")
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({
        "name": "Colin27 T1 + AAL",
        "labels": {r: names[r] for r in REGIONS},
        "training": [{"image": cases["support"]["image"], "label": cases["support"]["label"]}],
        "validation": [{"image": cases[n]["image"], "label": cases[n]["label"]} for n in ("upper", "lower")],
    }, indent=2))
    common = ["--datalist_file", str(datalist), "--preset", "tiny", "--image_size", str(SIZE), "--modality", "MRI",
              "--classes", json.dumps(classes), "--checkpoint", "$None"]  # random weights (MONAI drops None overrides; "null" is a path)
    return {"root": root, "datalist": datalist, "cases": cases, "classes": classes,
            "class_names": {r: names[r] for r in REGIONS}, "common": common}


def test_evaluation_on_real_mri_writes_per_case_metrics(study):
    out = study["root"] / "metrics"
    result = _bundle("--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']", *study["common"],
                     "--ckpt_dir", str(study["root"] / "models"), "--output_dir", str(out))
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
    result = _bundle("--config_file", "bundle/configs/inference.json", *study["common"],
                     "--class_names", json.dumps(study["class_names"]),
                     "--query_images", json.dumps([q["image"] for q in queries.values()]), "--output_dir", str(out))
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
