"""Fine-tuning options: the freezing matrix and LoRA adapters through peft (attach, train, save, load, merge)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from model_core import build_icl_sam2, load_checkpoint, save_checkpoint
from model_core.io.phantoms import PHANTOM_LABELS, make_phantom
from model_core.training import build_training_network
from model_core.training.episodes import EpisodeSampler
from model_core.training.lora import (
    LORA_TARGETS,
    adapter_parameter_names,
    load_adapters,
    lora_target_modules,
    merge_adapter_file,
    merge_lora,
    merged_copy,
    merged_state_dict,
    save_adapters,
)
from model_core.training.losses import ICLSAM2Loss
from model_core.training.trainable import TRAINABLE_ALIASES, TRAINABLE_GROUPS, parameter_unit, resolve_trainable

SIZE = 64


@pytest.fixture(scope="module")
def batch():
    volumes = [make_phantom((12, SIZE, SIZE), seed=i) for i in range(3)]
    sampler = EpisodeSampler(
        volumes, list(PHANTOM_LABELS.values()), num_support=1, num_query=1, image_size=SIZE, seed=0
    )
    return sampler.sample(1)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("base") / "base.pt")
    save_checkpoint(build_icl_sam2("tiny", image_size=SIZE), path)
    return path


def _forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(batch["support_images"], batch["support_masks"], batch["query_images"])
    return torch.cat(
        [torch.cat(out["multimask_logits"], 1), torch.cat(out["ious"], 1)[..., None, None].expand(-1, -1, SIZE, SIZE)],
        1,
    )


def _train_steps(model, batch, steps: int = 1, lr: float = 1e-2) -> None:
    optimizer = torch.optim.AdamW(model.param_groups(lr), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(batch["support_images"], batch["support_masks"], batch["query_images"])
        loss = ICLSAM2Loss()(out, batch["query_masks"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ------------------------------------------------------------------ freezing matrix


@pytest.fixture(scope="module")
def model():
    return build_training_network("tiny", image_size=SIZE, trainable="all")


def test_every_parameter_has_one_group_and_loose_parameters_are_placed(model):
    units = {name: parameter_unit(name) for name, _ in model.named_parameters()}  # raises for an unowned parameter
    assert set(units.values()) == {"image_encoder.trunk", "image_encoder.neck", *list(TRAINABLE_GROUPS)[1:]}
    assert units["maskmem_tpos_enc"] == units["no_mem_embed"] == units["obj_ptr_tpos_proj.weight"] == "memory_attention"
    assert units["no_obj_embed_spatial"] == "memory_encoder"
    assert units["obj_ptr_proj.layers.0.weight"] == units["no_obj_ptr"] == "mask_decoder"
    assert units["mask_downsample.weight"] == "prompt_encoder"


@pytest.mark.parametrize("group", list(TRAINABLE_GROUPS))
def test_each_group_trains_exactly_its_parameters(model, group):
    summary = model.set_trainable([group])
    expected = {name for name, _ in model.named_parameters() if parameter_unit(name).split(".")[0] == group}
    assert expected and {n for n, p in model.named_parameters() if p.requires_grad} == expected
    optimized = {id(p) for g in model.param_groups(1e-4) for p in g["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in expected}
    n = sum(p.numel() for name, p in model.named_parameters() if name in expected)
    assert summary[group] == {"trainable": n, "total": n} and summary["total"]["trainable"] == n


def test_aliases_and_lists(model):
    assert resolve_trainable("all") == resolve_trainable(list(TRAINABLE_GROUPS))
    assert "image_encoder.trunk" not in resolve_trainable("frozen") and "image_encoder.neck" not in resolve_trainable(
        "frozen"
    )
    assert resolve_trainable("neck") == ("image_encoder.neck", *TRAINABLE_ALIASES["frozen"])
    assert resolve_trainable(["mask_decoder", "memory_attention"]) == ("memory_attention", "mask_decoder")
    model.set_trainable("neck")
    assert not any(p.requires_grad for p in model.image_encoder.trunk.parameters())
    assert all(p.requires_grad for p in model.image_encoder.neck.parameters())
    model.set_trainable("none")
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="Nothing to train: trainable is \\[\\] and there are no LoRA adapters"):
        model.param_groups(1e-4)


def test_unknown_names_are_errors_that_list_the_valid_ones(model, caplog):
    for bad in ("decoder", ["mask_decoder", "hiera"], 3, [None]):
        with pytest.raises(
            ValueError, match="image_encoder.*memory_attention.*memory_encoder.*prompt_encoder.*mask_decoder.*frozen"
        ):
            resolve_trainable(bad)
    with pytest.raises(ValueError, match="Unknown trainable group 'decoder'"):
        build_training_network("tiny", image_size=SIZE, trainable="decoder")
    with caplog.at_level(logging.INFO, logger="model_core.training.network"):
        model.set_trainable(["prompt_encoder"])
    n = sum(p.numel() for p in model.sam_prompt_encoder.parameters()) + model.mask_downsample.weight.numel() + 1
    assert "Trainable parameters (trainable: ['prompt_encoder']; no LoRA)" in caplog.text
    assert re.search(rf"prompt_encoder +{n:,} / +{n:,} +\(100.0%\)", caplog.text)
    total = sum(p.numel() for p in model.parameters())
    assert re.search(rf"total +{n:,} / +{total:,}", caplog.text)


# ------------------------------------------------------------------ LoRA


def test_lora_trains_only_adapters_of_the_expected_size():
    model = build_training_network(
        "tiny",
        image_size=SIZE,
        trainable="none",
        lora_rank=4,
        lora_targets=["image_encoder.attn", "mask_decoder.transformer"],
    )
    targets = model.lora["target_modules"]
    assert any(".attn.qkv" in t for t in targets) and any("final_attn_token_to_image.v_proj" in t for t in targets)
    assert (
        len(targets) == 2 * 5 + 4 * 7
    )  # Hiera: qkv + proj in 5 blocks; two-way transformer: 7 attentions x q, k, v, out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_parameter_names(model) and all(".lora_" in n for n in trainable)
    modules = dict(model.named_modules())
    expected = sum(4 * (modules[t].in_features + modules[t].out_features) for t in targets)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == expected
    assert model.trainable_summary()["lora"] == {"trainable": expected, "total": expected}
    assert [g["name"] for g in model.param_groups(1e-3, 1e-5)] == ["lora"] and model.param_groups(1e-3, 1e-5)[0][
        "lr"
    ] == 1e-3
    with pytest.raises(ValueError, match="Caching image features needs a frozen image encoder"):
        model.cache_encoder_features(8)  # adapters in the encoder change its features
    decoder_only = build_training_network(
        "tiny", image_size=SIZE, trainable="none", lora_rank=2, lora_targets="mask_decoder.transformer"
    )
    assert decoder_only.cache_encoder_features(8).feature_cache is not None


def test_bad_lora_options_are_errors():
    with pytest.raises(ValueError, match="Unknown LoRA target group.*'image_encoder.attn'.*'mask_decoder.transformer'"):
        build_training_network("tiny", image_size=SIZE, trainable="none", lora_rank=4, lora_targets=["decoder"])
    with pytest.raises(ValueError, match="lora_rank must be an integer >= 0"):
        build_training_network("tiny", image_size=SIZE, lora_rank=-1)
    model = build_training_network("tiny", image_size=SIZE, lora_rank=2)
    assert lora_target_modules(model, "memory_attention.attn")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        from model_core.training.lora import attach_lora

        attach_lora(model, 2)
    assert set(LORA_TARGETS) >= {"image_encoder.attn", "mask_decoder.transformer"}


@pytest.mark.slow
def test_lora_step_save_load_merge(batch, base_checkpoint, tmp_path):
    torch.manual_seed(1)
    model = build_training_network(
        "tiny",
        image_size=SIZE,
        checkpoint=base_checkpoint,
        trainable="none",
        lora_rank=4,
        lora_targets=["image_encoder.attn", "mask_decoder.transformer"],
    )
    adapters = adapter_parameter_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, batch)
    after = model.state_dict()
    adapted_file = tmp_path / "adapted.pt"
    torch.save({"model": after}, adapted_file)
    with pytest.raises(ValueError, match="It holds LoRA adapters"):
        load_checkpoint(build_icl_sam2("tiny", image_size=SIZE), str(adapted_file))
    base_keys = [k for k in before if k not in adapters]
    assert all(torch.equal(before[k], after[k]) for k in base_keys)  # base weights bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in adapters if "lora_B" in k)  # adapters trained
    adapted = _forward(model, batch)
    plain = build_training_network(
        "tiny", image_size=SIZE, checkpoint=base_checkpoint, trainable="none"
    )  # episode forward
    assert (adapted - _forward(plain, batch)).abs().max() > 1e-4  # the adapters change the output

    # save -> load onto a fresh base reproduces the outputs
    save_adapters(model, tmp_path / "model_lora.pt", {"classes": [1]})
    fresh = load_adapters(
        build_training_network("tiny", image_size=SIZE, checkpoint=base_checkpoint, trainable="none"),
        tmp_path / "model_lora.pt",
    )
    assert torch.equal(_forward(fresh, batch), adapted)

    # merge: the same outputs, a plain state dict the project's loader takes strictly
    state = merged_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in state) and model.lora  # the trained model is untouched
    merged = merged_copy(model)
    assert (_forward(merged, batch) - adapted).abs().max() < 1e-5
    save_checkpoint(merge_lora(fresh), str(tmp_path / "model.pt"))
    load_checkpoint(build_icl_sam2("tiny", image_size=SIZE), str(tmp_path / "model.pt"))  # strict, plain network
    served = build_training_network("tiny", image_size=SIZE, trainable="none")
    load_checkpoint(served, str(tmp_path / "model.pt"))
    assert (_forward(served, batch) - adapted).abs().max() < 1e-5
    assert set(served.state_dict()) == set(state)

    # base checkpoint + adapter file -> merged checkpoint, from the record in the adapter file
    merge_adapter_file(str(tmp_path / "model_lora.pt"), str(tmp_path / "merged.pt"))
    again = build_training_network("tiny", image_size=SIZE, checkpoint=str(tmp_path / "merged.pt"), trainable="none")
    assert (_forward(again, batch) - adapted).abs().max() < 1e-5


@pytest.mark.slow
def test_adapter_file_keeps_what_the_freezing_matrix_trained(batch, base_checkpoint, tmp_path):
    """LoRA on the encoder plus a fully trained mask decoder: the file rebuilds both."""
    torch.manual_seed(2)
    model = build_training_network(
        "tiny", image_size=SIZE, checkpoint=base_checkpoint, trainable=["mask_decoder"], lora_rank=2
    )
    _train_steps(model, batch)
    save_adapters(model, tmp_path / "a.pt")
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    assert data["lora"]["trained"] and all(
        k.split(".")[0] in ("sam_mask_decoder", "obj_ptr_proj", "no_obj_ptr") for k in data["lora"]["trained"]
    )
    assert data["lora"]["settings"]["base_checkpoint"] == base_checkpoint and data["icl_sam2"]["preset"] == "tiny"
    fresh = load_adapters(
        build_training_network("tiny", image_size=SIZE, checkpoint=base_checkpoint, trainable="none"), tmp_path / "a.pt"
    )
    assert torch.equal(_forward(fresh, batch), _forward(model, batch))
    with pytest.raises(ValueError, match="no LoRA adapter file"):
        load_adapters(build_icl_sam2("tiny", image_size=SIZE), base_checkpoint)
