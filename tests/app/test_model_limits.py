"""Issue 19 against the real server over loopback: border voxels are valid clicks (case 7), training says what is
wrong (case 10), and a request that finds every volume slot taken is answered 503 with Retry-After (case 11).

One server for the module, with one volume slot and no wait (``--conf max_preprocessing 1
--conf preprocessing_wait_s 0``), so that simultaneous first clicks show the busy answer;
the other tests send one request at a time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import make_phantom, write_phantom_dataset

from .conftest import Server

LABELS = {"blob": 1, "tube": 2, "block": 3}
#: images whose size is not the model's (64): (I, J, K) and voxel spacing (negative: stored flipped)
BORDER_IMAGES = {"wide": ((96, 80, 12), (-0.8, -1.2, 2.5)), "small": ((40, 48, 10), (1.0, 1.0, 1.0))}

pytestmark = pytest.mark.slow  # a real MONAI Label server, training runs


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_limits")
    datalist = json.loads(
        Path(write_phantom_dataset(str(root / "src"), train=3, validation=0, test=0, shape=(16, 64, 64))).read_text()
    )
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], studies / f"case{i}.nii.gz")
    for name, ((I, J, K), spacing) in BORDER_IMAGES.items():
        image, _ = make_phantom((K, J, I), seed=3)
        nib.save(
            nib.Nifti1Image(
                np.ascontiguousarray(image.transpose(2, 1, 0)).astype(np.float32), np.diag([*spacing, 1.0])
            ),
            str(studies / f"{name}.nii.gz"),
        )
    rng = np.random.default_rng(0)
    nib.save(
        nib.Nifti1Image(rng.random((256, 256, 64), dtype=np.float32), np.diag([0.8, 0.8, 1.5, 1.0])),
        str(studies / "big.nii.gz"),
    )
    checkpoint = root / "published" / "model.pt"
    checkpoint.parent.mkdir()
    save_checkpoint(build_icl_sam2("tiny", image_size=64), str(checkpoint))
    server = Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "checkpoint": str(checkpoint),
            "max_preprocessing": "1",
            "preprocessing_wait_s": "0",
        },
        root / "server.log",
    )
    yield {
        "root": root,
        "studies": studies,
        "src": root / "src",
        "datalist": datalist,
        "server": server,
        "url": server.url,
        "checkpoint": checkpoint,
        "log": root / "server.log",
    }
    server.stop()


@pytest.fixture
def alive(site):
    yield
    assert requests.get(f"{site['url']}/info/", timeout=30).status_code == 200, "the server stopped serving"


def _client(site, client_id: str) -> MONAILabelClient:
    return MONAILabelClient(site["url"], tmpdir=str(site["root"] / "client" / client_id), client_id=client_id)


def _on_the_image_grid(site, result: str, name: str) -> None:
    label, image = nib.load(result), nib.load(str(site["studies"] / f"{name}.nii.gz"))
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-4)


# ---------------------------------------------------------------- case 7: every voxel is a valid click
@pytest.mark.parametrize("name", list(BORDER_IMAGES))
def test_clicks_on_corners_and_edges_and_a_whole_image_roi_answer_200(site, alive, name):
    (I, J, K), _ = BORDER_IMAGES[name]
    client = _client(site, f"border_{name}")
    corners = [[i, j, K // 2] for i in (0, I // 2, I - 1) for j in (0, J // 2, J - 1) if (i, j) != (I // 2, J // 2)]
    path, _info = client.infer(
        "icl_sam2_interactive", name, {"foreground": corners, "background": [[0, 0, 0], [I - 1, J - 1, K - 1]]}
    )
    _on_the_image_grid(site, path, name)
    path, _info = client.infer("icl_sam2_interactive", name, {"roi": [0, I - 1, 0, J - 1, 0, K - 1]})
    _on_the_image_grid(site, path, name)


# ---------------------------------------------------------------- case 11: bounded preprocessing, then 503
def test_simultaneous_first_clicks_beyond_the_cap_get_503_with_retry_after(site, alive):
    """Four clients click a 256x256x64 volume at once: one volume slot, no wait, so the ones that find it taken
    are told to come back; none fails otherwise, and the server serves on."""
    start = threading.Barrier(4)
    answers: list[requests.Response] = []

    def first_click(n: int) -> None:
        start.wait(60)
        answers.append(
            requests.post(
                f"{site['url']}/infer/icl_sam2_interactive",
                params={"image": "big"},
                data={"params": json.dumps({"foreground": [[128, 128, 32]], "client_id": f"burst{n}"})},
                timeout=600,
            )
        )

    threads = [threading.Thread(target=first_click, args=(n,)) for n in range(4)]
    [t.start() for t in threads]
    [t.join(600) for t in threads]
    codes = sorted(a.status_code for a in answers)
    assert len(codes) == 4 and set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for busy in (a for a in answers if a.status_code == 503):
        assert int(busy.headers["Retry-After"]) >= 1
        assert "busy" in busy.json()["detail"] and "at most 1" in busy.json()["detail"]


# ---------------------------------------------------------------- case 10: training says what is wrong
def _train(site) -> dict:
    response = requests.post(
        f"{site['url']}/train/icl_sam2", json={"max_epochs": 1, "episodes_per_epoch": 2, "device": "cpu"}, timeout=60
    )
    assert response.status_code == 200, response.text
    task = response.json()["id"]
    deadline = time.time() + 900
    while time.time() < deadline:
        status = requests.get(f"{site['url']}/train/", timeout=30).json()
        if status.get("id") == task and status.get("status") in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(2)
    raise AssertionError("training did not finish in time")


def _hand_placed(site, case: int, value: int | None) -> Path:
    """Case ``case``'s phantom label written straight into labels/final (class 2 as ``value``, or as it is)."""
    source = nib.load(str(site["src"] / site["datalist"]["training"][case]["label"]))
    array = np.asarray(source.dataobj).astype(np.int16)
    if value is not None:
        array[array == 2] = value
    path = site["studies"] / "labels" / "final" / f"case{case}.nii.gz"
    nib.save(nib.Nifti1Image(array, source.affine), str(path))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_names_a_bad_label_and_fails_without_publishing_when_too_few_are_left(site, alive):
    for case in (0, 1):
        _hand_placed(site, case, None)
    bad = _hand_placed(site, 2, 7)  # a value that is not configured, placed by hand
    deadline = time.time() + 30  # the datastore notices the files on its own
    while (
        len(
            [
                i
                for i, o in requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=30)
                .json()["objects"]
                .items()
                if o.get("labels")
            ]
        )
        < 3
    ):
        assert time.time() < deadline, "the datastore did not pick up the labels"
        time.sleep(0.5)
    before = _sha(site["checkpoint"])
    status = _train(site)  # two usable labels: trains, leaves the bad one out and says so
    details = "\n".join(status.get("details", []))
    assert status["status"] == "DONE", details
    assert str(bad) in details and "values [7] that are not configured labels" in details
    assert _sha(site["checkpoint"]) != before  # published
    log = site["log"].read_text()
    assert f"Training leaves out the final label '{bad}'" in log and "values [7]" in log

    published = _sha(site["checkpoint"])
    _hand_placed(site, 1, 9)  # now only one usable label: the run cannot start, and says which files are why
    status = _train(site)
    details = "\n".join(status.get("details", []))
    assert status["status"] == "ERROR", details
    last = status["details"][-1]
    assert "Training failed, nothing was published" in last and "at least two labelled volumes" in last
    assert str(bad) in last and str(site["studies"] / "labels" / "final" / "case1.nii.gz") in last
    assert "values [9]" in last
    assert _sha(site["checkpoint"]) == published  # byte for byte
