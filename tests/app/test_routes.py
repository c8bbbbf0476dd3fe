"""Every route behind one trust boundary, against the real server (issue 19, cases 1, 2, 8 and 9).

- the route table: every MONAI Label route is reviewed in ``lib/routes.py`` ``ROUTES``,
  only the kept ones are mounted, each gated by the role the table states;
- sessions (case 1): archive members cannot leave the session, a session never reaches the datastore;
- whole-slide inference and the other routes that are not mounted answer 404 (case 2);
- one error rule (case 8): a client's mistake is a 4xx naming what is wrong, a fault a 500 with an incident id;
- same origin (case 9): no cross-origin access, and requests that change something from another site are refused.

Each server test runs under ``sites.guarded``: afterwards ``/info`` answers, nothing appeared
outside the studies folder (or beside it), and no stored label changed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
import requests

from . import sites
from .conftest import ROOT
from .sites import detail, guarded, tree

pytestmark = pytest.mark.slow  # a real MONAI Label server per module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = sites.make_site(tmp_path_factory.mktemp("routes"))
    server = sites.start(site, {"models": "all", "session_max_files": "20", "session_max_mb": "1"})
    yield site
    server.stop()


@pytest.fixture
def guard(site):
    with guarded(site):
        yield


def _final(site) -> Path:
    return site["studies"] / "labels" / "final" / "case0.nii.gz"


# ---------------------------------------------------------------- the route table
def _route_table(folder: Path, env: dict[str, str]) -> dict:
    (folder / "studies").mkdir(parents=True)
    (folder / "run").mkdir()
    command = [sys.executable, str(ROOT / "tests" / "app" / "route_table.py"), str(folder / "studies")]
    for key, value in {**sites.CONF, "checkpoint": str(folder / "model.pt")}.items():
        command += ["--conf", key, value]
    # the app's `lib` package, as MONAI Label's own loader finds it beside main.py
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "monailabel_app"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(command, cwd=folder / "run", capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", **env, "PYTHONPATH": pythonpath})
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROUTE TABLE ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("ROUTE TABLE "):])


def test_every_route_is_reviewed_and_only_the_kept_ones_are_mounted(tmp_path):
    """Authentication on, so that MONAI Label mounts its login routes too; a local datastore (no PACS proxy)."""
    from lib.routes import ROUTES

    table = _route_table(tmp_path, {"MONAI_LABEL_AUTH_ENABLE": "true"})
    upstream = {tuple(r.split(" ", 1)) for r in table["upstream"]}
    unreviewed = sorted(upstream - set(ROUTES))
    assert not unreviewed, f"MONAI Label routes not reviewed in lib/routes.py ROUTES: {unreviewed}"
    kept = {key for key, rule in ROUTES.items() if rule.keep and not rule.pacs_only}
    mounted = {tuple(r.split(" ", 1)) for r in table["mounted"]}
    assert mounted == kept & upstream, (sorted(mounted - kept), sorted((kept & upstream) - mounted))
    for method, path in sorted(mounted):
        role = ROUTES[(method, path)].role
        assert table["roles"][f"{method} {path}"] == (f"monailabel-{role}" if role else None), (method, path)


@pytest.mark.parametrize("method, path", [
    ("POST", "/infer/wsi/icl_sam2_interactive"), ("POST", "/infer/wsi_v2/medsam_lite"),
    ("POST", "/batch/infer/icl_sam2"), ("GET", "/batch/infer"), ("GET", "/logs/"), ("GET", "/logs/gpu"),
    ("GET", "/model/icl_sam2"), ("PUT", "/model/icl_sam2"), ("DELETE", "/model/icl_sam2"), ("POST", "/reload"),
    ("GET", "/docs"), ("GET", "/"), ("GET", "/static/favicon.ico"), ("GET", "/proxy/dicom/qido/studies"),
    ("POST", "/proxy/dicom/stow/studies"), ("POST", "/scoring/"),
])
def test_routes_not_mounted_answer_404(site, guard, method, path):
    """Case 2: whole-slide inference took a server path as the image; now it is not mounted. Case 8: batch
    inference on CPU and the proxy without a PACS were 500s."""
    fd, outside = tempfile.mkstemp(suffix=".nii.gz", prefix="tmp")  # what the app takes for MONAI Label's uploads
    os.close(fd)
    try:
        nib.save(nib.load(str(site["studies"] / "case1.nii.gz")), outside)
        response = requests.request(method, f"{site['url']}{path}", params={"image": outside}, json={}, timeout=60)
    finally:
        os.remove(outside)
    # 405 where the path answers another method (GET /scoring/ is mounted)
    assert response.status_code == (405 if path == "/scoring/" else 404), (response.status_code, response.text[:300])


@pytest.mark.parametrize("method, path, params", [
    ("DELETE", "/datastore/", {"id": "case3"}),
    ("PUT", "/datastore/updatelabelinfo", {"label": "case0", "tag": "final"}),
])
def test_deprecated_aliases_are_not_mounted(site, guard, method, path, params):
    response = requests.request(method, f"{site['url']}{path}", params=params, data={"params": "{}"}, timeout=60)
    assert response.status_code in (404, 405) and (site["studies"] / "case3.nii.gz").is_file()


# ---------------------------------------------------------------- case 1: sessions
def _tar(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for info in members:
            if info.isreg():
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _session(site, body: bytes, name: str = "upload.tar.gz", uncompress: bool = True):
    return requests.put(f"{site['url']}/session/", params={"uncompress": str(uncompress).lower()},
                        files={"files": (name, body)}, timeout=120)


def _relative(target: Path) -> str:
    """``target`` relative to a folder in the temp folder, where archives are extracted."""
    return os.path.relpath(str(target), os.path.join(tempfile.gettempdir(), "x"))


@pytest.mark.parametrize("case", ["dotdot", "onto_final_label", "absolute", "symlink", "hardlink", "device",
                                  "zip_dotdot"])
def test_session_archives_cannot_write_outside_the_session(site, guard, case):
    root, final = site["root"], _final(site)
    sessions_before = set(os.listdir(root / "sessions"))
    label = site["label"].read_bytes()
    name, body = {
        "dotdot": lambda: (_relative(root / "escaped.txt"), _tar([_member(_relative(root / "escaped.txt"))])),
        "onto_final_label": lambda: (_relative(final), _tar([_member(_relative(final))], label)),
        "absolute": lambda: (str(root / "absolute.txt"), _tar([_member(str(root / "absolute.txt"))])),
        "symlink": lambda: ("link", _tar([_member("link", tarfile.SYMTYPE, str(final))])),
        "hardlink": lambda: ("hard", _tar([_member("hard", tarfile.LNKTYPE, str(final))])),
        "device": lambda: ("null", _tar([_member("null", tarfile.CHRTYPE)])),
        "zip_dotdot": lambda: ("../../escaped.txt", _zip({"../../escaped.txt": b"x"})),
    }[case]()
    response = _session(site, body, "upload.zip" if case.startswith("zip") else "upload.tar.gz")
    assert response.status_code == 400 and f"the archive member {name!r}" in detail(response), detail(response)
    assert set(os.listdir(root / "sessions")) == sessions_before, "a session was created from a refused archive"
    assert not (root / "escaped.txt").exists() and not (root / "absolute.txt").exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_session_archives_are_bounded(site, guard):
    response = _session(site, _tar([_member(f"f{i}") for i in range(21)]))
    assert response.status_code == 413 and "'f20'" in detail(response) and "at most 20 members" in detail(response)
    response = _session(site, _tar([_member("zeros")], bytes(2 << 20)))  # 2 MiB, the limit is 1 MiB
    assert response.status_code == 413 and "'zeros'" in detail(response) and "session_max_mb" in detail(response)
    response = _session(site, b"not an archive", "volume.nii.gz")
    assert response.status_code == 400 and "uncompress=true takes a tar" in detail(response)


def test_a_session_volume_is_segmented_and_never_stored(site, guard):
    """Slicer's path for a volume that is not in the datastore: an archive of one volume, then infer on the session."""
    volume = (site["studies"] / "case2.nii.gz").read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("scan/volume.nii.gz")
        info.size = len(volume)
        archive.addfile(info, io.BytesIO(volume))
    response = _session(site, buffer.getvalue())
    assert response.status_code == 200, detail(response)
    session_id = response.json()["session_id"]
    assert Path(response.json()["session_info"]["path"]).resolve().is_relative_to((site["root"] / "sessions").resolve())
    params = {"foreground": [[30, 30, 8]], "label": "blob", "save_label": True, "label_tag": "fromsession"}
    query = {"session_id": session_id, "image": "CT Chest (2)"}  # Slicer sends its volume node's name beside a session
    response = requests.post(f"{site['url']}/infer/icl_sam2_interactive", params=query,
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 200, detail(response)
    assert not (site["studies"] / "labels" / "fromsession").exists(), "a session's result reached the datastore"
    assert requests.delete(f"{site['url']}/session/{session_id}", timeout=60).status_code == 200
    response = requests.post(f"{site['url']}/infer/icl_sam2_interactive", params={"session_id": session_id},
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 404 and "not found" in detail(response)


def test_session_ids_are_ids(site, guard):
    for method in ("GET", "DELETE"):
        response = requests.request(method, f"{site['url']}/session/%2E%2E", timeout=60)
        assert response.status_code == 400 and "session_id '..' is not a valid id" in detail(response), detail(response)
        response = requests.request(method, f"{site['url']}/session/no-such-session", timeout=60)
        assert response.status_code == 404
    assert (site["root"] / "sessions").is_dir()


def test_a_fault_is_a_500_with_an_incident_id_and_its_cause_logged(site, guard):
    """A session whose stored record is broken (disk, crash): the server's fault, not the client's."""
    broken = site["root"] / "sessions" / "broken-session"
    broken.mkdir()
    (broken / "meta.info").write_text("{not json")
    try:
        response = requests.get(f"{site['url']}/session/broken-session", timeout=60)
    finally:
        (broken / "meta.info").unlink()
        broken.rmdir()
    assert response.status_code == 500 and "incident" in detail(response), detail(response)
    incident = detail(response).split("incident ")[1].split(";")[0]
    log = (site["root"] / "run" / "server.log").read_text()
    assert f"Server fault {incident}" in log and "JSONDecodeError" in log.split(f"Server fault {incident}")[1][:300]


# ---------------------------------------------------------------- case 8: one error rule
def _infer(site, model: str, params: str, image: str = "case1", **kwargs):
    return requests.post(f"{site['url']}/infer/{model}", params={"image": image}, data={"params": params},
                         timeout=300, **kwargs)


BIG = "9" * 400  # beyond a float: OverflowError in a finite check


@pytest.mark.parametrize("model, params, field", [
    ("icl_sam2_interactive", f'{{"foreground": [[{BIG}, 30, 8]]}}', "params.foreground[0][0]"),
    ("icl_sam2_interactive", f'{{"foreground": [[30, 30, 8]], "roi": [1, 2, 3, {BIG}, 5, 6]}}', "params.roi[3]"),
    ("medsam_lite", f'{{"box": [10, 10, 40, 40], "slice": {BIG}}}', "params.slice"),
    ("medsam_lite", f'{{"roi": [10, {BIG}, 10, 40, 2, 8]}}', "params.roi[1]"),
    ("lesion_proposals", f'{{"min_volume_mm3": {BIG}}}', "params.min_volume_mm3"),
    ("icl_sam2", f'{{"anything": {{"deep": [{BIG}]}}}}', "params.anything.deep[0]"),
])
def test_numbers_with_hundreds_of_digits_are_422_naming_the_field(site, guard, model, params, field):
    response = _infer(site, model, params)
    assert response.status_code == 422 and field in detail(response), detail(response)
    assert "a number of 400 digits" in detail(response)


def test_numbers_with_thousands_of_digits_are_4xx(site, guard):
    huge = "9" * 5000  # beyond Python's int() limit of 4300 digits: a ValueError that is no JSONDecodeError
    response = _infer(site, "icl_sam2", f'{{"x": {huge}}}')
    assert response.status_code == 422 and "params is not valid JSON" in detail(response)
    for path in ("/activelearning/random", "/train/icl_sam2", "/scoring/icl_sam2_confidence"):
        response = requests.post(f"{site['url']}{path}", data=f'{{"x": {huge}}}',
                                 headers={"content-type": "application/json"}, timeout=60)
        assert 400 <= response.status_code < 500, (path, response.status_code)
    response = requests.post(f"{site['url']}/activelearning/random", json={"x": [int(BIG)]}, timeout=60)
    assert response.status_code == 422 and "params.x[0]" in detail(response)


@pytest.mark.parametrize("method, path, kwargs, status, message", [
    ("POST", "/activelearning/nope", {"json": {}}, 404, "Unknown strategy 'nope'"),
    ("POST", "/scoring/nope", {"json": {}}, 404, "Unknown scoring method 'nope'"),
    ("POST", "/train/nope", {"json": {}}, 404, "Unknown model 'nope'"),
    ("DELETE", "/datastore/image", {"params": {"id": "nope"}}, 404, "Image 'nope' is not in the datastore"),
    ("PUT", "/datastore/image/info", {"params": {"image": "nope"}, "data": {"info": "{}"}}, 404,
     "Image 'nope' is not in the datastore"),
    ("PUT", "/datastore/image/info", {"params": {"image": "case1"}, "data": {"info": "[1]"}}, 422,
     "info must be a JSON object"),
    ("PUT", "/datastore/image/info", {"params": {"image": "case1"}, "data": {"info": "{not json"}}, 422,
     "info is not valid JSON"),
    ("PUT", "/datastore/label/info", {"params": {"label": "case1", "tag": "final"}, "data": {"info": "{}"}}, 404,
     "has no label tagged 'final'"),
    ("DELETE", "/datastore/label", {"params": {"id": "case0", "tag": "../../x"}}, 400,
     "tag '../../x' is not a valid id"),
    ("DELETE", "/datastore/label", {"params": {"id": "../case0", "tag": "final"}}, 400,
     "id '../case0' is not a valid id"),
    ("GET", "/datastore/label", {"params": {"label": "case0", "tag": "../final"}}, 400,
     "tag '../final' is not a valid id"),
    ("GET", "/datastore/image", {"params": {"image": "/etc/hostname"}}, 400, "is not a valid id"),
    ("HEAD", "/datastore/image", {"params": {"image": "case1", "check_sum": "SHA1:abc"}}, 400, None),
    ("POST", "/infer/icl_sam2", {"params": {"image": "case1", "output": "dicom_seg"}, "data": {"params": "{}"}}, 400,
     "output=dicom_seg needs a DICOMweb datastore"),
    ("GET", "/datastore/dataset", {"params": {"limit_cases": "9" * 5000}}, 422, "query.limit_cases"),
    ("GET", "/datastore/dataset", {"params": {"limit_cases": "many"}}, 422, "query.limit_cases"),
])
def test_client_mistakes_on_monai_label_routes_are_4xx_naming_what_is_wrong(site, guard, method, path, kwargs, status,
                                                                          message):
    before = tree(site["studies"])
    response = requests.request(method, f"{site['url']}{path}", timeout=120, **kwargs)
    assert response.status_code == status, (response.status_code, response.text[:300])
    if message:
        assert message in detail(response), detail(response)
    changed = {k for k in set(before) | set(tree(site["studies"])) if before.get(k) != tree(site["studies"]).get(k)}
    assert changed <= {"datastore_v2.json"}, changed  # MONAI Label may re-record its index; no file changed


@pytest.mark.parametrize("params", ["{not json", "[1]", f'{{"x": {"9" * 5000}}}'])
def test_a_label_upload_with_bad_params_is_422_and_stores_nothing(site, guard, params):
    before = tree(site["studies"] / "labels")
    with open(site["label"], "rb") as f:
        response = requests.put(f"{site['url']}/datastore/label", params={"image": "case0", "tag": "final"},
                                data={"params": params}, files={"label": ("label.nii.gz", f)}, timeout=120)
    assert response.status_code == 422 and "params" in detail(response), detail(response)
    assert tree(site["studies"] / "labels") == before


@pytest.mark.parametrize("path, field", [("/datastore/image", "file"), ("/datastore/label", "label"),
                                         ("/session/", "files")])
def test_upload_names_too_long_for_the_file_system_are_400(site, guard, path, field):
    name = "a." + "b" * 300 + ".nii.gz"
    with open(site["studies"] / "case2.nii.gz", "rb") as f:
        response = requests.put(f"{site['url']}{path}", params={"image": "case2", "tag": "final"},
                                files={field: (name, f)}, timeout=120)
    assert response.status_code == 400 and f"{field}: the file name has" in detail(response), detail(response)


def test_an_infer_request_with_a_label_file_is_400(site, guard):
    for name in ("scribbles.exe", "label.nii.gz", "label.bin"):
        with open(site["label"], "rb") as f:
            response = _infer(site, "icl_sam2_interactive", '{"foreground": [[30, 30, 8]]}', files={"label": (name, f)})
        assert response.status_code == 400 and "label: the models of this app take no label file" in detail(response)


# ---------------------------------------------------------------- case 9: same origin
EVIL = "http://evil.example"


def test_no_cross_origin_access_not_even_reads(site, guard):
    response = requests.get(f"{site['url']}/datastore/", params={"output": "all"}, headers={"Origin": EVIL}, timeout=60)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    response = requests.options(f"{site['url']}/datastore/label", timeout=60,
                                headers={"Origin": EVIL, "Access-Control-Request-Method": "DELETE"})
    assert "access-control-allow-origin" not in response.headers and response.status_code >= 400


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart", "text/plain"])
def test_a_cross_origin_form_post_is_refused_and_stores_nothing(site, guard, encoding):
    params = json.dumps({"foreground": [[30, 30, 8]], "label": "blob", "save_label": True, "label_tag": "evil"})
    body = {"urlencoded": {"data": {"params": params}},
            "multipart": {"files": {"params": (None, params)}},
            "text/plain": {"data": f"params={params}", "headers": {"Content-Type": "text/plain"}}}[encoding]
    headers = {"Origin": EVIL, **body.pop("headers", {})}
    response = requests.post(f"{site['url']}/infer/icl_sam2_interactive", params={"image": "case1"}, headers=headers,
                             timeout=300, **body)
    assert response.status_code == 403 and "Cross-origin request refused" in detail(response), detail(response)
    assert not (site["studies"] / "labels" / "evil").exists()


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                                     {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"}])
def test_requests_a_browser_marks_as_cross_site_are_refused(site, guard, headers):
    with open(site["label"], "rb") as f:
        response = requests.put(f"{site['url']}/datastore/label", params={"image": "case0", "tag": "final"},
                                files={"label": ("label.nii.gz", f)}, headers=headers, timeout=120)
    assert response.status_code == 403 and "Cross-origin request refused" in detail(response)
    response = requests.delete(f"{site['url']}/datastore/image", params={"id": "case3"}, headers=headers, timeout=60)
    assert response.status_code == 403 and (site["studies"] / "case3.nii.gz").is_file()


def test_the_servers_own_pages_and_programs_pass(site, guard):
    """The bundled OHIF sends the server's own origin; 3D Slicer and MONAILabelClient send none."""
    own = {"Origin": site["url"], "Sec-Fetch-Site": "same-origin"}
    for headers in (own, {}):
        response = requests.post(f"{site['url']}/activelearning/random", json={}, headers=headers, timeout=60)
        assert response.status_code == 200 and response.json().get("id"), detail(response)
