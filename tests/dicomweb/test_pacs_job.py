"""The in-context job over a PACS (``icl-sam2 segment-studies``, model_core/serving/pacs_job.py) on a real Orthanc.

Which SEG is support and which series is segmented (a person's SEG teaches, the model's own
result waits for review, a correction teaches again), and the whole job as a process with
the trained tiny model: results stored as SEGs identified as the model's, equal to the
job's label maps on the series' grid; a second run leaves them for review.
"""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from icl_sam2 import dicom_study, servers
from model_core.io.dicom import label_to_dicom_seg
from model_core.io.dicomweb import Pacs, SegInstance, newest_by_series, seg_to_label
from model_core.io.seg_metadata import SegIdentity
from model_core.io.validation import InputError
from model_core.serving.pacs_job import plan_job

pytestmark = pytest.mark.filterwarnings("ignore:No bulk data URI handler")


def _seg(series: str, stamp: tuple, kind: str = "MANUAL", sop: str = "1") -> SegInstance:
    return SegInstance("1.2", "1.2.3", sop, series, stamp, {1: "liver"}, frozenset({kind}))


def test_a_person_s_seg_labels_a_series_before_the_model_s_whatever_the_clocks():
    model = _seg("9.1", ("20260102", 10.0), "AUTOMATIC", sop="model")
    correction = _seg("9.1", ("20260101", 5.0), sop="correction")  # a browser whose clock is behind
    later = _seg("9.1", ("20260101", 6.0), sop="later correction")
    assert newest_by_series([model])["9.1"] is model and not model.reviewed
    assert newest_by_series([model, correction])["9.1"] is correction
    assert newest_by_series([later, model, correction])["9.1"] is later
    assert newest_by_series([_seg(None, ("", 0.0))]) == {}


def test_seg_metadata_gives_the_link_the_stamp_and_the_author():
    meta = pydicom.Dataset()
    meta.StudyInstanceUID, meta.SeriesInstanceUID, meta.SOPInstanceUID = "1.2", "1.2.3", "1.2.3.4"
    meta.ContentDate, meta.ContentTime, meta.SeriesNumber = "20261203", "201221.5", 3101
    referenced = pydicom.Dataset()
    referenced.SeriesInstanceUID = "1.2.9"
    meta.ReferencedSeriesSequence = [referenced]
    segment = pydicom.Dataset()
    segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = 1, "blob", "MANUAL"
    meta.SegmentSequence = [segment]
    seg = SegInstance.from_metadata(meta)
    assert seg.referenced_series_uid == "1.2.9" and seg.segments == {1: "blob"} and seg.reviewed
    assert seg.stamp == ("20261203", 20 * 3600 + 12 * 60 + 21.5, 3101, 0)


def test_the_plan_learns_from_people_and_leaves_model_results_for_review(pacs, tmp_path):
    study = dicom_study.make_study(
        pacs.url, "phantoms", cases=4, labelled=1, shape=(8, 32, 32), seed=5, work_dir=tmp_path / "study"
    )
    labels = study["labels"]
    person, model, query_a, query_b = (s["SeriesInstanceUID"] for s in study["series"])
    awaiting = study["series"][1]
    automatic = label_to_dicom_seg(
        awaiting["label"],
        awaiting["files"],
        labels,
        tmp_path / "automatic.dcm",
        identity=SegIdentity("AUTOMATIC", "ICL-SAM2 icl_sam2 model.pt 0123456789ab"),
    )
    dicom_study.upload(pacs.url, [automatic])
    plan = plan_job(Pacs(pacs.dicomweb), study["StudyInstanceUID"])
    assert [s.referenced_series_uid for s in plan.supports] == [person]
    assert [q.series_uid for q in plan.queries] == sorted([query_a, query_b])
    assert plan.skipped == {person: "labelled (support)", model: "the model's result, awaiting review"}
    assert plan_job(Pacs(pacs.dicomweb), "1.2.3").queries == []  # a study list without the study

    # the person corrects the model's result in a viewer whose clock is a day behind: it is support from now on
    label = nib.load(awaiting["label"])
    corrected = np.asarray(label.dataobj).copy()
    corrected[corrected == labels["tube"]] = 0
    correction = label_to_dicom_seg(
        nib.Nifti1Image(corrected, label.affine), awaiting["files"], labels, tmp_path / "correction.dcm"
    )
    ds = pydicom.dcmread(correction)
    ds.ContentDate = "20000101"
    ds.save_as(correction)
    dicom_study.upload(pacs.url, [correction])
    plan = plan_job(Pacs(pacs.dicomweb), study["StudyInstanceUID"])
    assert {s.referenced_series_uid for s in plan.supports} == {person, model}
    assert plan.skipped[model] == "labelled (support)"
    chosen = next(s for s in plan.supports if s.referenced_series_uid == model)
    assert chosen.sop_uid == str(ds.SOPInstanceUID) and set(chosen.segments.values()) == {"blob", "block"}


