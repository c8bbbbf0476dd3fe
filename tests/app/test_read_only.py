"""Read-only means read-only (issue 19, case 3): with ``MONAI_LABEL_DATASTORE_READ_ONLY=true`` every write is a 403
naming the setting, and nothing in the studies folder changes; reading, inference and sessions work.

The studies folder has no ``datastore_v2.json``: MONAI Label's own read-only flag would then list
no image at all; here the index is built from the files in memory and never written.
"""

from __future__ import annotations

import json

import pytest
import requests

from . import sites
from .sites import detail, guarded, tree

pytestmark = pytest.mark.slow  # a real MONAI Label server per module

SETTING = "MONAI_LABEL_DATASTORE_READ_ONLY=true"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # case0 has an 'original' label and no image a final one: nothing is labelled for training
    site = sites.make_site(tmp_path_factory.mktemp("read_only"), final_labels=0, other_labels={"original": 0})
    # scoring at start-up on too: it stores scores in the datastore, so in read-only mode it must not run
    server = sites.start(
        site, env={"MONAI_LABEL_DATASTORE_READ_ONLY": "true", "MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}
    )
    site["before"] = tree(site["studies"])
    yield site
    server.stop()


@pytest.fixture
def guard(site):
    with guarded(site):
        yield
    assert tree(site["studies"]) == site["before"], "the read-only datastore changed"


def _upload(site, path: str, field: str, params: dict, source):
    with open(source, "rb") as f:
        return requests.put(f"{site['url']}{path}", params=params, files={field: (source.name, f)}, timeout=120)


@pytest.mark.parametrize(
    "write, what",
    [
        (
            lambda s: _upload(s, "/datastore/label", "label", {"image": "case1", "tag": "final"}, s["label"]),
            "label uploads",
        ),
        (
            lambda s: _upload(s, "/datastore/image", "file", {"image": "new"}, s["studies"] / "case2.nii.gz"),
            "image uploads",
        ),
        (lambda s: _upload(s, "/datastore/", "file", {"image": "new"}, s["studies"] / "case2.nii.gz"), "image uploads"),
        (
            lambda s: requests.delete(
                f"{s['url']}/datastore/label", params={"id": "case0", "tag": "original"}, timeout=60
            ),
            "label deletions",
        ),
        (
            lambda s: requests.delete(f"{s['url']}/datastore/image", params={"id": "case3"}, timeout=60),
            "image deletions",
        ),
        (
            lambda s: requests.put(
                f"{s['url']}/datastore/image/info", params={"image": "case2"}, data={"info": '{"a": 1}'}, timeout=60
            ),
            "image info updates",
        ),
        (
            lambda s: requests.put(
                f"{s['url']}/datastore/label/info",
                params={"label": "case0", "tag": "original"},
                data={"info": '{"a": 1}'},
                timeout=60,
            ),
            "label info updates",
        ),
        (lambda s: requests.post(f"{s['url']}/train/", json={}, timeout=60), "training runs"),
        (lambda s: requests.post(f"{s['url']}/train/icl_sam2", json={}, timeout=60), "training runs"),
        (lambda s: requests.post(f"{s['url']}/scoring/icl_sam2_confidence", json={}, timeout=60), "scoring runs"),
        (
            lambda s: requests.post(
                f"{s['url']}/infer/icl_sam2_interactive",
                params={"image": "case2"},
                timeout=300,
                data={"params": json.dumps({"foreground": [[30, 30, 8]], "save_label": True})},
            ),
            "results stored with save_label",
        ),
    ],
)
def test_every_write_is_403_naming_the_setting(site, guard, write, what):
    response = write(site)
    assert response.status_code == 403 and SETTING in detail(response) and what in detail(response), detail(response)


def test_reads_inference_and_sessions_work_and_change_nothing(site, guard):
    listing = requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    assert sorted(listing) == ["case0", "case1", "case2", "case3"] and list(listing["case0"]["labels"]) == ["original"]
    response = requests.post(f"{site['url']}/activelearning/random", json={}, timeout=60)
    assert response.status_code == 200 and response.json()["id"] in listing  # its record of the proposal is refused
    response = requests.post(
        f"{site['url']}/infer/icl_sam2_interactive",
        params={"image": "case2"},
        timeout=300,
        data={"params": json.dumps({"foreground": [[30, 30, 8]]})},
    )
    assert response.status_code == 200, detail(response)
    with open(site["studies"] / "case1.nii.gz", "rb") as f:  # a session holds a volume outside the datastore
        response = requests.put(f"{site['url']}/session/", files={"files": ("volume.nii.gz", f)}, timeout=120)
    assert response.status_code == 200, detail(response)
    assert (
        requests.get(
            f"{site['url']}/datastore/label", params={"label": "case0", "tag": "original"}, timeout=60
        ).status_code
        == 200
    )


def test_the_dataset_archive_without_labelled_images_is_404(site, guard):
    """Case 8: MONAI Label asserts that the archive is not empty (a 500)."""
    response = requests.get(f"{site['url']}/datastore/dataset", timeout=60)
    assert response.status_code == 404 and "No image has a final label" in detail(response), detail(response)
