"""Datastore uploads and downloads against the real server (``lib/datastore_endpoints.py``).

- A rejected upload (a malformed ``params`` field, a bad id or file) is a 4xx naming the
  field and leaves the datastore byte for byte: MONAI Label answered 500 and had already
  replaced the stored label (``params=[1]``), and left the upload in the temporary folder.
- A download is one whole version of the file while the label is being saved: MONAI
  Label took the length from one version and the body from another.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from model_core.io.phantoms import write_phantom_dataset

from .conftest import Server

pytestmark = pytest.mark.slow  # a real MONAI Label server per module

LABELS = {"blob": 1, "tube": 2, "block": 3}


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Images ``case0..2`` (case0 labelled), two label versions of different sizes, the server's own temp folder."""
    root = tmp_path_factory.mktemp("endpoints")
    datalist = json.loads(
        Path(write_phantom_dataset(str(root / "src"), train=3, validation=0, test=0, shape=(16, 64, 64))).read_text()
    )
    studies = root / "studies"
    studies.mkdir()
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], studies / f"case{i}.nii.gz")
    label = np.asarray(nib.load(str(root / "src" / datalist["training"][0]["label"])).dataobj).astype(np.uint8)
    versions = []
    for name, array in (("whole", label), ("fewer", np.where(label == 3, 0, label).astype(np.uint8))):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / f"{name}.nii.gz"))
        versions.append(root / f"{name}.nii.gz")
    assert versions[0].stat().st_size != versions[1].stat().st_size
    temp = root / "server_tmp"  # the server's TMPDIR: where MONAI Label left the uploads it failed on
    temp.mkdir()
    server = Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "checkpoint": str(root / "models" / "model.pt"),
        },
        root / "server.log",
        env={"TMPDIR": str(temp)},
    )
    site = {"root": root, "studies": studies, "url": server.url, "versions": versions, "temp": temp}
    assert _put_label(site, "case0", versions[0]).status_code == 200
    yield site
    server.stop()


@pytest.fixture
def unchanged(site):
    """After the test: the datastore (files and index) byte for byte as before, nothing left in the server's
    temporary folder, and the server still serving."""
    before, temp_before = _tree(site["studies"]), set(_tree(site["temp"]))
    yield
    assert requests.get(f"{site['url']}/info/", timeout=30).status_code == 200, "the server stopped serving"
    assert _tree(site["studies"]) == before, "a rejected upload changed the datastore"
    assert set(_tree(site["temp"])) == temp_before, "a rejected upload was left in the temporary folder"


def _put_label(site, image: str, path: Path, params: str | None = None, tag: str = "final", name: str | None = None):
    data = {} if params is None else {"params": params}
    with open(path, "rb") as f:
        return requests.put(
            f"{site['url']}/datastore/label",
            params={"image": image, "tag": tag},
            data=data,
            files={"label": (name or path.name, f)},
            timeout=120,
        )


def _put_image(site, image: str | None, path: Path, params: str | None = None, name: str | None = None):
    data = {} if params is None else {"params": params}
    with open(path, "rb") as f:
        return requests.put(
            f"{site['url']}/datastore/image",
            params={"image": image} if image else {},
            data=data,
            files={"file": (name or path.name, f)},
            timeout=120,
        )


def _detail(response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text


BAD_PARAMS = [
    ("[1]", "must be a JSON object"),
    ("not json", "is not valid JSON"),
    ('"x"', "must be a JSON object"),
    ("1", "must be a JSON object"),
    ('{"a": NaN}', "params.a is nan: numbers must be finite"),
    ('{"a": [1, 1e999]}', "params.a[1] is inf: numbers must be finite"),
    ('{"a": ' + "9" * 5000 + "}", "is not valid JSON"),
    ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "is not valid JSON"),
]


@pytest.mark.parametrize("params, message", BAD_PARAMS, ids=[p[:12] for p, _ in BAD_PARAMS])
def test_a_label_upload_with_bad_params_is_422_and_the_stored_label_stays(site, unchanged, params, message):
    response = _put_label(site, "case0", site["versions"][1], params)  # the other version: a write would show
    assert response.status_code == 422, (response.status_code, _detail(response))
    assert _detail(response).startswith("params") and message in _detail(response), _detail(response)


@pytest.mark.parametrize("params, message", BAD_PARAMS[:2], ids=["list", "not-json"])
def test_an_image_upload_with_bad_params_is_422_and_adds_nothing(site, unchanged, params, message):
    response = _put_image(site, "new_image", site["studies"] / "case1.nii.gz", params)
    assert response.status_code == 422 and message in _detail(response) and _detail(response).startswith("params")
    objects = requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert "new_image" not in objects


