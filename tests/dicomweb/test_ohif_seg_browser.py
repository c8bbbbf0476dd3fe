"""What a radiologist meets in MONAI Label 0.8.5's bundled OHIF (3.10 with its MONAI Label panel), issue 23.

A real Chromium on the app's ``/ohif``, a real Orthanc, the app on DICOMweb (tiny preset, untrained):
the SEGs the app stores as OHIF shows them (names, colours), a labelled study's message, untrained
weights in the panel, switching series after connecting, opening a SEG and then connecting, and the
strategy choice the panel can pass on. Where the bundled panel itself fails, the test says so with
``xfail(strict=True)`` naming the upstream cause (MONAI Label does not change its OHIF build here;
neither does this project), and a passing test checks the workaround docs/app.md gives.
Screenshots: the ``shots`` folder printed at the end (``ICL_SAM2_OHIF_SHOTS`` to choose it).
"""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from icl_sam2 import dicom_study, servers
from icl_sam2.servers import MonaiLabelServer as Server
from model_core.io import dicom
from model_core.io.phantoms import make_phantom
from model_core.io.seg_metadata import segment_colours

from .conftest import require_installed
from .ohif import OHIF, chromium_missing, env_shots, nrrd_mask

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:No bulk data URI handler")]
LABELS = {"blob": 1, "tube": 2, "block": 3}
UPSTREAM = "MONAI Label 0.8.5's OHIF build (3.10 beta, extensions/monai-label), not changed here: "


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_installed(servers.missing())
    require_installed(chromium_missing())
    root = tmp_path_factory.mktemp("ohif_seg")
    with servers.Orthanc(root / "orthanc") as pacs:
        support = dicom_study.make_study(
            pacs.url, "phantoms", cases=2, labelled=1, shape=(16, 64, 64), seed=11, work_dir=root / "support"
        )
        query = dicom_study.make_study(
            pacs.url, "phantoms", cases=1, labelled=0, shape=(16, 64, 64), seed=12, work_dir=root / "query"
        )
        # a second series of the query study on another grid (48 x 48 x 12 voxels of 1.3 x 1.3 x 2.5 mm)
        image, _ = make_phantom((12, 48, 48), seed=5)
        other = root / "other.nii.gz"
        nib.save(
            nib.Nifti1Image((image.transpose(2, 1, 0) * 1000).astype(np.int16), np.diag([1.3, 1.3, 2.5, 1])), other
        )
        files, other_uid = dicom.nifti_to_dicom_series(
            other,
            root / "other",
            patient_id=query["PatientID"],
            study_uid=query["StudyInstanceUID"],
            series_number=7,
            series_description="other grid CT",
        )
        dicom_study.upload(pacs.url, files)
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
        shots = env_shots(root / "shots")
        browser = OHIF(server.url, shots)
        try:
            yield {
                "pacs": pacs,
                "support": support,
                "query": query,
                "other": other_uid,
                "server": server,
                "browser": browser,
            }
        finally:
            browser.close()
            server.stop()
            print(f"\nOHIF screenshots: {shots} {sorted(p.name for p in shots.glob('*.png'))}")


def _auto_segment(browser: OHIF):
    """Run Auto-Segmentation with icl_sam2 and return the /infer response (whatever its status)."""
    section = browser._section("Auto-Segmentation")
    section.locator("label.tab-label").click()
    section.locator("select.selectBox").select_option("icl_sam2")
    with browser.page.expect_response(lambda r: "/infer/" in r.url, timeout=600000) as reply:
        section.locator('button[title="Run Segmentation"]').click()
    browser.page.wait_for_timeout(1500)
    return reply.value


def _shown_result(browser: OHIF, reply, series_uid: str) -> None:
    """The viewer's labelmap is the server's answer for ``series_uid``, on that series' grid."""
    assert reply.status == 200 and f"image={series_uid}" in reply.url, (reply.status, reply.url)
    server_mask = nrrd_mask(reply.body())
    deadline = time.time() + 30
    while time.time() < deadline and not browser.labelmap().any():
        time.sleep(0.5)
    viewer_mask = browser.labelmap()
    assert viewer_mask.shape == server_mask.shape, f"labelmap {viewer_mask.shape}, series {server_mask.shape}"
    assert np.array_equal(viewer_mask, server_mask)


def test_the_panel_shows_untrained_weights_and_the_labelled_series(site):
    """Item 7: the panel shows no model description; it shows /info's name, which says what the weights are."""
    browser = site["browser"]
    browser.open_study(site["query"]["StudyInstanceUID"])
    browser.connect()
    subtitle = browser.subtitle()
    assert "icl_sam2: UNTRAINED weights" in subtitle and "1 labelled series" in subtitle, subtitle
    browser.shot("11_untrained_in_the_panel")


