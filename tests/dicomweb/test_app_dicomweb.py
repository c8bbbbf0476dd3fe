"""The app with a DICOMweb PACS as its studies: SEG labels in Orthanc are the support set, saved labels go back as SEG.

A real Orthanc (scripts/servers.py) holds phantom CT series (two with a SEG) and
MR series from Debian's mricron-data where installed; the real MONAI Label server runs
the app with ``--studies <Orthanc>/dicom-web``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom_seg.template import rgb_to_cielab

from icl_sam2 import dicom_study, servers
from icl_sam2.servers import MonaiLabelServer as Server
from icl_sam2.servers import free_port
from model_core.io import dicom, mricron
from model_core.io.seg_metadata import segment_colours

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:No bulk data URI handler")]
LABELS = {"blob": 1, "tube": 2, "block": 3}


@pytest.fixture(scope="module")
def site(pacs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb_app")
    study = dicom_study.make_study(
        pacs.url, "phantoms", cases=4, labelled=1, shape=(16, 64, 64), seed=5, work_dir=root / "ct"
    )
    mri = None
    if mricron.available():
        mri = dicom_study.make_study(
            pacs.dicomweb, "mricron", labelled=0, regions=["Precentral_L"], work_dir=root / "mr"
        )
    server = Server(
        pacs.dicomweb,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "checkpoint": str(root / "none.pt"),
        },
        root / "server.log",
        env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")},
    )
    yield {
        "root": root,
        "pacs": pacs,
        "study": study,
        "mri": mri,
        "server": server,
        "url": server.url,
        "client": DICOMwebClient(url=pacs.dicomweb),
    }
    server.stop()


def _params(response) -> dict:
    return json.loads(response.content.split(b'name="params"')[1].split(b"\r\n\r\n", 1)[1].split(b"\r\n--")[0])


def _segs(site) -> list[Dataset]:
    return [Dataset.from_json(d) for d in site["client"].search_for_series(search_filters={"Modality": "SEG"})]


def _infer(site, series_uid: str, model: str = "icl_sam2", params=None):
    return requests.post(
        f"{site['url']}/infer/{model}",
        params={"image": series_uid},
        data={"params": json.dumps(params or {})},
        timeout=600,
    )


def test_a_url_is_a_pacs_and_ct_and_mr_series_are_listed(site):
    listing = requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=60)
    assert listing.status_code == 200
    sample = requests.post(f"{site['url']}/activelearning/first", json={}, timeout=120).json()
    unlabelled = {s["SeriesInstanceUID"] for s in site["study"]["series"][1:]}
    if site["mri"]:
        unlabelled |= {s["SeriesInstanceUID"] for s in site["mri"]["series"]}
    assert sample["id"] in unlabelled
    assert not any(p.name.startswith("http") for p in ROOT.iterdir()), "a URL was taken as a folder name"
    # the server's own view: every CT series and, with mricron-data, the MR series too; one of them labelled
    status = requests.get(f"{site['url']}/info/", timeout=60).json()["datastore"]
    assert status["total"] == len(site["study"]["series"]) + (len(site["mri"]["series"]) if site["mri"] else 0)
    assert status["completed"] == 1


def test_in_context_uses_the_seg_stored_in_the_pacs(site):
    query = site["study"]["series"][2]
    response = _infer(site, query["SeriesInstanceUID"], params={"result_extension": ".nii.gz"})
    assert response.status_code == 200, response.text
    info = _params(response)
    assert info["support_volumes"] == 1 and "skipped_support" not in info
    # the label comes back on the series' own grid (the NIfTI the series was made from)
    result = site["root"] / "result.nii.gz"
    result.write_bytes(response.content.split(b"\r\n\r\n", 2)[-1].rsplit(b"\r\n--", 1)[0])
    assert nib.load(str(result)).shape == nib.load(query["image"]).shape


def test_the_only_labelled_series_says_what_is_wrong_and_what_to_do(site):
    labelled = site["study"]["series"][0]  # the study's only labelled series (its SEG is in the PACS)
    response = _infer(site, labelled["SeriesInstanceUID"])
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("This series is the only labelled one") and "Label another series" in detail
    assert "icl_sam2_interactive" in detail
    info = requests.get(f"{site['url']}/info/", timeout=60).json()
    assert info["models_status"]["icl_sam2"]["last_error"]["detail"] == detail
    assert info["name"].endswith(f"last error (icl_sam2, 400): {detail}")  # what OHIF's panel shows
    assert _infer(site, site["study"]["series"][2]["SeriesInstanceUID"]).status_code == 200
    assert "last_error" not in requests.get(f"{site['url']}/info/", timeout=60).json()["models_status"]["icl_sam2"]


def test_a_label_saved_through_the_api_becomes_a_seg_and_support(site):
    case = site["study"]["series"][1]
    before = {str(d.SeriesInstanceUID) for d in _segs(site)}
    with open(case["label"], "rb") as f:
        response = requests.put(
            f"{site['url']}/datastore/label",
            params={"image": case["SeriesInstanceUID"], "tag": "final"},
            files={"label": ("label.nii.gz", f)},
            timeout=300,
        )
    assert response.status_code == 200, response.text
    new = [d for d in _segs(site) if str(d.SeriesInstanceUID) not in before]
    assert len(new) == 1, "the label did not reach the PACS as one DICOM SEG series"
    seg = Dataset.from_json(
        site["client"].retrieve_series_metadata(str(new[0].StudyInstanceUID), str(new[0].SeriesInstanceUID))[0]
    )
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == case["SeriesInstanceUID"]
    assert sorted(str(s.SegmentLabel) for s in seg.SegmentSequence) == sorted(LABELS)  # named after --conf labels
    # names, colours and identity of model_core.io.seg_metadata (tests/dicomweb/test_seg_metadata.py has both writers)
    assert str(seg.SeriesDescription) == "Label: blob, tube, block" and str(seg.ContentCreatorName) == "ICL-SAM2"
    colours = segment_colours(LABELS)
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "MANUAL" and "SegmentAlgorithmName" not in segment
        lab = [int(v) for v in segment.RecommendedDisplayCIELabValue]
        assert np.abs(np.subtract(lab, rgb_to_cielab(list(colours[str(segment.SegmentLabel)])))).max() <= 8
    response = _infer(site, site["study"]["series"][3]["SeriesInstanceUID"])
    assert response.status_code == 200 and _params(response)["support_volumes"] == 2  # used by the very next request


def test_bad_labels_and_unknown_series_never_reach_the_pacs(site, tmp_path):
    case = site["study"]["series"][3]
    before = {str(d.SeriesInstanceUID) for d in _segs(site)}
    image = nib.load(case["image"])
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full(image.shape, 7, np.uint8), image.affine), str(bad))
    with open(bad, "rb") as f:
        response = requests.put(
            f"{site['url']}/datastore/label",
            params={"image": case["SeriesInstanceUID"], "tag": "final"},
            files={"label": ("bad.nii.gz", f)},
            timeout=120,
        )
    assert response.status_code == 400 and "not configured labels" in response.json()["detail"]
    response = _infer(site, "1.2.3.4.5.6.7.8.9")
    assert response.status_code == 404 and "not in the datastore" in response.json()["detail"]
    with open(case["image"], "rb") as f:
        response = requests.put(
            f"{site['url']}/datastore/image", params={"image": "new"}, files={"file": ("new.nii.gz", f)}, timeout=60
        )
    assert response.status_code == 405 and "store new images in the PACS" in response.json()["detail"]
    assert {str(d.SeriesInstanceUID) for d in _segs(site)} == before


def test_a_seg_off_its_image_grid_is_skipped_not_fatal(site, tmp_path):
    """A SEG in the PACS whose frames are not on its series' grid: named in the answer, the rest still works."""
    case = site["study"]["series"][3]
    seg = dicom.label_to_dicom_seg(case["label"], case["files"], LABELS, tmp_path / "seg" / "SEG.dcm", strict=False)
    import pydicom

    dataset = pydicom.dcmread(seg)
    for frame in dataset.PerFrameFunctionalGroupsSequence:  # move every frame by half a slice
        position = frame.PlanePositionSequence[0]
        position.ImagePositionPatient = [
            float(v) + (0.5 if i == 2 else 0.0) for i, v in enumerate(position.ImagePositionPatient)
        ]
    dataset.save_as(seg)
    dicom_study.upload(site["pacs"].url, [seg])
    time.sleep(6)  # the series lists are reused for 5 s
    response = _infer(site, site["study"]["series"][2]["SeriesInstanceUID"])
    assert response.status_code == 200, response.text
    skipped = _params(response).get("skipped_support") or []
    assert [s["id"] for s in skipped] == [case["SeriesInstanceUID"]] and "grid" in skipped[0]["reason"]


