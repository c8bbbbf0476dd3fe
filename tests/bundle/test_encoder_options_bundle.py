"""The bundle's ``encoder_backend`` and ``compile`` reach the inference network (``--encoder_backend`` when run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[2]


def _parser(**overrides) -> ConfigParser:
    parser = (
        ConfigParser()
    )  # the configs layered as `monai.bundle run --config_file "['train.json', 'inference.json']"`
    parser.read_config([str(ROOT / "bundle" / "configs" / name) for name in ("train.json", "inference.json")])
    parser.update({"preset": "tiny", "image_size": 64, "precision": "fp32", **overrides})
    return parser


def test_inference_network_takes_the_encoder_options(tmp_path):
    network = _parser().get_parsed_content("network_def")
    assert network.encoder_backend.name == "torch" and network.compiled == "off"  # the defaults: SAM2's numbers
    network = _parser(encoder_backend="onnxruntime", encoder_cache_dir=str(tmp_path)).get_parsed_content("network_def")
    assert network.encoder_backend.name == "onnxruntime" and network.encoder_backend.runner.cache_dir == str(tmp_path)
    with pytest.raises(RuntimeError) as e:  # MONAI names the component; the cause names the option
        _parser(encoder_backend="tensorrt").get_parsed_content("network_def")
    assert "encoder_backend must be one of" in str(e.value.__cause__)
