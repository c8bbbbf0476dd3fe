"""``icl-sam2 segment`` and ``icl-sam2 support`` as a user runs them: the installed command in a process, on
phantom files and a DICOM series folder, with the trained tiny model (the session fixture ``trained_tiny``).

Checked: label maps on each query's own grid and their Dice against truth, the DICOM SEG decoded back voxel
for voxel, the preview PNG (its size, and coloured contours where the structures are), a saved support file
giving the same result and refusing a mismatch, the README's command as written, and each bad input (one
line naming the file, exit code 2 before anything runs, 1 for a batch with failed queries, the others done).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.dicom import nifti_to_dicom_series, read_seg
from model_core.io.pictures import LEGEND_HEIGHT, TITLE_HEIGHT, montage_size
from model_core.io.seg_metadata import PALETTE as COLOURS  # structures without sides: colours by rank
from model_core.io.volumes import find_volumes

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # the command runs in processes (each imports torch and MONAI), on a trained model


def _run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


#: the page whose commands run here, as written
DOC = ROOT / "docs" / "segment.md"


def doc_commands() -> list[list[str]]:
    """The ``icl-sam2`` command lines of docs/segment.md's code blocks, as a shell would split them."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith(".venv/bin/icl-sam2 ")]


@pytest.fixture(scope="module")
def study(trained_tiny, tmp_path_factory):
    """A folder with what the docs' commands name: img.nii.gz and lab.nii.gz (a training case of the trained
    model), query.nii.gz and scans/ (its test cases: a NIfTI file and a DICOM series folder), model.pt."""
    work = tmp_path_factory.mktemp("segment")
    datalist = json.loads(Path(trained_tiny["datalist"]).read_text())
    folder = Path(trained_tiny["datalist"]).parent
    shutil.copy(folder / datalist["training"][0]["image"], work / "img.nii.gz")
    shutil.copy(folder / datalist["training"][0]["label"], work / "lab.nii.gz")
    nifti_case, dicom_case = datalist["test"][:2]
    shutil.copy(folder / nifti_case["image"], work / "query.nii.gz")
    (work / "scans").mkdir()
    shutil.copy(folder / nifti_case["image"], work / "scans" / "query_a.nii.gz")
    nifti_to_dicom_series(folder / dicom_case["image"], work / "scans" / "query_b", modality="CT")
    shutil.copy(trained_tiny["checkpoint"], work / "model.pt")
    return {
        "work": work,
        "support": f"{work / 'img.nii.gz'}:{work / 'lab.nii.gz'}",
        "queries": work / "scans",
        "truth": {"query_a": folder / nifti_case["label"], "query_b": folder / dicom_case["label"]},
        "labels": json.dumps(trained_tiny["labels"]),
        "names": trained_tiny["labels"],
        "checkpoint": str(work / "model.pt"),
        "datalist": trained_tiny["datalist"],
        "image_size": trained_tiny["image_size"],
        "values": sorted(trained_tiny["labels"].values()),
    }


@pytest.fixture(scope="module")
def doc_runs(study, icl_sam2_command):
    """Every command of docs/segment.md, as written, in order, in the study folder; ``out/`` kept after each."""
    work, runs = study["work"], []
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    for i, args in enumerate(doc_commands()):
        done = subprocess.run(
            [*icl_sam2_command, *args], cwd=work, capture_output=True, text=True, timeout=900, env=env
        )
        kept = work / f"out_{i}"
        if (work / "out").exists():
            shutil.copytree(work / "out", kept)
        runs.append({"args": args, "done": done, "out": kept})
    return runs


def test_the_docs_commands_run_as_written(doc_runs):
    assert [r["args"][0] for r in doc_runs] == ["segment", "segment", "support", "segment"]
    for run in doc_runs:
        assert run["done"].returncode == 0, (run["args"], run["done"].stderr[-3000:])
    first = doc_runs[0]
    for name in ("query_seg.nii.gz", "query_confidence.json", "preview.png"):
        assert (first["out"] / name).is_file()
    assert "values [2, 3], which --labels does not name" in first["done"].stderr  # tube and block: background
    assert "no --checkpoint" in first["done"].stderr


@pytest.fixture(scope="module")
def segmented(doc_runs):
    """The docs' second command: the folder of queries, the trained model, a preview."""
    run = doc_runs[1]
    assert run["done"].returncode == 0, run["done"].stderr[-3000:]
    return {"out": run["out"], "stdout": run["done"].stdout}


