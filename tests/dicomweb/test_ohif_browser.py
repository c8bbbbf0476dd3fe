"""OHIF over DICOMweb as a user meets it: a real Chromium on MONAI Label's bundled OHIF, our app, a real Orthanc.

The study list comes from Orthanc through MONAI Label's DICOM proxy; the in-context
model's support is a DICOM SEG stored in Orthanc; Auto-Segmentation and a click run
from the viewer's MONAI Label panel, and what the viewer holds is compared voxel for
voxel with the server's answer; Active Learning's Next Sample opens the image our
``confidence`` strategy proposes; a label saved through the API reaches Orthanc as a
SEG; "Update Model" trains a short run whose model the next Auto-Segmentation uses.
Screenshots: the ``shots`` folder printed at the end (``ICL_SAM2_OHIF_SHOTS`` to choose it).
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import requests

from icl_sam2 import dicom_study, servers
from icl_sam2.servers import MonaiLabelServer as Server

from .conftest import require_installed
from .ohif import OHIF, chromium_missing, env_shots, nrrd_mask

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:No bulk data URI handler")]
LABELS = {"blob": 1, "tube": 2, "block": 3}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_installed(servers.missing())
    require_installed(chromium_missing())
    root = tmp_path_factory.mktemp("ohif")
    with servers.Orthanc(root / "orthanc") as pacs:
        support = dicom_study.make_study(
            pacs.url, "phantoms", cases=2, labelled=1, shape=(16, 64, 64), seed=11, work_dir=root / "support"
        )
        query = dicom_study.make_study(
            pacs.url, "phantoms", cases=2, labelled=0, shape=(16, 64, 64), seed=12, work_dir=root / "query"
        )
        published = root / "models" / "model.pt"
        server = Server(
            pacs.dicomweb,
            {
                "preset": "tiny",
                "image_size": "64",
                "labels": json.dumps(LABELS),
                "device": "cpu",
                "checkpoint": str(published),
                "train_epochs": "1",
                "train_episodes": "2",
            },
            root / "server.log",
            env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")},
        )
        shots = env_shots(root / "shots")
        browser = OHIF(server.url, shots)
        try:
            yield {
                "root": root,
                "pacs": pacs,
                "support": support,
                "query": query,
                "server": server,
                "browser": browser,
                "published": published,
            }
        finally:
            browser.close()
            server.stop()
            print(
                f"\nOHIF screenshots: {shots} {sorted(p.name for p in shots.glob('*.png'))}; timings {browser.timings}"
            )


def test_ohif_end_to_end(site):
    browser, query, support = site["browser"], site["query"], site["support"]
    shown = query["series"][0]  # OHIF shows a study's first series

    # 1. the study from the PACS, in the viewer, connected to our server
    browser.open_study(query["StudyInstanceUID"])
    browser.connect()

    # 2. in-context segmentation from the viewer, with the SEG stored in Orthanc as its support
    reply = browser.auto_segment("icl_sam2")
    assert f"image={shown['SeriesInstanceUID']}" in reply.url
    server_mask, viewer_mask = nrrd_mask(reply.body()), browser.labelmap()
    assert viewer_mask.shape == server_mask.shape and viewer_mask.any()
    assert np.array_equal(viewer_mask, server_mask), "OHIF's labelmap differs from the server's answer"
    info = re.findall(r"in-context \S+: (\{.*\})", site["server"].log.read_text())[-1]
    assert "'support_volumes': 1" in info  # the SEG in the PACS was the support set

    # 3. a foreground click in the viewer: the interactive model answers, and the viewer shows that answer
    before, segments = browser.segmentation()
    ijk = [40, 24, 9]
    reply = browser.click_point("icl_sam2_interactive", "blob", ijk)
    body = reply.request.post_data or ""
    assert f'"foreground":[[{ijk[0]},{ijk[1]},{ijk[2]}]]' in body.replace(" ", ""), body[:500]
    server_mask, (after, _) = nrrd_mask(reply.body()), browser.segmentation()
    # the panel (3D deepgrow) rewrites the clicked structure where the viewer had it or nothing, keeps the others
    blob = segments["blob"]
    editable = np.isin(before, [0, blob])
    assert np.array_equal(after[editable] == blob, server_mask[editable]) and server_mask.any()
    assert np.array_equal(after[~editable], before[~editable])
    assert (after != before).any(), "the click changed nothing"

    # 4. active learning: scores for every unlabelled series, then Next Sample with our strategy
    scoring = requests.post(
        f"{site['server'].url}/scoring/icl_sam2_confidence", params={"run_sync": "true"}, timeout=600
    )
    assert scoring.status_code == 200
    scores = {}
    for series in support["series"][1:] + query["series"]:
        info = requests.get(
            f"{site['server'].url}/datastore/image/info", params={"image": series["SeriesInstanceUID"]}, timeout=60
        ).json()
        scores[series["SeriesInstanceUID"]] = info["icl_sam2_confidence"]["mean"]
    sample = browser.next_sample("confidence")
    assert sample["id"] == min(scores, key=lambda uid: (scores[uid], uid)), (sample, scores)

    # 5. a label saved back through the API becomes a SEG in Orthanc (OHIF 0.8.5's panel has no save button)
    case = support["series"][1]
    with open(case["label"], "rb") as f:
        saved = requests.put(
            f"{site['server'].url}/datastore/label",
            params={"image": case["SeriesInstanceUID"], "tag": "final"},
            files={"label": ("label.nii.gz", f)},
            timeout=300,
        )
    assert saved.status_code == 200, saved.text
    found = requests.post(
        f"{site['pacs'].url}/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG"}}, timeout=30
    ).json()
    assert len(found) == 2, found  # the support's SEG and the new one

    # 6. "Update Model" in the viewer trains a short run; its published model serves the next Auto-Segmentation
    browser.connect()  # Next Sample reloaded the page on the proposed study: the panel connects again
    browser.train()
    deadline = time.time() + 900
    while time.time() < deadline:
        status = requests.get(f"{site['server'].url}/train/", timeout=30).json()
        if status and status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(3)
    assert status["status"] == "DONE", status.get("details")
    assert site["published"].exists()
    browser.open_study(query["StudyInstanceUID"])  # back to the first study (Next Sample opened another page)
    browser.connect()
    reply = browser.auto_segment("icl_sam2", shot="10_after_training")
    assert np.array_equal(browser.labelmap(), nrrd_mask(reply.body()))
    info = re.findall(r"in-context \S+: (\{.*\})", site["server"].log.read_text())[-1]
    assert "'untrained': False" in info and str(site["published"]) in info
    assert "'support_volumes': 2" in info  # the label saved in step 5 is support now
    assert all(url.startswith(("https://fonts.", "http://fonts.")) or "font" in url for url in browser.aborted), (
        browser.aborted
    )  # the viewer asked for nothing else outside loopback
