"""The ``lesion_proposals`` model through the real MONAI Label server and client: candidates as a label map with
their scores in the reply, then the accepted ones as a label the datastore takes as final."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from tests.model_core.proposal_phantom import write_lesion_phantom

from .conftest import ROOT, Server

pytestmark = pytest.mark.slow  # a real MONAI Label server

SETTINGS = {
    "points_per_side": 4,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "max_slice_fraction": 0.5,
    "max_volume_mm3": 4000.0,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("proposals")
    studies = root / "studies"
    studies.mkdir()
    write_lesion_phantom(studies / "case0.nii.gz")
    server = Server(
        studies,
        {
            "models": "icl_sam2,lesion_proposals",
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps({"lesion": 1}),
            "device": "cpu",
            "modality": "MRI",
            "proposal_settings": json.dumps(SETTINGS),
            "checkpoint": str(root / "model.pt"),
        },
        root / "server.log",
        env={"PYTHONPATH": str(ROOT)},
    )  # this checkout's model_core, not the installed one
    yield {
        "root": root,
        "studies": studies,
        "server": server,
        "client": MONAILabelClient(server.url, tmpdir=str(root / "client"), client_id="tester"),
    }
    server.stop()


def _infer(study, params):
    path, info = study["client"].infer("lesion_proposals", "case0", params)
    return path, json.loads(info) if isinstance(info, (bytes, str)) else info


def _status(error: MONAILabelClientException) -> int:
    return int(error.msg.split("Status: ")[1].split(";")[0])


def test_proposals_then_accepted_candidates_saved_as_final(study):
    info = study["client"].info()
    assert info["models"]["lesion_proposals"]["type"] == "segmentation"
    assert info["models"]["lesion_proposals"]["labels"] == {"lesion": 1}
    assert "lesion_proposals" not in info["trainers"] and "icl_sam2" in info["trainers"]
    assert "proposal_settings" in info["config_options"]

    path, reply = _infer(study, {})
    image = nib.load(str(study["studies"] / "case0.nii.gz"))
    label = nib.load(str(path))
    array = np.asarray(label.dataobj)
    assert array.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-5)
    candidates = reply["candidates"]
    assert reply["generator_masks"] >= reply["linked_components"] >= reply["candidates_model_grid"] >= len(candidates)
    values = [c["label"] for c in candidates]
    assert values == list(range(1, len(candidates) + 1)) and len(values) > 0
    assert sorted(set(np.unique(array).tolist()) - {0}) == values
    assert reply["label_names"] == {f"candidate_{v}": v for v in values}
    assert reply["settings"]["points_per_side"] == 4 and reply["cached"] is False and reply["untrained"] is True
    for c in candidates:
        assert c["voxels"] == int((array == c["label"]).sum()) and c["volume_mm3"] <= 4000.0 * 1.5
        assert 0 <= c["predicted_iou"] <= 1 and 0 <= c["stability_score"] <= 1 and len(c["bbox"]) == 2

    # accept the first and the last candidate: the same settings, so the candidates come from the cache
    accept = sorted({values[0], values[-1]})
    path, reply = _infer(study, {"accept": accept})
    assert reply["cached"] is True and reply["accepted"] == accept and reply["label_names"] == {"lesion": 1}
    accepted = np.asarray(nib.load(str(path)).dataobj)
    assert np.array_equal(accepted, np.where(np.isin(array, accept), 1, 0))
    study["client"].save_label("case0", str(path), tag="final")  # a label of the configured structures
    datastore = study["client"].datastore()
    assert "final" in datastore["objects"]["case0"]["labels"]
    saved = np.asarray(nib.load(str(study["studies"] / "labels" / "final" / "case0.nii.gz")).dataobj)
    assert np.array_equal(saved, accepted)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"accept": [999]}, "params.accept: [999] are not candidates"),
        ({"save_label": True}, "give accept"),
        ({"points_per_side": 0}, "params.points_per_side"),
        ({"min_volume_mm3": 50.0, "max_volume_mm3": 10.0}, "max_volume_mm3"),
    ],
)
def test_bad_proposal_requests_are_422_with_the_reason(study, params, message):
    with pytest.raises(MONAILabelClientException) as error:
        _infer(study, params)
    assert _status(error.value) == 422 and message in error.value.msg
