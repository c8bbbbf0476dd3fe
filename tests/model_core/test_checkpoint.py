"""Checkpoints: every format in the wild loads strictly; anything else is a ValueError that says why."""

from __future__ import annotations

import os

import pytest
import torch

from model_core import build_icl_sam2, load_checkpoint, read_state_dict, save_checkpoint


def _build(preset="tiny", seed=0, image_size=64):
    torch.manual_seed(seed)
    return build_icl_sam2(preset, image_size=image_size)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _assert_different_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def source():
    return _build(seed=0)


@pytest.fixture
def target(source):
    model = _build(seed=1)
    _assert_different_weights(model, source)  # otherwise a no-op load would pass
    return model


FORMATS = {
    "sam2_model_key": lambda sd: {"model": sd},
    "bare": lambda sd: sd,
    "ddp_module_prefix": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    "bare_ddp_module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "monai_checkpoint_saver": lambda sd: {"network": sd, "optimizer": {"state": {}, "param_groups": []}},
    "state_dict_key": lambda sd: {"state_dict": sd, "epoch": 3},
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_load_strictly(fmt, source, target, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save(FORMATS[fmt](source.state_dict()), path)
    meta = load_checkpoint(target, path)
    assert meta == {}
    _assert_same_weights(target, source)
    # a specific parameter, compared with the file itself
    saved, _ = read_state_dict(path)
    key = "memory_attention.layers.0.self_attn.q_proj.weight"
    assert torch.equal(target.state_dict()[key], saved[key])


def test_save_checkpoint_round_trip(source, target, tmp_path):
    path = str(tmp_path / "ours.pt")
    save_checkpoint(source, path, epoch=7)
    assert os.path.isfile(path) and not os.path.exists(path + ".tmp")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 7 and set(raw["model"]) == set(source.state_dict())
    meta = load_checkpoint(target, path)
    assert meta == {"preset": "tiny", "image_size": 64}
    _assert_same_weights(target, source)


def test_build_with_checkpoint(source, tmp_path):
    path = str(tmp_path / "ours.pt")
    save_checkpoint(source, path)
    torch.manual_seed(123)
    model = build_icl_sam2("tiny", image_size=64, checkpoint=path)
    _assert_same_weights(model, source)
    assert not model.training


def test_checkpoint_loads_at_another_image_size(source, tmp_path):
    """Only RoPE sizes depend on image_size and they are not weights: a checkpoint loads at any size."""
    path = str(tmp_path / "ours.pt")
    save_checkpoint(source, path)
    model = build_icl_sam2("tiny", image_size=128, checkpoint=path)
    assert model.image_size == 128
    _assert_same_weights(model, source)


def test_non_persistent_buffers_not_saved(source):
    sd = source.state_dict()
    assert "pixel_mean" not in sd and "pixel_std" not in sd
    assert {n for n, _ in source.named_buffers()} >= {"pixel_mean", "pixel_std"}


@pytest.mark.slow
def test_official_key_set_matches_sam2(tmp_path):
    """An official-style checkpoint (a state dict of sam2's own SAM2Base) loads strictly into our subclass."""
    from sam2.build_sam import build_sam2

    ref = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    path = str(tmp_path / "sam2.1_hiera_tiny.pt")
    torch.save({"model": ref.state_dict()}, path)
    model = build_icl_sam2("sam2.1_hiera_tiny", image_size=64, checkpoint=path)
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], ref.state_dict()[key])