def test_an_unreachable_pacs_stops_the_server_at_start_up_naming_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(RuntimeError) as error:
        Server(
            url,
            {"preset": "tiny", "image_size": "64", "labels": json.dumps(LABELS), "device": "cpu"},
            tmp_path / "server.log",
        )
    assert f"The DICOMweb server '{url}' (--studies) is not reachable" in str(error.value)


def test_a_series_that_is_no_volume_is_a_clear_4xx(site, tmp_path):
    one = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), np.int16), np.eye(4)), str(one))
    files, uid = dicom.nifti_to_dicom_series(
        one,
        tmp_path / "one",
        modality="CT",
        patient_id="ONE",
        study_uid=site["study"]["StudyInstanceUID"],
        series_number=50,
    )
    dicom_study.upload(site["pacs"].url, files)
    time.sleep(6)  # the series lists are reused for 5 s
    response = _infer(site, uid)
    assert response.status_code == 400 and "at least 4 voxels" in response.json()["detail"], response.text
    assert requests.get(f"{site['url']}/info/", timeout=60).status_code == 200


def test_a_pacs_that_goes_away_is_a_502_and_the_server_keeps_serving(tmp_path):
    reason = servers.missing()
    if reason:
        pytest.skip(reason)
    pacs = servers.Orthanc(tmp_path / "orthanc").start()
    try:
        study = dicom_study.make_study(
            pacs.url, "phantoms", cases=1, labelled=0, shape=(8, 32, 32), seed=9, work_dir=tmp_path / "s"
        )
        server = Server(
            pacs.dicomweb,
            {
                "preset": "tiny",
                "image_size": "64",
                "labels": json.dumps(LABELS),
                "device": "cpu",
                "dicomweb_list_ttl": "0",
            },
            tmp_path / "server.log",
            env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")},
        )
    except BaseException:
        pacs.stop()
        raise
    try:
        pacs.stop()
        response = requests.post(
            f"{server.url}/infer/icl_sam2_interactive",
            params={"image": study["series"][0]["SeriesInstanceUID"]},
            data={"params": json.dumps({"foreground": [[16, 16, 4]]})},
            timeout=120,
        )
        assert (
            response.status_code == 502 and f"the PACS at {pacs.dicomweb} did not answer" in response.json()["detail"]
        )
        info = requests.get(f"{server.url}/info/", timeout=60)
        assert info.status_code == 200 and "did not answer" in info.json()["datastore"]["error"]
        # what OHIF's panel shows under its server field: that the PACS does not answer, naming it
        name = info.json()["name"]
        assert f"datastore not answering: Listing series: the PACS at {pacs.dicomweb} did not answer" in name, name
    finally:
        server.stop()
