"""The bundle's fine-tuning options through ``python -m monai.bundle run training``: freezing matrix and LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_core import build_icl_sam2, load_checkpoint, save_checkpoint
from model_core.io.phantoms import write_phantom_dataset
from model_core.training import build_training_network
from model_core.training.lora import load_adapters, merge_lora

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # monai.bundle runs in a subprocess

SMALL = [
    "--preset",
    "tiny",
    "--image_size",
    "64",
    "--num_support",
    "2",
    "--num_query",
    "2",
    "--batch_size",
    "1",
    "--episodes_per_epoch",
    "2",
    "--max_epochs",
    "1",
    "--classes",
    "[1,2]",
    "--intensity#window",
    "[0,1]",
    "--learning_rate",
    "1e-2",
]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "bundle/configs/train.json",
        *SMALL,
        *args,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, check=check, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_phantom_dataset(
        str(tmp_path_factory.mktemp("phantoms")), train=2, validation=1, test=0, shape=(8, 64, 64)
    )


def test_lora_training_writes_adapters_and_a_merged_model(data, tmp_path):
    torch.manual_seed(0)
    base = str(tmp_path / "base.pt")
    save_checkpoint(build_icl_sam2("tiny", image_size=64), base)
    models = tmp_path / "models"
    out = _run(
        "--datalist_file",
        data,
        "--ckpt_dir",
        str(models),
        "--output_dir",
        str(tmp_path / "out"),
        "--pretrained_checkpoint",
        base,
        "--lora_rank",
        "4",
        "--lora_targets",
        "['image_encoder.attn','mask_decoder.transformer']",
        "--trainable",
        "['memory_attention']",
    )
    log = out.stdout + out.stderr
    assert "Train completed" in log
    assert "Trainable parameters (trainable: ['memory_attention']; LoRA rank 4 on ['image_encoder.attn', " in log
    assert (models / "model.pt").exists() and (models / "model_lora.pt").exists()
    # model.pt is a plain merged network: the project's loader takes it strictly into a model built without LoRA
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert not any("lora_" in k or "base_layer" in k for k in state)
    merged = build_training_network("tiny", image_size=64, trainable="none")
    load_checkpoint(merged, str(models / "model.pt"))
    # adapters (and the memory attention that trained beside them) on the base give the same network
    adapters = torch.load(models / "model_lora.pt", map_location="cpu", weights_only=True)
    assert adapters["lora"]["settings"]["rank"] == 4 and adapters["lora"]["settings"]["base_checkpoint"] == base
    assert adapters["lora"]["adapters"] and all(
        k.startswith("memory_attention.")
        or k.split(".")[0] in ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "obj_ptr_tpos_proj")
        for k in adapters["lora"]["trained"]
    )
    rebuilt = merge_lora(
        load_adapters(build_icl_sam2("tiny", image_size=64, checkpoint=base), models / "model_lora.pt")
    )
    for k, v in rebuilt.state_dict().items():
        assert torch.allclose(v, state[k], atol=1e-6), k
    base_state = torch.load(base, weights_only=True)["model"]
    changed = [k for k in state if not torch.equal(state[k], base_state[k])]
    assert any(".attn.qkv." in k for k in changed) and any("sam_mask_decoder.transformer" in k for k in changed)
    assert not any(k.startswith(("memory_encoder.", "sam_prompt_encoder.")) for k in changed)  # frozen, no adapters


def test_unknown_trainable_group_stops_the_run(data, tmp_path):
    out = _run(
        "--datalist_file",
        data,
        "--ckpt_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path),
        "--trainable",
        "['mask_decoder','decoder']",
        check=False,
    )
    assert out.returncode != 0 and "Unknown trainable group 'decoder'" in out.stderr and "memory_encoder" in out.stderr
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("layer", ["evaluate.json", "inference.json"])
def test_evaluation_and_inference_build_a_plain_network_for_the_merged_model(tmp_path, layer):
    """``--lora_rank`` left on the command line does not stop evaluation or inference from loading model.pt."""
    from monai.bundle import ConfigParser

    torch.manual_seed(3)
    best = build_icl_sam2("tiny", image_size=64)
    save_checkpoint(best, str(tmp_path / "model.pt"))
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundle/configs/train.json"), str(ROOT / "bundle/configs" / layer)])
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "ckpt_dir": str(tmp_path),
            "preset": "tiny",
            "image_size": 64,
            "device": "$torch.device('cpu')",
            "lora_rank": 4,
        }
    )
    parser.parse()
    for i in range(len(parser["initialize"])):
        parser.get_parsed_content(f"initialize#{i}")
    network = parser.get_parsed_content("network")
    assert getattr(network, "lora", None) is None
    assert all(torch.equal(v, best.state_dict()[k]) for k, v in network.state_dict().items())