# --------------------------------------------------------------------- rejections
def test_other_architecture_rejected(tmp_path):
    official = build_icl_sam2("sam2.1_hiera_tiny", image_size=64)
    path = str(tmp_path / "sam2.1_hiera_tiny.pt")
    torch.save({"model": official.state_dict()}, path)
    model = _build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_checkpoint(model, path)
    msg = str(e.value)
    assert "does not match this model" in msg and "preset 'tiny'" in msg
    assert "Missing keys: [" in msg and "Unexpected keys: [" in msg
    assert "Missing keys: []" not in msg and "Unexpected keys: []" not in msg
    assert "in all)" in msg  # long lists are cut and counted
    assert "Pick the preset" in msg
    # nothing was half-loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_sam2_vs_sam21_key_difference(tmp_path):
    v21 = build_icl_sam2("sam2.1_hiera_tiny", image_size=64)
    v2 = build_icl_sam2("sam2_hiera_tiny", image_size=64)
    path = str(tmp_path / "sam2.1.pt")
    torch.save({"model": v21.state_dict()}, path)
    with pytest.raises(
        ValueError,
        match=r"Unexpected keys: \[no_obj_embed_spatial, obj_ptr_tpos_proj\.bias, "
        r"obj_ptr_tpos_proj\.weight\]",
    ) as e:
        load_checkpoint(v2, path)
    assert "Missing keys: []" in str(e.value)

    path2 = str(tmp_path / "sam2.pt")
    torch.save({"model": v2.state_dict()}, path2)
    with pytest.raises(
        ValueError,
        match=r"Missing keys: \[no_obj_embed_spatial, obj_ptr_tpos_proj\.bias, "
        r"obj_ptr_tpos_proj\.weight\]",
    ):
        load_checkpoint(v21, path2)


def test_saved_preset_is_named_in_the_error(tmp_path):
    small = build_icl_sam2("tiny", image_size=64)
    path = str(tmp_path / "ours.pt")
    save_checkpoint(small, path)
    with pytest.raises(ValueError, match=r"It was saved for preset 'tiny'"):
        build_icl_sam2("sam2_hiera_tiny", image_size=64, checkpoint=path)


def test_shape_mismatch_named(source, target, tmp_path):
    sd = dict(source.state_dict())
    key = "memory_attention.layers.0.linear1.weight"
    old_shape = tuple(sd[key].shape)
    sd[key] = torch.zeros(old_shape[0] + 1, old_shape[1])
    path = str(tmp_path / "bad_shape.pt")
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as e:
        load_checkpoint(target, path)
    msg = str(e.value)
    assert f"{key}: checkpoint ({old_shape[0] + 1}, {old_shape[1]}) vs model {old_shape}" in msg
    assert "Missing keys: []" in msg and "Unexpected keys: []" in msg


def test_missing_key_named(source, target, tmp_path):
    sd = dict(source.state_dict())
    del sd["sam_mask_decoder.iou_token.weight"]
    sd["extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "partial.pt")
    torch.save(sd, path)
    with pytest.raises(
        ValueError,
        match=r"Missing keys: \[sam_mask_decoder\.iou_token\.weight\]\. "
        r"Unexpected keys: \[extra\.weight\]",
    ):
        load_checkpoint(target, path)


def test_missing_file(target, tmp_path):
    path = str(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match=r"does not exist; download it with scripts/download_checkpoints\.sh"):
        load_checkpoint(target, path)
    with pytest.raises(ValueError, match="download"):
        build_icl_sam2("tiny", image_size=64, checkpoint=path)


def test_corrupt_file(target, tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_checkpoint(target, str(path))


def test_truncated_file(source, target, tmp_path):
    path = tmp_path / "truncated.pt"
    torch.save({"model": source.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_checkpoint(target, str(path))


@pytest.mark.parametrize(
    "payload",
    [{"x": 1}, {"model": {}}, {"model": {"a": 1}}, [torch.zeros(1)], torch.zeros(3), {}],
    ids=["dict_no_tensors", "empty_model", "model_not_tensors", "list", "tensor", "empty"],
)
def test_no_state_dict(payload, target, tmp_path):
    path = str(tmp_path / "nostate.pt")
    torch.save(payload, path)
    with pytest.raises(ValueError, match="holds no model state dict"):
        load_checkpoint(target, path)


def test_pickled_object_refused(target, tmp_path):
    """weights_only loading: arbitrary pickled objects are not executed, the file is reported unreadable."""

    path = str(tmp_path / "pickle.pt")
    torch.save({"model": target.state_dict(), "obj": _Opaque()}, path)
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_checkpoint(target, path)


class _Opaque:
    pass
