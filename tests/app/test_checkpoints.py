"""Checkpoints that say what they are: the server serves a checkpoint's architecture, or refuses to start
naming both."""

from __future__ import annotations

import json
import shutil

import pytest
import requests
import torch

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import write_phantom_dataset as make_dataset
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

from .conftest import ROOT, Server

LABELS = {"blob": 1, "tube": 2, "block": 3}


pytestmark = pytest.mark.slow  # starts real MONAI Label servers


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    datalist = json.loads(
        open(make_dataset(str(root / "src"), train=2, validation=0, test=0, shape=(8, 64, 64))).read()
    )
    folder = root / "studies"
    folder.mkdir()
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], folder / f"case{i}.nii.gz")
    return root, folder


def _trained_checkpoint(path, preset="tiny", image_size=96, record=True):
    torch.manual_seed(1)
    model = build_icl_sam2(preset, image_size=image_size)
    if record:
        save_checkpoint(model, str(path), record={"classes": [1, 2, 3], "modality": "CT", "window": [0.0, 1.0]})
    else:  # Meta's official files carry no record: a bare {"model": state_dict}
        torch.save({"model": model.state_dict()}, str(path))
    return path


def test_the_server_serves_the_checkpoints_architecture(studies):
    """The quick start's case: the demo writes tiny at 96 px; the server started without --conf preset serves it."""
    root, folder = studies
    checkpoint = _trained_checkpoint(root / "tiny96.pt")
    server = Server(
        folder, {"labels": json.dumps(LABELS), "device": "cpu", "checkpoint": str(checkpoint)}, root / "a.log"
    )
    try:
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        status = info["models_status"]["icl_sam2"]
        assert status["preset"] == "tiny" and status["image_size"] == 96 and status["trained"] is True
        assert status["untrained"] is False and status["trained_as"]["classes"] == [1, 2, 3]
        for model in ("icl_sam2", "icl_sam2_interactive"):  # what Slicer and OHIF display
            assert "weights: tiny96.pt (preset tiny at 96 px)" in info["models"][model]["description"]
        response = requests.post(
            f"{server.url}/infer/icl_sam2_interactive",
            params={"image": "case0"},
            data={"params": json.dumps({"foreground": [[30, 30, 4]], "label": "blob"})},
            timeout=300,
        )
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def test_a_conflicting_preset_stops_the_server_at_start_up_naming_both(studies):
    root, folder = studies
    checkpoint = _trained_checkpoint(root / "tiny96_b.pt")
    with pytest.raises(RuntimeError) as error:
        Server(
            folder,
            {
                "labels": json.dumps(LABELS),
                "device": "cpu",
                "checkpoint": str(checkpoint),
                "preset": "sam2.1_hiera_tiny",
            },
            root / "b.log",
        )
    message = str(error.value)
    assert "--conf preset 'sam2.1_hiera_tiny' does not match the checkpoint" in message
    assert "trained as preset 'tiny'" in message and "at 96 px" in message


def test_a_checkpoint_without_record_is_checked_at_start_up(studies):
    root, folder = studies
    checkpoint = _trained_checkpoint(root / "bare.pt", record=False)
    with pytest.raises(RuntimeError) as error:
        Server(
            folder,
            {
                "labels": json.dumps(LABELS),
                "device": "cpu",
                "checkpoint": str(checkpoint),
                "preset": "sam2.1_hiera_tiny",
                "image_size": "64",
            },
            root / "c.log",
        )
    message = str(error.value)
    assert (
        "configured for preset 'sam2.1_hiera_tiny' at 64 px but cannot serve" in message and "Missing keys" in message
    )


def test_untrained_weights_are_seeded_and_said(studies, tmp_path):
    """Without a checkpoint two starts give the same weights (and so the same results), and /info says they are
    untrained.
    """

    def version(seed):
        config = ServiceConfig(
            bundle_dir=str(ROOT / "bundle"),
            labels=LABELS,
            checkpoint=str(tmp_path / "none.pt"),
            preset="tiny",
            image_size=64,
            seed=seed,
        )
        return SegmentationService(config).model_info()["model_version"]

    assert version(0) == version(0) and version(0) != version(1)
    root, folder = studies
    server = Server(
        folder,
        {
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "preset": "tiny",
            "image_size": "64",
            "checkpoint": str(tmp_path / "none.pt"),
        },
        root / "d.log",
    )
    try:
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        assert info["models_status"]["icl_sam2"]["untrained"] is True
        assert "UNTRAINED, random initial weights (seed 0" in info["models"]["icl_sam2"]["description"]
    finally:
        server.stop()


def test_a_server_fault_is_a_500_with_the_cause_in_the_log(studies):
    """A checkpoint that became unreadable is the server's fault, not the client's: 500, incident id, cause logged."""
    root, folder = studies
    checkpoint = _trained_checkpoint(root / "fault.pt", image_size=64)
    log = root / "e.log"
    server = Server(folder, {"labels": json.dumps(LABELS), "device": "cpu", "checkpoint": str(checkpoint)}, log)
    good = checkpoint.read_bytes()
    params = {"params": json.dumps({"foreground": [[30, 30, 4]], "label": "blob"})}
    try:
        checkpoint.write_bytes(b"corrupted on disk")
        response = requests.post(
            f"{server.url}/infer/icl_sam2_interactive", params={"image": "case0"}, data=params, timeout=300
        )
        assert response.status_code == 500 and "incident" in response.json()["detail"]
        incident = response.json()["detail"].split("incident ")[1].split(";")[0]
        assert f"Server fault {incident}" in log.read_text() and "Cannot read checkpoint" in log.read_text()
        checkpoint.write_bytes(good)  # fixed on disk: served again, no restart
        response = requests.post(
            f"{server.url}/infer/icl_sam2_interactive", params={"image": "case0"}, data=params, timeout=300
        )
        assert response.status_code == 200
    finally:
        server.stop()
