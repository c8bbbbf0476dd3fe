"""The MONAI Label app through the real server and the real client (the REST API of the Slicer and OHIF plugins)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from model_core.io.phantoms import write_phantom_dataset as make_dataset

from .conftest import Server

LABELS = {"blob": 1, "tube": 2, "block": 3}
SHAPE = (64, 64, 16)  # i, j, k of the NIfTI files (axial slices along k)


pytestmark = pytest.mark.slow  # a real MONAI Label server per module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    datalist = json.loads(
        Path(
            make_dataset(str(root / "src"), train=5, validation=0, test=0, shape=(SHAPE[2], SHAPE[0], SHAPE[1]))
        ).read_text()
    )
    studies = root / "studies"
    studies.mkdir()
    labels = {}
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], studies / f"case{i}.nii.gz")
        labels[f"case{i}"] = root / "src" / case["label"]
    server = Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "checkpoint": str(root / "published" / "model.pt"),
        },
        root / "server.log",
    )
    yield {
        "root": root,
        "studies": studies,
        "labels": labels,
        "server": server,
        "client": MONAILabelClient(server.url, tmpdir=str(root / "client"), client_id="tester"),
    }
    server.stop()


def _status(error: MONAILabelClientException) -> int:
    return int(error.msg.split("Status: ")[1].split(";")[0])


def _infer(study, model, image, params, client_id="tester"):
    client = MONAILabelClient(
        study["server"].url, tmpdir=str(study["root"] / "client" / client_id), client_id=client_id
    )
    start = time.perf_counter()
    path, info = client.infer(model, image, params)
    info = json.loads(info) if isinstance(info, (bytes, str)) else info
    return path, info, time.perf_counter() - start


def _label(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _save(study, case):
    study["client"].save_label(case, str(study["labels"][case]), tag="final")


def test_info_lists_models_labels_and_strategies(study):
    info = study["client"].info()
    assert {"icl_sam2", "icl_sam2_interactive"} <= set(info["models"])
    assert info["models"]["icl_sam2"]["labels"] == LABELS and info["models"]["icl_sam2"]["dimension"] == 3
    assert info["models"]["icl_sam2_interactive"]["type"] == "deepgrow"
    assert {"random", "first", "confidence"} <= set(info["strategies"])
    assert "icl_sam2_confidence" in info["scoring"] and "icl_sam2" in info["trainers"]
    assert info["models_status"]["icl_sam2"]["untrained"] is True  # no checkpoint yet: said, not hidden
    assert "UNTRAINED" in study["server"].log.read_text()
    assert study["client"].next_sample("first", {})["id"] == "case0"


def test_in_context_without_a_labelled_volume_is_a_clear_400(study):
    with pytest.raises(MONAILabelClientException) as error:
        study["client"].infer("icl_sam2", "case1", {})
    # what to do, as OHIF's and Slicer's users can: label a series, or click instead (lib/messages.py)
    assert _status(error.value) == 400 and "No labelled series yet" in error.value.msg
    assert "final label" in error.value.msg and "icl_sam2_interactive" in error.value.msg


def test_save_label_then_in_context_segmentation_in_the_image_space(study):
    _save(study, "case0")
    assert "case0" not in study["client"].next_sample("first", {}).get("id", "")
    path, info, seconds = _infer(study, "icl_sam2", "case1", {})
    label, affine = _label(path)
    image = nib.load(str(study["studies"] / "case1.nii.gz"))
    assert label.shape == image.shape and np.allclose(affine, image.affine)
    assert set(np.unique(label).tolist()) <= {0, *LABELS.values()}
    assert set(info["confidence"]) == set(LABELS) and all(0 <= v <= 1 for v in info["confidence"].values())
    assert info["untrained"] is True and info["support_volumes"] == 1
    # OHIF asks for NRRD: the same labels on the same grid
    nrrd, _, _ = _infer(study, "icl_sam2", "case1", {"result_extension": ".nrrd", "result_dtype": "uint8"})
    from monai.transforms import LoadImage

    as_nrrd = LoadImage(image_only=True)(nrrd)
    assert str(nrrd).endswith(".nrrd") and np.array_equal(np.asarray(as_nrrd), label)
    assert np.allclose(as_nrrd.affine, image.affine, atol=1e-4)
    # the support memory is cached: a second volume encodes only its own slices
    _, again, _ = _infer(study, "icl_sam2", "case2", {})
    assert again["encoded_slices"] == SHAPE[2]
    print(f"\nin-context: {seconds:.2f} s (first request), encoded {info['encoded_slices']} slices")


def test_a_follow_up_click_does_not_encode_the_image_again(study):
    first_params = {"foreground": [[32, 30, 8]], "background": [[4, 4, 8]], "label": "blob"}
    _path, first, t1 = _infer(study, "icl_sam2_interactive", "case3", first_params)
    assert first["encoded_slices"] == SHAPE[2]  # every slice once
    more = {**first_params, "foreground": [[32, 30, 8], [33, 31, 10]]}
    path2, second, t2 = _infer(study, "icl_sam2_interactive", "case3", more)
    assert second["encoded_slices"] == 0 and second["prompted_slices"] == [8, 10]
    label, _affine = _label(path2)
    assert label.shape == SHAPE and set(np.unique(label).tolist()) <= {0, LABELS["blob"]}
    print(
        f"\ninteractive: first click {t1:.2f} s, follow-up click {t2:.2f} s (image encoder calls: "
        f"{first['encoded_slices']} then {second['encoded_slices']})"
    )


def test_a_box_segments_within_its_slices_and_can_start_from_in_context(study):
    roi = [16, 48, 16, 48, 5, 9]
    path, info, _ = _infer(study, "icl_sam2_interactive", "case3", {"roi": roi, "label": "tube"})
    label, _ = _label(path)
    assert set(np.unique(label).tolist()) <= {0, LABELS["tube"]}
    assert not label[..., :5].any() and not label[..., 10:].any()  # nothing outside the ROI's slices
    assert info["encoded_slices"] == 0  # same client, same image: the session's features
    path, info, _ = _infer(
        study, "icl_sam2_interactive", "case3", {"foreground": [[32, 30, 8]], "label": "blob", "from_in_context": True}
    )
    label, _ = _label(path)
    assert set(np.unique(label).tolist()) <= {0, *LABELS.values()}  # the in-context map, corrected


def test_two_sessions_on_two_images_stay_isolated(study):
    a = {"foreground": [[30, 30, 7]], "label": "blob"}
    b = {"foreground": [[20, 40, 9]], "background": [[50, 50, 9]], "label": "tube"}
    alone_a, _, _ = _infer(study, "icl_sam2_interactive", "case4", a, client_id="alice")
    results = {}

    def run(name, image, params):
        results[name] = _infer(study, "icl_sam2_interactive", image, params, client_id=name)

    threads = [
        threading.Thread(target=run, args=("alice", "case4", a)),
        threading.Thread(target=run, args=("bob", "case2", b)),
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    # alice's result did not change with bob working in parallel, and bob's session is his own
    assert np.array_equal(_label(results["alice"][0])[0], _label(alone_a)[0])
    assert results["alice"][1]["encoded_slices"] == 0 and results["bob"][1]["encoded_slices"] == SHAPE[2]
    assert set(np.unique(_label(results["bob"][0])[0]).tolist()) <= {0, LABELS["tube"]}
    assert results["bob"][1]["sessions"] >= 2


@pytest.mark.parametrize(
    "params, status, message",
    [
        ({"foreground": [[300, 30, 8]]}, 400, "outside the image"),
        ({"foreground": [[3, 3]]}, 422, "params.foreground[0]: List should have at least 3 items"),
        ({"roi": [20, 20, 10, 40, 4, 12]}, 400, "zero size"),
        ({"label": "liver", "foreground": [[3, 3, 3]]}, 400, "Unknown label 'liver'"),
        ({}, 400, "Nothing to segment from"),
    ],
)
def test_bad_interactive_requests_are_4xx_with_the_reason(study, params, status, message):
    with pytest.raises(MONAILabelClientException) as error:
        study["client"].infer("icl_sam2_interactive", "case3", params)
    assert _status(error.value) == status and message in error.value.msg


def test_unknown_model_and_corrupt_uploads_are_4xx_and_the_server_keeps_serving(study, tmp_path):
    client = study["client"]
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("no_such_model", "case1", {})
    assert _status(error.value) == 404 and "Unknown model 'no_such_model'" in error.value.msg
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a volume")
    with pytest.raises(MONAILabelClientException) as error:  # an upload that is no image, for inference
        client.infer("icl_sam2", "", {}, file=str(junk))
    assert _status(error.value) == 400 and "not a readable image volume" in error.value.msg
    with pytest.raises(MONAILabelClientException) as error:
        client.upload_image(str(junk), image_id="junk")
    assert "400" in error.value.msg and "not a readable image volume" in error.value.msg
    # a failed label upload leaves the previous label intact
    saved = study["studies"] / "labels" / "final" / "case0.nii.gz"
    before = saved.read_bytes()
    with pytest.raises(MONAILabelClientException) as error:
        client.save_label("case0", str(junk), tag="final")
    assert "400" in error.value.msg
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(small))
    with pytest.raises(MONAILabelClientException) as error:
        client.save_label("case0", str(small), tag="final")
    assert "400" in error.value.msg and "same grid" in error.value.msg
    assert saved.read_bytes() == before
    assert client.info()["name"].startswith("ICL-SAM2")  # still serving


def test_training_publishes_a_model_that_the_next_inference_uses(study):
    for case in ("case1", "case2"):
        _save(study, case)
    _, before, _ = _infer(study, "icl_sam2", "case3", {})
    client = study["client"]
    client.train_start(
        "icl_sam2",
        {"max_epochs": 1, "episodes_per_epoch": 4, "train_encoder": "all", "learning_rate": 1e-3, "device": "cpu"},
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        status = client.train_status()
        if status and status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(2)
    assert status["status"] == "DONE", status.get("details")
    published = study["root"] / "published" / "model.pt"
    assert published.exists()
    _, after, _ = _infer(study, "icl_sam2", "case3", {})
    assert after["untrained"] is False and after["checkpoint"] == str(published)
    assert after["model_version"] != before["model_version"]
    # the version is the published weights': a network loaded from the file has the same fingerprint
    import hashlib

    from model_core import build_icl_sam2
    from model_core.serving.service import SegmentationService  # noqa: F401  (fingerprint as the service computes it)

    network = build_icl_sam2("tiny", image_size=64, checkpoint=str(published))
    assert hashlib.sha1(json.dumps(network.architecture["weights"]).encode()).hexdigest()[:12] == after["model_version"]


def test_confidence_strategy_proposes_the_least_confident_unlabelled_image(study):
    request = urllib.request.Request(f"{study['server'].url}/scoring/icl_sam2_confidence?run_sync=true", method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200
    datastore = study["client"].datastore()
    unlabelled = [i for i, obj in datastore["objects"].items() if "final" not in obj.get("labels", {})]
    scores = {i: datastore["objects"][i]["image"]["info"]["icl_sam2_confidence"]["mean"] for i in unlabelled}
    proposal = study["client"].next_sample("confidence", {})
    assert proposal["id"] in unlabelled and proposal["id"] == min(scores, key=lambda i: (scores[i], i))
    assert proposal["confidence"] == scores[proposal["id"]]
