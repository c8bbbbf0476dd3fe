"""OHIF 3.13 on the PACS as a radiologist meets it, in a real Chromium: brush, store, the in-context job, the result.

``icl-sam2 ohif``'s viewer on a real Orthanc holding a phantom study of three CT series, the
first with an expert's SEG. In OHIF's Segmentation mode the user labels the second series
with the brush, names the segment and stores it as a DICOM SEG; the stored SEG holds exactly
the brushed voxels. ``icl-sam2 segment-studies`` (the trained tiny model) segments the third
series in context of both SEGs and stores its result (how well it segments is not this test's
subject: the trained tiny model is weak on phantoms it has not seen); OHIF opens that result, and what OHIF
shows equals the stored SEG voxel for voxel. The user corrects it with the brush and stores
it again; the next job's plan uses the correction as support.
Screenshots: the ``shots`` folder printed at the end (``ICL_SAM2_OHIF_SHOTS`` to choose it).
"""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from icl_sam2 import dicom_study, servers
from icl_sam2.ohif import OhifViewer
from model_core.io.dicom import read_series
from model_core.io.dicomweb import Pacs, seg_to_label
from model_core.serving.pacs_job import plan_job

from .conftest import require_installed, require_ohif
from .ohif import chromium_missing, env_shots
from .ohif3 import OHIF3

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:No bulk data URI handler")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_installed(servers.missing())
    require_installed(chromium_missing())
    require_ohif()
    root = tmp_path_factory.mktemp("ohif3")
    with servers.Orthanc(root / "orthanc") as pacs:
        study = dicom_study.make_study(
            pacs.url, "phantoms", cases=3, labelled=1, shape=(16, 64, 64), seed=11, work_dir=root / "study"
        )
        for series in study["series"]:  # each series as the PACS holds it, read back as the job reads it
            series["grid"] = str(root / f"{series['name']}_grid.nii.gz")
            nib.save(read_series(str(root / "study" / "dicom" / series["name"])), series["grid"])
        with OhifViewer(pacs.dicomweb) as viewer:
            shots = env_shots(root / "shots")
            browser = OHIF3(viewer.url, shots)
            try:
                yield {"root": root, "pacs": pacs, "study": study, "browser": browser}
            finally:
                browser.close()
                print(f"\nOHIF 3.13 screenshots: {shots} {sorted(p.name for p in shots.glob('*.png'))}")


def _decoded(pacs, seg, grid: str, labels: dict[str, int], root) -> np.ndarray:
    """The stored SEG instance on its image's grid, ``(I, J, K)`` label values."""
    path = Pacs(pacs.dicomweb).download_seg(seg, root / f"{seg.sop_uid}.dcm")
    seg_to_label(path, grid, labels, str(root / f"{seg.sop_uid}.nii.gz"))
    return np.asarray(nib.load(root / f"{seg.sop_uid}.nii.gz").dataobj)


def _cross(label: np.ndarray, value: int, k: int) -> list[list[tuple[float, float]]]:
    """Two brush strokes through the middle of a structure on slice ``k``: ``(column, row)`` pixels."""
    i, j = np.nonzero(label[:, :, k] == value)
    ci, cj, reach = float(i.mean()), float(j.mean()), max(float(np.sqrt(len(i) / np.pi)) - 3.0, 1.0)
    return [[(ci - reach, cj), (ci + reach, cj)], [(ci, cj - reach), (ci, cj + reach)]]


def _as_values(numbers: np.ndarray, names: dict[int, str], labels: dict[str, int]) -> np.ndarray:
    lut = np.zeros(max(names, default=0) + 1, dtype=np.int32)
    for number, name in names.items():
        lut[number] = labels[name]
    return lut[numbers]