def test_without_a_person_s_seg_the_job_says_what_to_do(tmp_path):
    with servers.Orthanc(tmp_path / "orthanc") as empty:
        dicom_study.make_study(
            empty.url, "phantoms", cases=1, labelled=0, shape=(8, 32, 32), seed=5, work_dir=tmp_path / "study"
        )
        with pytest.raises(InputError, match="label one series in the viewer"):
            plan_job(Pacs(empty.dicomweb))
    with pytest.raises(ValueError, match="does not answer QIDO-RS"):
        Pacs(empty.dicomweb)


@pytest.mark.slow
def test_the_job_stores_the_model_s_segs_and_leaves_them_for_review(pacs, trained_tiny, icl_sam2_command, tmp_path):
    study = dicom_study.make_study(
        pacs.url, "phantoms", cases=2, labelled=1, shape=(16, 64, 64), seed=21, work_dir=tmp_path / "study"
    )
    query = study["series"][1]
    command = [
        *icl_sam2_command,
        "segment-studies",
        "--dicomweb",
        pacs.dicomweb,
        "--studies",
        study["StudyInstanceUID"],
        "--checkpoint",
        trained_tiny["checkpoint"],
        "--labels",
        json.dumps(study["labels"]),
        "--window",
        "[-200,300]",  # dicom-study stores phantom intensities v as CT values 500 v - 200
    ]
    done = subprocess.run([*command, "--work_dir", str(tmp_path / "job")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, summary = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["series_uid"], r["status"]) for r in lines] == [(query["SeriesInstanceUID"], "stored")]
    assert summary["failed"] == [] and summary["model"]["untrained"] is False
    # support: this study's labelled series among the PACS's reviewed SEGs (the module's PACS also holds the
    # earlier tests' studies, and the job learns from every reviewed SEG of the PACS, by design)
    assert study["series"][0]["SeriesInstanceUID"] in [s["series_uid"] for s in summary["support"]]

    # in the PACS: a SEG of the query series, identified as the model's, with the job's voxels
    stored = [s for s in Pacs(pacs.dicomweb).seg_instances() if s.series_uid == lines[0]["seg_series_uid"]]
    assert len(stored) == 1 and stored[0].referenced_series_uid == query["SeriesInstanceUID"]
    assert stored[0].algorithm_types == {"AUTOMATIC"} and not stored[0].reviewed
    assert stored[0].algorithm_names == {summary["model"]["algorithm_name"]}
    assert summary["model"]["algorithm_name"].startswith("ICL-SAM2 icl_sam2 ")
    folder = tmp_path / "job" / "queries" / query["SeriesInstanceUID"]
    Pacs(pacs.dicomweb).download_seg(stored[0], tmp_path / "stored.dcm")
    seg_to_label(
        str(tmp_path / "stored.dcm"), str(folder / "image.nii.gz"), study["labels"], str(tmp_path / "s.nii.gz")
    )
    result = np.asarray(nib.load(folder / "label.nii.gz").dataobj)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "s.nii.gz").dataobj), result)
    assert result.shape == nib.load(query["label"]).shape and set(lines[0]["segments"]) <= set(study["labels"])

    # the next run leaves the result for review: nothing to segment, no model loaded
    again = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["queries"] == [] and summary["model"] is None
    assert summary["skipped"][query["SeriesInstanceUID"]] == "the model's result, awaiting review"
