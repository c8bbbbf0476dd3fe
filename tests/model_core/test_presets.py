"""Presets: every architecture builds at any valid size, bad arguments are rejected, Hydra is left alone."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from sam2.modeling.sam2_base import SAM2Base

from model_core import PRESETS, InContextSAM2, build_icl_sam2, preset_config

SAM2_TINY_YAML = "configs/sam2.1/sam2.1_hiera_t.yaml"


def _rope_len(attn) -> int:
    # RoPEAttention keeps freqs_cis with one row per position of the (feat x feat) map
    return attn.freqs_cis.shape[0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_at_small_size(preset):
    model = build_icl_sam2(preset, image_size=64)
    assert isinstance(model, InContextSAM2)
    assert isinstance(model, SAM2Base)
    assert model.preset == preset
    assert model.image_size == 64
    assert not model.training
    layer = model.memory_attention.layers[0]
    assert _rope_len(layer.self_attn) == (64 // 16) ** 2
    assert _rope_len(layer.cross_attn_image) == (64 // 16) ** 2
    assert model.pixel_mean.shape == (1, 3, 1, 1)


@pytest.mark.parametrize("preset,image_size", [("tiny", 96), ("tiny", 128), ("sam2.1_hiera_tiny", 128)])
def test_image_size_drives_rope_feat_sizes(preset, image_size):
    cfg = preset_config(preset, image_size)
    assert cfg["image_size"] == image_size
    assert cfg["_target_"] == "model_core.modeling.network.InContextSAM2"
    feat = image_size // 16
    layer = cfg["memory_attention"]["layer"]
    assert layer["self_attention"]["feat_sizes"] == [feat, feat]
    assert layer["cross_attention"]["feat_sizes"] == [feat, feat]
    model = build_icl_sam2(preset, image_size=image_size)
    assert model.image_size == image_size
    for lyr in model.memory_attention.layers:
        assert _rope_len(lyr.self_attn) == feat * feat
        assert _rope_len(lyr.cross_attn_image) == feat * feat


def test_default_image_sizes():
    assert PRESETS["tiny"] == 128
    assert preset_config("tiny")["image_size"] == 128
    assert preset_config("sam2.1_hiera_large")["image_size"] == PRESETS["sam2.1_hiera_large"] == 512


def test_preset_config_is_a_fresh_copy():
    a = preset_config("tiny", 64)
    a["memory_attention"]["layer"]["self_attention"]["feat_sizes"] = [1, 1]
    a["num_maskmem"] = 1
    b = preset_config("tiny", 64)
    assert b["memory_attention"]["layer"]["self_attention"]["feat_sizes"] == [4, 4]
    assert b["num_maskmem"] == 7


def test_official_preset_keeps_yaml_values():
    cfg = preset_config("sam2.1_hiera_tiny", 64)
    assert cfg["image_encoder"]["trunk"]["embed_dim"] == 96
    assert cfg["num_maskmem"] == 7
    assert cfg["no_obj_embed_spatial"] is True  # SAM2.1-only flag
    assert "no_obj_embed_spatial" not in preset_config("sam2_hiera_tiny", 64)


def test_model_kwargs_are_forwarded():
    model = build_icl_sam2("tiny", image_size=64, encoder_batch_size=3, memory_storage_dtype="float32")
    assert model.encoder_batch_size == 3
    assert model.memory_storage_dtype == torch.float32


def test_precision_is_passed_through_and_auto_resolved(monkeypatch):
    import model_core.modeling.precision as precision

    assert build_icl_sam2("tiny", image_size=64).precision == "fp32"  # the default: bit-faithful to SAM2
    assert build_icl_sam2("tiny", image_size=64, precision="bf16").precision == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "cpu_bf16_capability", lambda native=native: {"bf16": native})
        assert build_icl_sam2("tiny", image_size=64, precision="auto").precision == expected
    with pytest.raises(ValueError, match=r"precision must be one of 'auto', 'fp32', 'bf16', got 'fp16'"):
        build_icl_sam2("tiny", image_size=64, precision="fp16")


def test_unknown_preset_names_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown preset 'sam3'.*sam2\.1_hiera_tiny.*tiny"):
        build_icl_sam2("sam3", image_size=64)
    with pytest.raises(ValueError, match="Choose one of"):
        preset_config("hiera_tiny")


@pytest.mark.parametrize("bad", [100, 65, 48, 32, 0, -64])
def test_bad_image_size(bad):
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        build_icl_sam2("tiny", image_size=bad)


# ----------------------------------------------------------------- Hydra coexistence
@pytest.fixture
def restore_hydra():
    """Leave Hydra as sam2's import leaves it, whatever the test did."""
    yield
    GlobalHydra.instance().clear()
    initialize_config_module("sam2", version_base="1.2")


