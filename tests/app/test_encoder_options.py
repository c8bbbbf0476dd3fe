"""``--conf encoder_backend``, ``encoder_cache_dir`` and ``compile``: parsed, checked, served, reported in /info."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from lib.settings import service_config
from model_core.export.encoder_choice import CHOICE_FILE
from model_core.io.phantoms import write_phantom_dataset

from .conftest import ROOT, Server

BASE = {"bundle": str(ROOT / "bundle"), "device": "cpu", "checkpoint": "/nonexistent/model.pt", "precision": "fp32"}
APP = str(ROOT / "monailabel_app")


def test_encoder_options_reach_the_service_config(tmp_path):
    config = service_config(dict(BASE), APP)
    assert (config.encoder_backend, config.encoder_cache_dir, config.compile) == ("auto", None, "off")
    config = service_config(
        {**BASE, "encoder_backend": "OpenVINO_bf16", "encoder_cache_dir": str(tmp_path), "compile": "max-autotune"},
        APP,
    )
    assert (config.encoder_backend, config.encoder_cache_dir, config.compile) == (
        "openvino-bf16",
        str(tmp_path),
        "max-autotune",
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("encoder_backend", "tensorrt", "--conf encoder_backend must be one of auto, torch, torch-bf16, onnxruntime"),
        ("compile", "fast", "--conf compile must be one of off, default, reduce-overhead, max-autotune, got 'fast'"),
    ],
)
def test_bad_encoder_options_name_the_option(key, value, message):
    with pytest.raises(ValueError) as e:
        service_config({**BASE, key: value}, APP)
    assert message in str(e.value)


@pytest.mark.slow  # a real MONAI Label server
def test_info_reports_autos_choice_once_the_network_is_loaded(tmp_path):
    datalist = json.loads(
        Path(write_phantom_dataset(str(tmp_path / "src"), train=1, validation=0, test=0, shape=(6, 64, 64))).read_text()
    )
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(tmp_path / "src" / datalist["training"][0]["image"], studies / "case0.nii.gz")
    cache = tmp_path / "encoder_cache"
    conf = {
        "preset": "tiny",
        "image_size": "64",
        "labels": json.dumps({"blob": 1}),
        "window": "[0, 1]",
        "device": "cpu",
        "precision": "fp32",
        "checkpoint": str(tmp_path / "none.pt"),
        "encoder_backend": "auto",
        "encoder_cache_dir": str(cache),
    }
    server = Server(studies, conf, tmp_path / "server.log")
    try:
        before = requests.get(f"{server.url}/info/", timeout=30).json()["models_status"]["icl_sam2"]["encoder"]
        assert before == {
            "encoder_backend": "auto",
            "compile": "off",
            "backend": {"name": "auto", "note": "not loaded"},
        }
        response = requests.post(
            f"{server.url}/infer/icl_sam2_interactive",
            params={"image": "case0"},
            data={"params": json.dumps({"foreground": [[32, 32, 3]], "label": "blob"})},
            timeout=600,
        )
        assert response.status_code == 200, response.text
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        backend = info["models_status"]["icl_sam2"]["encoder"]["backend"]
        # precision fp32: auto chose among the float32 backends, by the times it measured
        assert backend["name"] == "auto" and backend["chosen"] in backend["seconds_per_slice"]
        assert (
            backend["chosen"] in ("torch", "onnxruntime", "openvino")
            and "openvino-bf16" not in backend["seconds_per_slice"]
        )
        assert backend["backend"]["name"] == backend["chosen"]
        assert f"image encoder {backend['chosen']} (auto)" in info["models"]["icl_sam2_interactive"]["description"]
        assert (cache / CHOICE_FILE).is_file()
    finally:
        server.stop()