def test_brush_store_job_and_the_result_in_ohif_3_13(site, trained_tiny, icl_sam2_command):
    browser, pacs, study, root = site["browser"], site["pacs"], site["study"], site["root"]
    labels = study["labels"]
    expert, brushed, query = study["series"]
    shape = nib.load(brushed["grid"]).shape

    # 1. the study from the PACS in OHIF 3.13's Segmentation mode; the user labels the second series with the brush
    browser.open_study(study["StudyInstanceUID"], series=3)
    browser.shot("01_study_open")
    truth = np.asarray(nib.load(brushed["label"]).dataobj)
    slices = np.nonzero((truth == labels["blob"]).any((0, 1)))[0]
    viewport = browser.viewport(brushed["SeriesInstanceUID"])
    browser.add_segmentation()
    for k in slices[[len(slices) // 4, len(slices) // 2, 3 * len(slices) // 4]]:
        browser.go_to_slice(viewport, k)
        browser.brush(viewport, _cross(truth, labels["blob"], k))
    browser.rename_segment("blob")
    drawn, names = browser.labelmap("Segmentation 1", shape)
    assert names == {1: "blob"} and drawn.any()
    browser.shot("02_brushed")
    stow = browser.store_segmentation("brushed blob")
    assert stow.status == 200, stow.text()[:500]

    # 2. the PACS holds the brushed voxels, as a SEG of that series that a person drew
    segs = Pacs(pacs.dicomweb).seg_instances()
    mine = [s for s in segs if s.description == "brushed blob"]
    assert len(mine) == 1 and mine[0].referenced_series_uid == brushed["SeriesInstanceUID"] and mine[0].reviewed
    assert np.array_equal(_decoded(pacs, mine[0], brushed["grid"], labels, root), _as_values(drawn, names, labels))

    # 3. the in-context job: the third series, in context of the expert's SEG and the brushed one
    done = subprocess.run(
        [
            *icl_sam2_command,
            "segment-studies",
            "--dicomweb",
            pacs.dicomweb,
            "--studies",
            study["StudyInstanceUID"],
            "--checkpoint",
            trained_tiny["checkpoint"],
            "--labels",
            json.dumps(labels),
            "--window",
            "[-200,300]",  # dicom-study stores phantom intensities v as CT values 500 v - 200
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *results, summary = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["series_uid"], r["status"]) for r in results] == [(query["SeriesInstanceUID"], "stored")]
    assert {s["series_uid"] for s in summary["support"]} == {expert["SeriesInstanceUID"], brushed["SeriesInstanceUID"]}
    result = next(s for s in Pacs(pacs.dicomweb).seg_instances() if s.series_uid == results[0]["seg_series_uid"])
    assert not result.reviewed
    stored = _decoded(pacs, result, query["grid"], labels, root)

    # 4. the result in OHIF 3.13: what it shows is the stored SEG, voxel for voxel
    browser.open_study(study["StudyInstanceUID"], series=3)
    browser.open_seg(result.description)
    shown, names = browser.labelmap(result.description, shape)
    browser.go_to_slice(browser.viewport(query["SeriesInstanceUID"]), int(np.argmax((stored > 0).sum((0, 1)))))
    browser.shot("03_result_in_ohif")
    assert set(names.values()) == set(result.segments.values())
    assert np.array_equal(_as_values(shown, names, labels), stored)
    truth = np.asarray(nib.load(query["label"]).dataobj)

    # 5. the user corrects the result with the brush and stores it; the next job learns from the correction
    viewport = browser.viewport(query["SeriesInstanceUID"])
    k = int(np.nonzero((truth == labels["blob"]).any((0, 1)))[0].mean())
    browser.go_to_slice(viewport, k)
    browser.brush(viewport, _cross(truth, labels["blob"], k))
    browser.shot("04_corrected")
    stow = browser.store_segmentation()
    assert stow.status == 200, stow.text()[:500]
    plan = plan_job(Pacs(pacs.dicomweb), study["StudyInstanceUID"])
    assert plan.queries == [] and plan.skipped[query["SeriesInstanceUID"]] == "labelled (support)"
    correction = next(s for s in plan.supports if s.referenced_series_uid == query["SeriesInstanceUID"])
    assert correction.reviewed and correction.sop_uid != result.sop_uid
    assert browser.aborted == [], browser.aborted  # OHIF asked for nothing outside this machine