def _bundle_answer(study, query: Path, folder: Path) -> np.ndarray:
    """The bundle's own in-context inference of ``query`` (``train.json + inference.json``, support: the trained
    model's first training case, as in the study), its label map on the query's grid."""
    command = [
        *("python", "-m", "monai.bundle", "run", "--config_file"),
        "['bundle/configs/train.json','bundle/configs/inference.json']",
        *("--bundle_root", str(folder), "--datalist_file", study["datalist"], "--checkpoint", study["checkpoint"]),
        *("--preset", "tiny", "--image_size", str(study["image_size"]), "--classes", json.dumps(study["values"])),
        *("--intensity#window", "[0,1]", "--query_images", json.dumps([str(query)]), "--output_dir", str(folder)),
    ]
    done = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = folder.glob("*_seg.nii.gz")
    return np.asarray(nib.load(str(written)).dataobj)


def test_label_maps_lie_on_each_query_grid_and_are_the_bundles_answer(study, segmented, tmp_path):
    """The command is the library's inference, not a second path: on the NIfTI query its label map is what
    ``monai.bundle run`` with ``inference.json`` answers for the same support and weights. Dice against truth is
    printed, not bounded: the tests' trained tiny model (400 steps) is weak (validation Dice about 0.1); the main
    job's model reaches 0.94 on test phantoms (docs/measurements.md)."""
    out = segmented["out"]
    for name in ("query_a", "query_b"):
        label = nib.load(str(out / f"{name}_seg.nii.gz"))
        truth = nib.load(str(study["truth"][name]))
        assert label.shape == truth.shape and np.allclose(label.affine, truth.affine, atol=1e-4)
        predicted, true = np.asarray(label.dataobj), np.asarray(truth.dataobj)
        print(
            name,
            "Dice against truth",
            {n: round(_dice(predicted == v, true == v), 3) for n, v in study["names"].items()},
        )
        record = json.loads((out / f"{name}_confidence.json").read_text())
        assert set(record["confidence"]) == set(study["names"]) and all(
            0 <= v <= 1 for v in record["confidence"].values()
        )
        assert record["voxels"] == {n: int((predicted == v).sum()) for n, v in study["names"].items()}
    assert "2 queries: 2 segmented, 0 failed" in segmented["stdout"]
    ours = np.asarray(nib.load(str(out / "query_a_seg.nii.gz")).dataobj)
    bundle = _bundle_answer(study, study["queries"] / "query_a.nii.gz", tmp_path / "bundle")
    assert bundle.shape == ours.shape
    for n, v in study["names"].items():
        assert (bundle == v).any() == (ours == v).any(), n
        if (bundle == v).any():
            assert _dice(ours == v, bundle == v) >= 0.99, (n, _dice(ours == v, bundle == v))