def test_a_label_of_a_bad_file_is_400_and_leaves_no_upload_behind(site, unchanged):
    bad = site["root"] / "not_a_volume.nii.gz"
    bad.write_bytes(b"not a NIfTI file")
    response = _put_label(site, "case0", bad, "{}")
    assert response.status_code == 400 and "label" in _detail(response).lower(), _detail(response)


def test_the_client_file_name_is_never_used_as_a_path(site):
    """Only the format of the client's file name is kept: a name with a path in it is harmless, a name too long for
    the file system is a 400 naming the field (MONAI Label made its temporary file's name end with every suffix of
    the client's name: a 500)."""
    response = _put_label(site, "case1", site["versions"][0], '{"client": "slicer"}', name="../../../escaped.nii.gz")
    assert response.status_code == 200, _detail(response)
    info = requests.get(f"{site['url']}/datastore/label/info", params={"label": "case1", "tag": "final"}, timeout=30)
    assert info.json()["client"] == "slicer" and info.json()["name"] == "case1.nii.gz"
    long_name = "x." * 150 + "nii.gz"
    response = _put_label(site, "case1", site["versions"][1], "{}", name=long_name)
    assert response.status_code == 400 and "the file name has 306 characters" in _detail(response)
    response = _put_image(site, None, site["studies"] / "case2.nii.gz", name="case2 copy.nii.gz")
    assert response.status_code == 400 and "is not a valid id" in _detail(response)  # the id would come from it
    response = _put_image(
        site, "case2_copy", site["studies"] / "case2.nii.gz", '{"source": "test"}', name="../case2.nii.gz"
    )
    assert response.status_code == 200 and response.json() == {"image": "case2_copy"}
    info = requests.get(f"{site['url']}/datastore/image/info", params={"image": "case2_copy"}, timeout=30).json()
    assert info["source"] == "test" and info["name"] == "case2_copy.nii.gz"
    assert (site["studies"] / "case2_copy.nii.gz").read_bytes() == (site["studies"] / "case2.nii.gz").read_bytes()


def test_downloads_are_one_whole_version_while_the_label_is_saved(site):
    """4 threads save the two versions of case0's label in turn while 4 threads download it."""
    versions = {p.read_bytes() for p in site["versions"]}
    saves_left = [4 * 25]
    lock = threading.Lock()
    outcomes: dict[str, int] = {}
    errors: list[str] = []

    def note(outcome: str) -> None:
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def save(i: int) -> None:
        while True:
            with lock:
                if saves_left[0] == 0:
                    return
                saves_left[0] -= 1
                k = saves_left[0]
            response = _put_label(site, "case0", site["versions"][(i + k) % 2], "{}")
            if response.status_code != 200:
                errors.append(f"save: {response.status_code} {_detail(response)}")

    def download() -> None:
        while saves_left[0] > 0:
            try:
                response = requests.get(
                    f"{site['url']}/datastore/label", params={"label": "case0", "tag": "final"}, timeout=60
                )
            except requests.RequestException as e:  # an incomplete read: the length of one version, the body of another
                note(f"failed: {type(e).__name__}")
                continue
            whole = (
                response.status_code == 200
                and response.content in versions
                and int(response.headers["content-length"]) == len(response.content)
            )
            note("whole" if whole else f"torn ({response.status_code}, {len(response.content)} bytes)")

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)] + [
        threading.Thread(target=download) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert outcomes.get("whole", 0) > 0 and set(outcomes) == {"whole"}, outcomes


def test_downloads_of_an_image_and_of_what_is_not_there(site):
    response = requests.get(f"{site['url']}/datastore/image", params={"image": "case1"}, timeout=60)
    assert response.status_code == 200 and response.content == (site["studies"] / "case1.nii.gz").read_bytes()
    assert response.headers["content-disposition"] == 'attachment; filename="case1.nii.gz"'
    for params in ({"label": "case2", "tag": "final"}, {"label": "case0", "tag": "nothing"}):
        response = requests.get(f"{site['url']}/datastore/label", params=params, timeout=30)
        assert response.status_code == 404 and "has no label tagged" in _detail(response)
    response = requests.get(f"{site['url']}/datastore/label", params={"label": "../case0", "tag": "final"}, timeout=30)
    assert response.status_code == 400 and "is not a valid id" in _detail(response)
    response = requests.get(f"{site['url']}/datastore/image", params={"image": "nothing"}, timeout=30)
    assert response.status_code == 404 and "'nothing' is not in the datastore" in _detail(response)