@pytest.mark.xfail(
    strict=True,
    reason=UPSTREAM + "the panel makes its labelmap (segmentation '1') once, on the grid of the series shown when "
    "it connects (MonaiLabelPanel.onInfo), and writes every later result into it (updateView): a series on another "
    "grid shows nothing. Workaround (docs/app.md): open the series by its URL, then connect",
)
def test_switching_series_after_connecting(site):
    browser = site["browser"]  # connected on the query study's first series (the test above)
    browser.page.locator('[data-cy="study-browser-thumbnail"]', has_text="other grid").dblclick()
    browser.wait_volume()
    reply = _auto_segment(browser)
    browser.shot("12_switched_series")
    _shown_result(browser, reply, site["other"])


def test_a_series_opened_by_its_url_is_segmented_on_its_grid(site):
    """The workaround of the test above: the series alone in the viewer (``SeriesInstanceUIDs``), then connect."""
    browser = site["browser"]
    browser.open_series(site["query"]["StudyInstanceUID"], site["other"])
    browser.connect()
    reply = _auto_segment(browser)
    browser.shot("13_series_by_url")
    _shown_result(browser, reply, site["other"])


def test_a_labelled_study_says_what_is_wrong_and_what_to_do(site):
    """Item 3: Auto-Segmentation on the study's only labelled series; the panel shows the server's answer in its
    subtitle once connected again (the workaround for the panel's fixed "Failed to Run Segmentation")."""
    browser = site["browser"]
    browser.open_study(site["support"]["StudyInstanceUID"])  # its first series is the only labelled one
    browser.connect()
    reply = _auto_segment(browser)
    assert reply.status == 400
    detail = reply.json()["detail"]
    assert detail.startswith("This series is the only labelled one") and "Label another series" in detail
    assert "icl_sam2_interactive" in detail
    browser.page.locator("table.settingsTable button.actionButton").click()  # connect again: /info is read again
    browser.page.wait_for_function(
        "() => (document.querySelector('.monaiLabelPanel p.subtitle') || {}).innerText?.includes('last error')"
    )
    assert f"last error (icl_sam2, 400): {detail}" in browser.subtitle()
    status = requests.get(f"{site['server'].url}/info/", timeout=60).json()["models_status"]["icl_sam2"]
    assert status["last_error"]["detail"] == detail and status["last_error"]["status"] == 400
    browser.shot("14_labelled_study_message")


@pytest.mark.xfail(
    strict=True,
    reason=UPSTREAM + "AutoSegmentation.onSegmentation answers every failed request with the fixed line "
    "'Failed to Run Segmentation' and never reads the server's answer. Workaround (docs/app.md): press the "
    "panel's connect button again; its subtitle then shows the server's message",
)
def test_the_panel_shows_the_servers_message(site):
    browser = site["browser"]  # still on the labelled series (the test above)
    reply = _auto_segment(browser)
    assert reply.status == 400
    shown = [t for t in browser.texts() if "MONAI Label - icl_sam2" in t]
    assert any(reply.json()["detail"][:60] in t for t in shown), shown


@pytest.mark.xfail(
    strict=True,
    reason=UPSTREAM + "PointPrompts/ClassPrompts.segColorToRgb read the colour of each segment of the first "
    "segmentation OHIF holds (currentSegmentsInfo: getSegmentations()[0]); a SEG opened before connecting is that "
    "one, and OHIF 3.10 (cornerstone3D 2) keeps segment colours in the viewport's colour table, not on the "
    "segment: TypeError, the page goes black. The SEG's own recommended colours do not change this. "
    "Workaround (docs/app.md): connect first, then open the SEG",
)
def test_opening_a_seg_then_connecting(site):
    browser = site["browser"]
    browser.open_study(site["support"]["StudyInstanceUID"])
    browser.open_seg("case000 labels")
    errors = len(browser.errors)
    field = browser.page.locator("#monailabelServerURL")
    field.fill(browser.server + "/")
    browser.page.locator("table.settingsTable button.actionButton").click()
    deadline = time.time() + 60
    while time.time() < deadline and len(browser.errors) == errors:
        if browser.page.locator(".monaiLabelPanel label.tab-label", has_text="Point Prompts").count():
            break
        time.sleep(0.5)
    browser.page.wait_for_timeout(2000)
    browser.shot("15_seg_then_connect")
    assert browser.errors[errors:] == []
    assert browser.page.locator(".monaiLabelPanel label.tab-label", has_text="Point Prompts").is_visible()


def test_connecting_then_opening_a_seg_keeps_the_panel(site):
    """The workaround of the test above."""
    browser = site["browser"]
    browser.open_study(site["support"]["StudyInstanceUID"])
    browser.connect()
    errors = len(browser.errors)
    browser.open_seg("case000 labels")
    section = browser._section("Point Prompts")
    section.locator("label.tab-label").click()
    assert section.locator("tr.clickable-row", has_text="tube").is_visible()
    assert not [e for e in browser.errors[errors:] if "TypeError" in e], browser.errors[errors:]
    browser.shot("16_connect_then_seg")