def test_a_dicom_query_gets_a_seg_that_decodes_to_its_label_map(study, segmented):
    out = segmented["out"]
    assert not (out / "query_a_seg.dcm").exists()  # NIfTI in, NIfTI out
    label = nib.load(str(out / "query_b_seg.nii.gz"))
    decoded = read_seg(out / "query_b_seg.dcm", study["names"])
    assert decoded.shape == label.shape and np.allclose(decoded.affine, label.affine, atol=1e-3)
    assert np.array_equal(np.asarray(decoded.dataobj), np.asarray(label.dataobj))  # voxel for voxel
    series = find_volumes([study["queries"] / "query_b"])[0]
    seg = pydicom.dcmread(str(out / "query_b_seg.dcm"))
    image = pydicom.dcmread(series.series_files[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.SeriesInstanceUID
    # one segment per structure found, named from --labels (model_core.io.dicom: a value absent from the map has none)
    found = {n for n, v in study["names"].items() if (np.asarray(label.dataobj) == v).any()}
    assert found and {s.SegmentLabel for s in seg.SegmentSequence} == found


def test_the_preview_draws_each_structure_where_it_was_found(study, segmented):
    picture = np.asarray(Image.open(segmented["out"] / "preview.png").convert("RGB"))
    assert picture.shape[1::-1] == montage_size(2, 6, 128)
    for row in range(2):
        top = LEGEND_HEIGHT + row * (TITLE_HEIGHT + 128) + TITLE_HEIGHT
        cells = picture[top : top + 128]
        grey = (cells[..., 0] == cells[..., 1]) & (cells[..., 1] == cells[..., 2])
        assert grey.mean() > 0.9  # the slices themselves
        label = np.asarray(nib.load(str(segmented["out"] / f"query_{'ab'[row]}_seg.nii.gz")).dataobj)
        drawn = {n: int((cells == COLOURS[k]).all(-1).sum()) for k, n in enumerate(study["names"])}
        assert sum(drawn.values()) > 20, (row, drawn)  # contours drawn in the structures' colours
        for name, value in study["names"].items():  # and only of structures the label map holds
            assert (label == value).any() or drawn[name] == 0, (row, name, drawn)


def test_a_saved_support_file_gives_the_same_result_and_refuses_a_mismatch(study, doc_runs, icl_sam2_command):
    """The docs' support file: the same label maps as the pairs gave; a run that differs is refused, named."""
    for name in ("query_a", "query_b"):
        pairs = np.asarray(nib.load(str(doc_runs[1]["out"] / f"{name}_seg.nii.gz")).dataobj)
        saved = np.asarray(nib.load(str(doc_runs[3]["out"] / f"{name}_seg.nii.gz")).dataobj)
        assert np.array_equal(pairs, saved), name
    work = study["work"]
    support_file, query = work / "support.pt", work / "query.nii.gz"
    other = work / "other.pt"
    save_checkpoint(build_icl_sam2("tiny", image_size=64), str(other))
    for args, named in (
        (("--checkpoint", str(other)), "other weights"),
        (("--image_size", "96"), "image_size"),
        (("--labels", '{"blob": 1}'), "labels"),
        (("--window", "[-200,300]"), "window"),
    ):
        out = work / "refused"
        command = ["segment", "--support", str(support_file), "--input", str(query), "--output", str(out), *args]
        refused = _run(icl_sam2_command, *command)
        assert refused.returncode == 2 and named in refused.stderr and str(support_file) in refused.stderr, args
        assert not out.exists()


def test_a_batch_reports_each_bad_query_and_segments_the_others(study, icl_sam2_command):
    root = study["work"] / "bad_batch"
    queries = root / "queries"
    queries.mkdir(parents=True)
    shutil.copy(study["queries"] / "query_a.nii.gz", queries / "good.nii.gz")
    (queries / "broken.nii.gz").write_bytes(b"not a volume at all")
    good = nib.load(str(study["queries"] / "query_a.nii.gz"))
    nan = np.asarray(good.dataobj).astype(np.float32)
    nan[3, 3, 3] = np.nan  # one voxel: the label map would be meaningless, so the query is refused
    nib.save(nib.Nifti1Image(nan, good.affine), str(queries / "nan.nii.gz"))
    two = queries / "two_series"  # two series of one study in one folder, as some exports leave them
    image = nib.load(str(study["queries"] / "query_a.nii.gz"))
    flipped = nib.Nifti1Image(np.asarray(image.dataobj)[..., ::-1].copy(), image.affine)
    for number, volume in ((1, image), (2, flipped)):
        nifti_to_dicom_series(volume, root / f"series{number}", series_number=number)
        two.mkdir(exist_ok=True)
        for f in (root / f"series{number}").iterdir():
            f.rename(two / f"s{number}_{f.name}")
    missing = root / "nowhere.nii.gz"
    done = _run(
        icl_sam2_command,
        "segment",
        "--support",
        study["support"],
        "--input",
        json.dumps([str(queries), str(missing)]),
        "--output",
        str(root / "out"),
        "--labels",
        study["labels"],
        "--checkpoint",
        study["checkpoint"],
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "5 queries: 1 segmented, 4 failed" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("icl-sam2 segment: ")]
    assert len(errors) == 4
    assert any(str(queries / "broken.nii.gz") in e and "not a readable image volume" in e for e in errors)
    assert any(str(queries / "nan.nii.gz") in e and "1 NaN or infinite values" in e for e in errors)
    assert any(str(two) in e and "holds 2 DICOM series" in e for e in errors)
    assert any(str(missing) in e and "does not exist" in e for e in errors)
    assert (root / "out" / "good_seg.nii.gz").is_file()
    leftovers = [p.name for p in (root / "out").iterdir() if not p.name.startswith("good_")]
    assert leftovers == []  # nothing half-written for the bad ones


def _bad_support(study, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Support sets a user gets wrong: ``{case: (arguments, what the one-line error must name)}``."""
    image, label = study["support"].split(":")
    off_grid = tmp / "off_grid_label.nii.gz"
    data = np.asarray(nib.load(label).dataobj)
    nib.save(nib.Nifti1Image(data[:-2], np.eye(4)), str(off_grid))
    return {
        "missing image": (["--support", f"{tmp / 'absent.nii.gz'}:{label}"], str(tmp / "absent.nii.gz")),
        "label off its image's grid": (["--support", f"{image}:{off_grid}"], str(off_grid)),
        "a label value no support label holds": (["--support", study["support"], "--labels", '{"liver": 7}'], "liver"),
        "empty support set": (["--support", ","], "support set is empty"),
        "not a pair": (["--support", image], "IMAGE:LABEL"),
    }


def test_a_bad_support_set_stops_with_one_line_naming_it(study, icl_sam2_command, tmp_path):
    for case, (args, named) in _bad_support(study, tmp_path).items():
        base = [
            "segment",
            "--input",
            str(study["queries"]),
            "--output",
            str(tmp_path / "out"),
            "--checkpoint",
            study["checkpoint"],
        ]
        if "--labels" not in args:
            args = [*args, "--labels", study["labels"]]
        done = _run(icl_sam2_command, *base, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and named in lines[-1] and lines[-1].startswith("icl-sam2: "), (case, done.stderr)
        assert "Traceback" not in done.stderr and not (tmp_path / "out").exists(), case
