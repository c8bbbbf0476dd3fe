"""One checkpoint convention, as model-zoo bundles: ``models/model.pt`` (training's best-Dice
weights, what the app serves) is what evaluation and inference load, not ``model_final.pt``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from model_core import build_icl_sam2, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"


def _weights(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_icl_sam2("tiny", image_size=64)


@pytest.mark.parametrize("layers", [["train.json", "evaluate.json"], ["train.json", "inference.json"]])
def test_evaluation_and_inference_load_the_best_checkpoint(tmp_path, layers):
    best, final = _weights(1), _weights(2)
    save_checkpoint(best, str(tmp_path / "model.pt"))
    save_checkpoint(final, str(tmp_path / "model_final.pt"))
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in layers])
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "ckpt_dir": str(tmp_path),
            "preset": "tiny",
            "image_size": 64,
            "device": "$torch.device('cpu')",
            "pretrained_checkpoint": None,
        }
    )
    parser.parse()
    assert Path(parser.get_parsed_content("checkpoint")) == tmp_path / "model.pt"
    for i in range(len(parser["initialize"])):  # what `monai.bundle run` does first: load the weights
        parser.get_parsed_content(f"initialize#{i}")
    loaded = parser.get_parsed_content("network").state_dict()
    differs = [k for k, v in best.state_dict().items() if not torch.equal(v, final.state_dict()[k])]
    assert differs  # the two files are distinguishable
    assert all(torch.equal(loaded[k].cpu(), best.state_dict()[k]) for k in differs)