def _hydra_state():
    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        return (False, None, None)
    return (True, gh.hydra, repr(gh.config_loader().get_sources()))  # the Hydra object itself: identity


def _build_ours_keeping_hydra(preset="tiny"):
    before = _hydra_state()
    model = build_icl_sam2(preset, image_size=64)
    assert _hydra_state() == before, "build_icl_sam2 changed GlobalHydra"
    assert isinstance(model, InContextSAM2)


def _monailabel_sam2_source():
    """Source of MONAI Label's SAM2 task, if installed. Read, not imported: importing it deletes and recreates
    an image cache directory under ~/.cache and starts a timer thread."""
    spec = importlib.util.find_spec("monailabel")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "sam2", "infer.py")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def test_monailabel_sam2_task_resets_global_hydra():
    """The usage reproduced below: Sam2InferTask clears GlobalHydra, re-initialises it on its model dir and
    calls sam2's build_sam2 with a config file name (resolved through Hydra's global search path)."""
    src = _monailabel_sam2_source()
    if src is None:
        pytest.skip("MONAI Label's SAM2 task is not installed")
    assert "GlobalHydra.instance().clear()" in src
    assert "initialize_config_dir(config_dir=model_dir)" in src
    assert "build_sam2(self.config_path" in src


@pytest.mark.slow
def test_hydra_coexistence_with_sam2_and_monailabel(tmp_path, restore_hydra):
    from sam2.build_sam import build_sam2

    # 0) sam2's import-time state (initialize_config_module("sam2")): ours builds, compose still works
    GlobalHydra.instance().clear()
    initialize_config_module("sam2", version_base="1.2")
    _build_ours_keeping_hydra("sam2.1_hiera_tiny")
    _build_ours_keeping_hydra("tiny")
    cfg = compose(config_name=SAM2_TINY_YAML)
    assert cfg.model.image_size == 1024 and cfg.model.num_maskmem == 7
    ref = build_sam2(SAM2_TINY_YAML, None, device="cpu")
    assert isinstance(ref, SAM2Base) and not isinstance(ref, InContextSAM2)
    _build_ours_keeping_hydra("tiny")

    # 1) MONAI Label's Sam2InferTask: clear GlobalHydra, initialise on the model dir, build_sam2 by file name
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    import sam2

    shutil.copy(os.path.join(os.path.dirname(sam2.__file__), SAM2_TINY_YAML), model_dir / "sam2.1_hiera_t.yaml")
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(model_dir), version_base=None)
    _build_ours_keeping_hydra("tiny")
    ref = build_sam2("sam2.1_hiera_t.yaml", None, device="cpu")
    assert isinstance(ref, SAM2Base)
    _build_ours_keeping_hydra("sam2.1_hiera_tiny")
    assert any(str(model_dir) in s.path for s in GlobalHydra.instance().config_loader().get_sources())
    assert compose(config_name="sam2.1_hiera_t.yaml").model.image_size == 1024


def test_build_with_global_hydra_cleared(restore_hydra):
    GlobalHydra.instance().clear()
    assert not GlobalHydra.instance().is_initialized()
    _build_ours_keeping_hydra("tiny")
    _build_ours_keeping_hydra("sam2_hiera_tiny")
    assert not GlobalHydra.instance().is_initialized()  # ours did not initialise it
    # and Hydra can still be initialised and used afterwards
    initialize_config_module("sam2", version_base="1.2")
    assert compose(config_name=SAM2_TINY_YAML).model.num_maskmem == 7
