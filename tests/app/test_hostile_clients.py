"""Hostile and careless clients against the real server: every attempt is a clear 4xx, nothing leaves the datastore.

Each test asserts the status and the message, that the server still serves, that no
file appeared outside the studies folder, and that no stored label changed
(the ``guard`` fixture checks the last two after every test).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from model_core.io.phantoms import write_phantom_dataset as make_dataset

from .conftest import Server

LABELS = {"blob": 1, "tube": 2, "block": 3}
SHAPE = (64, 64, 16)


pytestmark = pytest.mark.slow  # a real MONAI Label server per module


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``root/box/studies`` is the datastore; ``root/box`` must hold nothing else, ever."""
    root = tmp_path_factory.mktemp("hostile")
    datalist = json.loads(
        Path(
            make_dataset(str(root / "src"), train=4, validation=0, test=0, shape=(SHAPE[2], SHAPE[0], SHAPE[1]))
        ).read_text()
    )
    studies = root / "box" / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], studies / f"case{i}.nii.gz")
    shutil.copy(root / "src" / datalist["training"][0]["label"], studies / "labels" / "final" / "case0.nii.gz")
    run_dir = root / "run"  # the server's working directory, where a relative escape would land
    run_dir.mkdir()
    server = Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "checkpoint": str(root / "models" / "model.pt"),
        },
        run_dir / "server.log",
    )
    files = root / "files"
    files.mkdir()
    yield {
        "root": root,
        "studies": studies,
        "server": server,
        "url": server.url,
        "files": files,
        "src": root / "src",
        "datalist": datalist,
    }
    server.stop()


@pytest.fixture
def guard(site):
    """Snapshot of the box (studies) and of the run folder; after the test: server alive, nothing escaped."""
    box, run_dir = site["root"] / "box", site["root"] / "run"
    before = _tree(box / "studies" / "labels")
    run_before = set(os.listdir(run_dir))
    yield
    assert requests.get(f"{site['url']}/info/", timeout=30).status_code == 200, "the server stopped serving"
    assert sorted(os.listdir(box)) == ["studies"], f"a file escaped the studies folder: {os.listdir(box)}"
    assert set(os.listdir(run_dir)) <= run_before | {"logs"}, (
        f"a file appeared in the server's folder: {set(os.listdir(run_dir)) - run_before}"
    )
    for escaped in ("/tmp/escaped_tag", "/tmp/escaped_image", "/tmp/x", "/x"):
        assert not os.path.exists(escaped), f"{escaped} was written"
    after = _tree(box / "studies" / "labels")
    assert {k: v for k, v in after.items() if k in before} == before, "a stored label changed"


