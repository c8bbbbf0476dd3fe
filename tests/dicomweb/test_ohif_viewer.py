"""OHIF 3.13 as ``icl-sam2 ohif`` serves it: the pinned package, our config, one origin for the app and the PACS.

No browser here (tests/dicomweb/test_ohif_current.py drives one): the served files, the
configuration as a browser evaluates it (Node.js runs the generated ``app-config.js``), and
the DICOMweb proxy against a real Orthanc: QIDO-RS, WADO-RS metadata whose bulk-data URLs
point back at the proxy, STOW-RS of a SEG, and the refusals.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time

import pytest
import requests

from icl_sam2 import dicom_study, ohif
from icl_sam2.servers import free_port
from model_core.io.dicom import label_to_dicom_seg

from .conftest import require_ohif

pytestmark = pytest.mark.filterwarnings("ignore:No bulk data URI handler")


def test_app_config_as_a_browser_evaluates_it():
    """The generated app-config.js is valid JavaScript; its data source is this origin's proxy, with STOW-RS on and
    SEGs stored as the classic binary Segmentation Storage that MONAI Label and pydicom-seg read."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    script = "const window = {location: {origin: 'http://127.0.0.1:3000'}};\n" + ohif.app_config()
    script += "\nprocess.stdout.write(JSON.stringify(window.config));"
    config = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout)
    source = config["dataSources"][0]
    assert config["defaultDataSourceName"] == source["sourceName"]
    settings = source["configuration"]
    for key in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert settings[key] == "http://127.0.0.1:3000/dicom-web"
    assert settings["supportsStow"] is True
    assert settings["segmentation"]["store"] == {"defaultMode": "bitmap", "transferSyntaxUID": "1.2.840.10008.1.2.1"}


def test_install_refuses_a_tarball_that_is_not_the_pinned_release(tmp_path):
    fake = tmp_path / "ohif-app-3.13.2.tgz"
    (tmp_path / "package" / "dist").mkdir(parents=True)
    (tmp_path / "package" / "dist" / "index.html").write_text("<html></html>")
    (tmp_path / "package" / "dist" / "app-config.js").write_text("window.config = {};")
    with tarfile.open(fake, "w:gz") as archive:
        archive.add(tmp_path / "package", arcname="package")
    dest = tmp_path / "installed" / "dist"
    with pytest.raises(ValueError, match="not the pinned sha512-"):
        ohif.install(dest, tarball=fake)
    assert not dest.exists()
    assert "icl-sam2 ohif install" in ohif.missing(dest)


@pytest.fixture(scope="module")
def viewer(pacs, tmp_path_factory):
    require_ohif()
    study = dicom_study.make_study(
        pacs.url, "phantoms", cases=1, labelled=0, shape=(8, 32, 32), seed=3, work_dir=tmp_path_factory.mktemp("study")
    )
    with ohif.OhifViewer(pacs.dicomweb) as served:
        yield served, study


def test_the_app_and_its_routes_are_served(viewer):
    served, _ = viewer
    index = requests.get(f"{served.url}/", timeout=30)
    assert index.status_code == 200 and 'src="/app-config.js"' in index.text
    # the app's own routes (a reload on /segmentation?...) are index.html, as the package's _redirects asks
    route = requests.get(f"{served.url}/segmentation", params={"StudyInstanceUIDs": "1.2.3"}, timeout=30)
    assert route.status_code == 200 and route.text == index.text
    assert requests.get(f"{served.url}/no-such-bundle.js", timeout=30).status_code == 404
    config = requests.get(f"{served.url}/app-config.js", timeout=30)
    assert config.text == ohif.app_config() and "no-store" in config.headers["cache-control"]


def test_the_proxy_is_the_pacs_on_this_origin(viewer, pacs, tmp_path):
    served, study = viewer
    series = study["series"][0]
    found = requests.get(f"{served.url}/dicom-web/studies", headers={"Accept": "application/dicom+json"}, timeout=30)
    assert found.status_code == 200
    assert study["StudyInstanceUID"] in {s["0020000D"]["Value"][0] for s in found.json()}
    metadata = requests.get(
        f"{served.url}/dicom-web/studies/{study['StudyInstanceUID']}/series/{series['SeriesInstanceUID']}/metadata",
        timeout=30,
    ).json()
    assert len(metadata) == len(series["files"])
    # Orthanc writes bulk-data URLs for the origin the browser reached (the Forwarded header), not its own port
    bulk = [v["BulkDataURI"] for item in metadata for v in item.values() if "BulkDataURI" in v]
    assert bulk and all(uri.startswith(f"{served.url}/dicom-web/") for uri in bulk), bulk[:3]

    # STOW-RS through the proxy: a SEG of the series reaches Orthanc
    seg = label_to_dicom_seg(series["label"], series["files"], study["labels"], tmp_path / "seg.dcm")
    boundary = "icl-sam2-test"
    with open(seg, "rb") as f:
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + f.read()
            + f"\r\n--{boundary}--".encode()
        )
    stored = requests.post(
        f"{served.url}/dicom-web/studies",
        data=body,
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        timeout=60,
    )
    assert stored.status_code == 200, stored.text[:500]
    segs = requests.post(f"{pacs.url}/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG"}}, timeout=30)
    assert len(segs.json()) == 1


def test_the_proxy_refuses_what_a_viewer_never_needs(viewer):
    served, study = viewer
    escaped = requests.get(f"{served.url}/dicom-web/studies/%2E%2E/%2E%2E/instances", timeout=30)
    assert escaped.status_code == 400, escaped.text
    deleted = requests.delete(f"{served.url}/dicom-web/studies/{study['StudyInstanceUID']}", timeout=30)
    assert deleted.status_code == 405


def test_a_pacs_that_does_not_answer_is_a_502_naming_it():
    require_ohif()
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"
    with ohif.OhifViewer(nowhere) as served:
        reply = requests.get(f"{served.url}/dicom-web/studies", timeout=30)
    assert reply.status_code == 502 and nowhere in reply.text


@pytest.mark.slow  # processes that import the command line (torch, MONAI)
def test_the_install_and_serve_commands(pacs, icl_sam2_command, tmp_path):
    require_ohif()
    installed = subprocess.run([*icl_sam2_command, "ohif", "install"], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0 and installed.stdout.strip() == str(ohif.ohif_dir()), installed.stderr[-2000:]
    done = subprocess.run(
        [*icl_sam2_command, "ohif", "serve", "--dicomweb", "orthanc:8042"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "icl-sam2: --dicomweb 'orthanc:8042' must be the PACS's DICOMweb root URL, e.g. http://127.0.0.1:8042/dicom-web."
    ]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [*icl_sam2_command, "ohif", "serve", "--dicomweb", pacs.dicomweb, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                reply = requests.get(f"http://127.0.0.1:{port}/app-config.js", timeout=5)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        assert reply.status_code == 200 and "supportsStow" in reply.text
        assert requests.get(f"http://127.0.0.1:{port}/dicom-web/studies", timeout=30).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    assert f"OHIF {ohif.OHIF_VERSION} on http://127.0.0.1:{port}/" in (tmp_path / "serve.log").read_text()