def test_the_stored_seg_as_ohif_shows_it(site):
    """Item 1 / item 5: a label saved through the app becomes a SEG that names the model and the structures,
    with each structure in its own colour; OHIF (its Basic Viewer, which draws SEGs) shows exactly those."""
    case = site["support"]["series"][1]
    with open(case["label"], "rb") as f:
        saved = requests.put(
            f"{site['server'].url}/datastore/label",
            params={"image": case["SeriesInstanceUID"], "tag": "final"},
            data={"params": json.dumps({"model": "icl_sam2"})},  # the model's result, approved by a person
            files={"label": ("label.nii.gz", f)},
            timeout=300,
        )
    assert saved.status_code == 200, saved.text
    description = "ICL-SAM2 icl_sam2: blob, tube, block"
    client = DICOMwebClient(url=site["pacs"].dicomweb)
    found = [Dataset.from_json(d) for d in client.search_for_series(search_filters={"Modality": "SEG"})]
    stored = [d for d in found if str(d.get("SeriesDescription", "")) == description]
    assert len(stored) == 1, [str(d.get("SeriesDescription", "")) for d in found]
    seg = Dataset.from_json(
        client.retrieve_series_metadata(str(stored[0].StudyInstanceUID), str(stored[0].SeriesInstanceUID))[0]
    )
    assert str(seg.ContentCreatorName) == "ICL-SAM2"
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == case["SeriesInstanceUID"]
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
        assert segment.SegmentAlgorithmName.startswith("ICL-SAM2 icl_sam2 UNTRAINED seed 0 ")

    browser = site["browser"]
    browser.open_series(site["support"]["StudyInstanceUID"], mode="viewer")
    thumbnail = browser.page.locator('[data-cy="study-browser-thumbnail-no-image"]', has_text=description)
    assert thumbnail.count() == 1  # the study browser names the model and the structures
    browser.open_seg(description)
    shown = [s for s in browser.segments() if s["segmentation"] == description]
    colours = segment_colours(LABELS)
    assert sorted(s["label"] for s in shown) == sorted(LABELS)
    for segment in shown:  # DICOM keeps CIELab: a round trip may move a channel by a unit or two
        assert np.abs(np.subtract(segment["color"], colours[segment["label"]])).max() <= 3, (segment, colours)
    assert len({tuple(s["color"]) for s in shown}) == 3  # not one colour for all
    browser.page.locator('[data-cy="panelSegmentation-btn"]').click()  # OHIF's segment list: names and colours
    browser.page.get_by_text("block", exact=True).first.wait_for()
    assert all(browser.page.get_by_text(name, exact=True).count() == 1 for name in LABELS)
    browser.page.mouse.move(700, 500)
    for _ in range(8):  # to the middle slices, where every structure is
        browser.page.keyboard.press("ArrowDown")
    browser.page.wait_for_timeout(1500)
    browser.shot("17_stored_seg_in_ohif")


def test_next_sample_runs_the_strategy_chosen_in_the_options(site):
    """Item 8: the panel always asks for ``random``; its options dialog can pass ``random``'s ``strategy`` option,
    and the server runs the strategy it names."""
    browser = site["browser"]
    browser.open_study(site["query"]["StudyInstanceUID"])
    browser.connect()
    browser.set_option("activelearning", "random", "strategy", "confidence")
    section = browser._section("Active Learning")
    section.locator("label.tab-label").click()
    with browser.page.expect_response(lambda r: "/activelearning/" in r.url) as reply:
        section.get_by_role("button", name="Next Sample").click()
    assert reply.value.url.endswith("/activelearning/random")
    assert json.loads(reply.value.request.post_data)["strategy"] == "confidence"
    assert reply.value.status == 200 and "confidence" in reply.value.json()  # LeastConfidence's answer
    browser.shot("18_strategy_from_options")


@pytest.mark.xfail(
    strict=True,
    reason=UPSTREAM + "the Active Learning strategy select calls this.onChangeStrategy, which the panel never "
    "defines: every Next Sample asks for 'random'. Workaround (docs/app.md): Options / Configurations, "
    "activelearning, random, strategy",
)
def test_the_strategy_selector_chooses_the_strategy(site):
    browser = site["browser"]
    browser.open_study(site["query"]["StudyInstanceUID"])
    browser.connect()
    section = browser._section("Active Learning")
    section.locator("label.tab-label").click()
    section.locator("table.optionsTable select").select_option("confidence")
    with browser.page.expect_response(lambda r: "/activelearning/" in r.url) as reply:
        section.get_by_role("button", name="Next Sample").click()
    assert reply.value.url.endswith("/activelearning/confidence"), reply.value.url