def _nifti(site, name: str, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = site["files"] / name
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _image_affine(site) -> np.ndarray:
    return nib.load(str(site["studies"] / "case1.nii.gz")).affine


def put_label(site, image: str, path: Path, tag: str = "final"):
    with open(path, "rb") as f:
        return requests.put(
            f"{site['url']}/datastore/label",
            params={"image": image, "tag": tag},
            files={"label": (path.name, f)},
            timeout=120,
        )


def put_image(site, image: str, path: Path):
    with open(path, "rb") as f:
        return requests.put(
            f"{site['url']}/datastore/image", params={"image": image}, files={"file": (path.name, f)}, timeout=120
        )


def infer(site, model: str, image: str, params, timeout=300):
    body = params if isinstance(params, str) else json.dumps(params)
    return requests.post(
        f"{site['url']}/infer/{model}", params={"image": image}, data={"params": body}, timeout=timeout
    )


def _detail(response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text


def _ids(site) -> set[str]:
    return set(requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=30).json()["objects"])


# ---------------------------------------------------------------- path traversal
@pytest.mark.parametrize("tag", ["../../escaped_tag", "final/../../../x", "/tmp/escaped_tag", "..", "a" * 200, ""])
def test_label_tags_cannot_leave_the_datastore(site, guard, tag):
    label = site["src"] / site["datalist"]["training"][1]["label"]
    response = put_label(site, "case1", label, tag=tag)
    if tag == "":  # MONAI Label's own default: an empty tag is the final tag
        assert response.status_code == 200
        requests.delete(f"{site['url']}/datastore/label", params={"id": "case1", "tag": "final"}, timeout=30)
        return
    assert response.status_code == 400 and "is not a valid id" in _detail(response) and "tag" in _detail(response)


@pytest.mark.parametrize("image_id", ["../escaped_image", "/tmp/escaped_image", "a/b", "..", "x" * 200, ".hidden"])
def test_image_ids_cannot_leave_the_datastore(site, guard, image_id):
    response = put_image(site, image_id, site["studies"] / "case2.nii.gz")
    assert response.status_code == 400 and "is not a valid id" in _detail(response)
    assert image_id not in _ids(site)
    proposal = requests.post(f"{site['url']}/activelearning/random", json={}, timeout=30).json()
    assert proposal.get("id") != image_id


def test_inference_results_are_never_saved_outside_or_as_final(site, guard):
    params = {"foreground": [[30, 30, 8]], "label": "blob", "save_label": True}
    response = infer(site, "icl_sam2_interactive", "case2", {**params, "label_tag": "../../x"})
    assert (
        response.status_code == 422
        and "params.label_tag" in _detail(response)
        and "not a valid id" in _detail(response)
    )
    response = infer(site, "icl_sam2_interactive", "case0", {**params, "label_tag": "final"})
    assert (
        response.status_code == 422
        and "params.label_tag" in _detail(response)
        and "never stored as 'final'" in _detail(response)
    )
    # a valid non-final tag is stored through the checked datastore, beside the user's final label
    response = infer(site, "icl_sam2_interactive", "case0", {**params, "label_tag": "proposal"})
    assert response.status_code == 200
    assert (site["studies"] / "labels" / "proposal" / "case0.nii.gz").is_file()


@pytest.mark.parametrize("where", ["url", "params"])
def test_inference_never_reads_a_server_path(site, guard, where):
    outside = _nifti(site, "outside.nii.gz", np.random.rand(*SHAPE).astype(np.float32), _image_affine(site))
    stored_label = site["studies"] / "labels" / "final" / "case0.nii.gz"
    for path in (str(outside), str(stored_label)):
        if where == "url":
            response = infer(site, "icl_sam2_interactive", path, {"foreground": [[30, 30, 8]]})
            assert response.status_code == 400 and "is not a valid id" in _detail(response), _detail(response)
        else:
            response = infer(site, "icl_sam2_interactive", "case1", {"foreground": [[30, 30, 8]], "image": path})
            assert response.status_code == 422 and "params.image" in _detail(response), _detail(response)


def test_params_model_cannot_override_the_url(site, guard):
    response = infer(site, "icl_sam2_interactive", "case1", {"foreground": [[30, 30, 8]], "model": "icl_sam2"})
    assert response.status_code == 422 and "params.model" in _detail(response)
    response = infer(site, "icl_sam2", "case1", {"model": "icl_sam2"})  # the same model: harmless
    assert response.status_code == 200


def test_unknown_image_and_empty_id_are_4xx(site, guard):
    response = infer(site, "icl_sam2", "no_such_case", {})
    assert response.status_code == 404 and "not in the datastore" in _detail(response)
    response = infer(site, "icl_sam2", "", {})
    assert response.status_code == 400 and "image is empty" in _detail(response)


# ---------------------------------------------------------------- bad uploads
@pytest.mark.parametrize(
    "name, array, message",
    [
        ("four_d", np.random.rand(*SHAPE, 3).astype(np.float32), "3D scalar volume"),
        ("five_d", np.random.rand(*SHAPE, 1, 2).astype(np.float32), "3D scalar volume"),
        ("two_d", np.random.rand(64, 64).astype(np.float32), "3D scalar volume"),
        ("tiny", np.ones((1, 1, 1), np.float32), "at least 4 voxels"),
        ("all_nan", np.full(SHAPE, np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_images_the_model_cannot_use_are_refused(site, guard, name, array, message):
    before = _tree(site["studies"])
    response = put_image(site, name, _nifti(site, f"{name}.nii.gz", array))
    assert response.status_code == 400 and message in _detail(response), _detail(response)
    assert name not in _ids(site) and _tree(site["studies"]) == before


def test_an_image_id_is_never_silently_replaced(site, guard):
    response = put_image(site, "case3", site["studies"] / "case2.nii.gz")
    assert response.status_code == 409 and "already in the datastore" in _detail(response)
    same = site["files"] / "same.nii.gz"
    shutil.copy(site["studies"] / "case3.nii.gz", same)
    assert put_image(site, "case3", same).status_code == 200  # the same bytes again: idempotent


@pytest.mark.parametrize(
    "name, values, message",
    [
        ("float", 0.5, "non-integer values"),
        ("negative", -1, "not configured labels"),
        ("seven", 7, "not configured labels"),
        ("two_hundred", 200, "not configured labels"),
        ("four_d", None, "3D scalar volume"),
    ],
)
def test_labels_the_model_cannot_use_are_refused(site, guard, name, values, message):
    affine = _image_affine(site)
    if values is None:
        array = np.zeros((*SHAPE, 3), np.uint8)
    else:
        array = np.zeros(SHAPE, np.float32 if isinstance(values, float) else np.int16)
        array[20:40, 20:40, 4:10] = values
    response = put_label(site, "case0", _nifti(site, f"label_{name}.nii.gz", array, affine))
    assert response.status_code == 400 and message in _detail(response), _detail(response)


def test_uploads_of_other_file_types_are_refused(site, guard):
    label = site["files"] / "label.exe"
    shutil.copy(site["src"] / site["datalist"]["training"][1]["label"], label)
    response = put_label(site, "case1", label)
    assert response.status_code == 400 and "not one of the volume formats" in _detail(response)
    response = put_image(site, "exe_image", label)
    assert response.status_code == 400 and "not one of the volume formats" in _detail(response)


def test_a_bad_stored_label_is_skipped_not_fatal(site, guard):
    """A 4D file placed in labels/final by hand (or stored before the checks) leaves the others working."""
    bad = site["studies"] / "labels" / "final" / "case3.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 3), np.uint8), _image_affine(site)), str(bad))
    try:
        deadline = time.time() + 30  # the datastore notices new files on its own
        while "case3" not in {
            i
            for i, o in requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=30)
            .json()["objects"]
            .items()
            if o.get("labels")
        }:
            assert time.time() < deadline, "the datastore did not pick up the file"
            time.sleep(0.5)
        response = infer(site, "icl_sam2", "case1", {})
        assert response.status_code == 200, _detail(response)
        info = json.loads(response.content.split(b'name="params"')[1].split(b"\r\n\r\n", 1)[1].split(b"\r\n--")[0])
        assert info["support_volumes"] == 1
        assert [s["id"] for s in info["skipped_support"]] == ["case3"] and "3D scalar volume" in info[
            "skipped_support"
        ][0]["reason"]
        scoring = requests.post(f"{site['url']}/scoring/icl_sam2_confidence", params={"run_sync": "true"}, timeout=300)
        assert scoring.status_code == 200
    finally:
        bad.unlink()


@pytest.mark.parametrize(
    "name, message",
    [
        ("nan_by_hand", "NaN or infinite"),
        ("truncated_by_hand", "not a readable image volume"),
        ("four_d_by_hand", "3D scalar volume"),
    ],
)
def test_an_image_placed_by_hand_that_the_model_cannot_use_is_a_400(site, guard, name, message):
    """A file copied into the studies folder skips the upload's checks. A request on it is a 400 naming the
    rule, whether the header tells (the app's check) or only the voxels do (the service's read), for each
    model that reads the image; the server keeps serving."""
    path = site["studies"] / f"{name}.nii.gz"
    if name == "truncated_by_hand":
        data = (site["studies"] / "case1.nii.gz").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        array = np.random.rand(*SHAPE, *((3,) if name == "four_d_by_hand" else ())).astype(np.float32)
        array[10, 10, 3] = np.nan
        nib.save(nib.Nifti1Image(array, _image_affine(site)), str(path))
    try:
        deadline = time.time() + 30  # the datastore notices new files on its own
        while name not in _ids(site):
            assert time.time() < deadline, "the datastore did not pick up the file"
            time.sleep(0.5)
        for model, params in (
            ("icl_sam2_interactive", {"foreground": [[30, 30, 8]], "label": "blob"}),
            ("icl_sam2", {}),
            ("icl_sam2_interactive", {"foreground": [[30, 30, 8]], "label": "blob"}),  # no session was left
        ):
            response = infer(site, model, name, params)
            assert response.status_code == 400, (model, response.status_code, _detail(response))
            assert "This image cannot be segmented" in _detail(response) and message in _detail(response)
        response = infer(site, "icl_sam2_interactive", "case1", {"foreground": [[30, 30, 8]], "label": "blob"})
        assert response.status_code == 200, _detail(response)
    finally:
        path.unlink()


# ---------------------------------------------------------------- typed parameters
@pytest.mark.parametrize(
    "params, field",
    [
        ('{"foreground": [[NaN, 30, 8]]}', "params.foreground[0][0]"),
        ({"foreground": [[None, 30, 8]]}, "params.foreground[0][0]"),
        ({"foreground": [[30, 30, 8]], "roi": [1, 2, None, 4, 5, 6]}, "params.roi[2]"),
        ('{"roi": [1, 60, 2, 60, 3, Infinity]}', "params.roi[5]"),
        ({"foreground": 5}, "params.foreground"),
        ({"foreground": [1, 2, 3]}, "params.foreground[0]"),
        ({"foreground": True}, "params.foreground"),
        ({"foreground": [[True, True, True]]}, "params.foreground[0][0]"),
        ({"foreground": [["30", "30", "8"]]}, "params.foreground[0][0]"),
        ({"foreground": [[30, 30, 8]], "label": ["blob"]}, "params.label"),
        ({"roi": 5}, "params.roi"),
        ({"roi": [[1, 2], [3, 4], [5, 6]]}, "params.roi[0]"),
        ({"foreground": [[30, 30, 8]], "label_tag": "t" * 300, "save_label": True}, "params.label_tag"),
        ({"foreground": [[30, 30, 8]], "result_dtype": "bogus"}, "params.result_dtype"),
        ({"foreground": [[30, 30, 8]], "result_dtype": "float16"}, "params.result_dtype"),
        ({"foreground": [[30, 30, 8]], "result_extension": ".exe"}, "params.result_extension"),
        ({"foreground": [[30, 30, 8]], "from_in_context": "yes"}, "params.from_in_context"),
        ({"foreground": [[30, 30, 8]], "client_id": "../x"}, "params.client_id"),
        ("[1, 2]", "params must be a JSON object"),
        ("{not json", "params is not valid JSON"),
    ],
)
def test_wrong_parameters_are_422_naming_the_field(site, guard, params, field):
    response = infer(site, "icl_sam2_interactive", "case1", params)
    assert response.status_code == 422 and field in _detail(response), (response.status_code, _detail(response))


def test_over_long_and_slashed_image_ids_are_400(site, guard):
    for image in ("c" * 300, "case1/../case1"):
        response = infer(site, "icl_sam2", image, {})
        assert response.status_code == 400 and "is not a valid id" in _detail(response)


def test_plugin_extras_are_accepted(site, guard):
    """What OHIF and Slicer send besides the model's own fields is ignored, not an error."""
    response = infer(
        site,
        "icl_sam2_interactive",
        "case1",
        {
            "foreground": [[30, 30, 8]],
            "background": [],
            "roi": [],
            "result_compress": False,
            "largest_cc": False,
            "result_extension": "nrrd",
            "result_dtype": "uint8",
        },
    )
    assert response.status_code == 200, _detail(response)


# ---------------------------------------------------------------- active learning and the event loop
def test_active_learning_skips_what_it_cannot_score(site, guard):
    """An unreadable image placed in the folder by hand: scoring reports it, the strategy never proposes it."""
    junk = site["studies"] / "junk.nii.gz"
    junk.write_bytes(b"not a volume")
    try:
        deadline = time.time() + 30
        while "junk" not in _ids(site):
            assert time.time() < deadline, "the datastore did not pick up the file"
            time.sleep(0.5)
        response = requests.post(f"{site['url']}/scoring/icl_sam2_confidence", params={"run_sync": "true"}, timeout=600)
        assert response.status_code == 200
        objects = requests.get(f"{site['url']}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        assert "not a readable image volume" in objects["junk"]["image"]["info"]["icl_sam2_confidence"]["failed"]
        for _ in range(3):  # stable: the same answer every time, never the junk
            proposal = requests.post(f"{site['url']}/activelearning/confidence", json={}, timeout=30)
            assert proposal.status_code == 200 and proposal.json().get("id") not in (None, "junk")
    finally:
        junk.unlink()


def test_info_answers_while_inference_runs(site, guard):
    """Inference runs off the event loop: /info comes back before a long request finishes (order, not timing)."""
    big = _nifti(site, "big.nii.gz", np.random.rand(256, 256, 96).astype(np.float32), np.diag([0.8, 0.8, 1.5, 1.0]))
    assert put_image(site, "big", big).status_code == 200
    done = {}

    def run():
        done["response"] = infer(site, "icl_sam2", "big", {})
        done["at"] = time.perf_counter()

    worker = threading.Thread(target=run)
    worker.start()
    log = site["root"] / "run" / "server.log"
    deadline = time.time() + 60
    while "'image': 'big'" not in log.read_text() and time.time() < deadline:
        time.sleep(0.05)
    info = requests.get(f"{site['url']}/info/", timeout=60)
    listing = requests.get(f"{site['url']}/datastore/", timeout=60)
    answered = time.perf_counter()
    worker.join()
    assert info.status_code == 200 and listing.status_code == 200 and done["response"].status_code == 200
    assert answered < done["at"], "/info waited for the inference"
    requests.delete(f"{site['url']}/datastore/image", params={"id": "big"}, timeout=30)
