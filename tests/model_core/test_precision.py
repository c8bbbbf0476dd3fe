"""The ``precision`` option: resolution, CPU detection, fp32 unchanged, bf16 agreement, bf16 training, settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sam2.modeling.sam2_base import SAM2Base

import model_core.modeling.precision as precision
from model_core import build_icl_sam2
from model_core.io.phantoms import PHANTOM_LABELS, make_phantom
from model_core.modeling.precision import autocast, cpu_bf16_capability, flush_denormals, resolve_precision
from model_core.predictor import VolumePredictor
from model_core.training import build_training_network
from model_core.training.losses import ICLSAM2Loss

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
#: Dice(bf16, fp32) required per structure. Measured (2-core AMD EPYC without native bf16, torch 2.15):
#: 0.982-0.985 on the phantoms and 0.991-0.992 on the MRI study with the tiny preset's decisive random
#: weights below, and 0.994 per object for Hiera-tiny at 512 on the phantoms (random weights,
#: scripts/benchmark_icl.py --precision bf16). Random weights segment texture, not structures: their
#: masks are small scattered specks whose boundary is most of their area, so this guard sits below the
#: issue's 0.99, which needs trained weights to be tested meaningfully.
DICE_BF16_FP32 = 0.97


def _native(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda: {"bf16": value})


# ------------------------------------------------------------------ the option
def test_resolution(monkeypatch):
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # honoured when asked, native or not
    assert resolve_precision(" BF16 ", torch.device("cpu")) == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        _native(monkeypatch, native)
        assert resolve_precision("auto", "cpu") == expected
        assert resolve_precision(None, "cpu") == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cuda") == "fp32"


@pytest.mark.parametrize("bad", ["fp16", "float32", "", "half", 16])
def test_unknown_values_are_refused_naming_the_accepted_ones(bad):
    with pytest.raises(ValueError, match=r"precision must be one of 'auto', 'fp32', 'bf16'"):
        resolve_precision(bad, "cpu")


def test_bf16_is_refused_where_autocast_has_no_bf16():
    with pytest.raises(ValueError, match="use 'fp32'"):
        resolve_precision("bf16", "meta")
    assert resolve_precision("auto", "meta") == "fp32"


def test_cpu_detection_reads_the_kernel_flags(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 amx_tile amx_bf16\n")
    flags = precision._cpuinfo_flags(str(info))
    assert {"amx_bf16", "avx2"} <= flags and "avx512_bf16" not in flags
    assert precision._cpuinfo_flags(str(tmp_path / "missing")) is None
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    found = cpu_bf16_capability.__wrapped__()
    assert found["avx512_bf16"] and not found["amx_bf16"] and found["bf16"]
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2"})
    assert not cpu_bf16_capability.__wrapped__()["bf16"]
    # probed once per process: the real answer is cached and has every field
    real = cpu_bf16_capability()
    assert real is cpu_bf16_capability()
    assert set(real) >= {"amx_bf16", "avx512_bf16", "bf16", "source", "processor"}


def test_autocast_context():
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_network_attribute_is_validated():
    model = build_icl_sam2("tiny", image_size=SIZE)
    assert model.precision == "fp32" and model.compute_precision == "fp32"
    model.precision = "BF16"
    assert model.precision == "bf16" and model.compute_precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        model.precision = "fp16"


# ------------------------------------------------------------------ fp32 is SAM2's computation
def _decisive(model):
    """Random weights made decisive as in test_propagation (larger logits, objects present)."""
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(4.0)
    return model


def _phantom_task(size: int, depth: int):
    """Support slices (3, showing all three structures) of one phantom, a query volume of another."""
    values = sorted(PHANTOM_LABELS.values())
    volume, label = make_phantom((16, size, size), seed=11)
    query, query_label = make_phantom((depth, size, size), seed=10)
    masks = np.stack([label == v for v in values], axis=1)
    picks = np.flatnonzero(masks.any(axis=(2, 3)).all(axis=1))
    picks = picks[np.linspace(0, len(picks) - 1, 3).round().astype(int)]

    def rgb(a):
        return torch.from_numpy(np.ascontiguousarray(a))[:, None].expand(-1, 3, -1, -1).contiguous()

    gt = torch.from_numpy(np.stack([query_label == v for v in values]))  # (K, D, H, W)
    return rgb(volume[picks]), torch.from_numpy(masks[picks]), rgb(query), gt


def _in_context(model, support_images, support_masks, query):
    """``(K, D, H, W)`` float32 logits of the query, plus the state's stored per-slice results."""
    memory = model.build_support_memory(support_images, support_masks)
    predictor = VolumePredictor(model)
    state = predictor.init_state(query, memory)
    out = torch.zeros(support_masks.shape[1], query.shape[0], model.image_size, model.image_size)
    for z, logits in predictor.propagate(state, direction="forward"):
        out[:, z] = logits[:, 0]
    return out, memory, state


def test_fp32_computes_exactly_what_sam2base_does(monkeypatch):
    torch.manual_seed(0)
    model = _decisive(build_icl_sam2("tiny", image_size=SIZE, precision="fp32"))
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        ours = model.encode_slices(images)
        theirs = model.forward_image((images - model.pixel_mean) / model.pixel_std)
        assert all(torch.equal(a, b) for a, b in zip(ours["backbone_fpn"], theirs["backbone_fpn"]))
        feats, pos, sizes = model.slice_features({k: ours[k] for k in ("backbone_fpn", "vision_pos_enc")})
        args = dict(
            frame_idx=0,
            is_init_cond_frame=True,
            current_vision_feats=[f[:, :1] for f in feats],
            current_vision_pos_embeds=[p[:, :1] for p in pos],
            feat_sizes=sizes,
            point_inputs={"point_coords": torch.tensor([[[20.0, 30.0]]]), "point_labels": torch.tensor([[1]])},
            mask_inputs=None,
            output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
            num_frames=1,
            run_mem_encoder=True,
        )
        a, b = model.track_step(**args), SAM2Base.track_step(model, **args)
        for key in ("pred_masks", "obj_ptr", "object_score_logits", "maskmem_features", "ious"):
            assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key

    # an in-context run in fp32 never enters autocast, and two runs agree bit for bit
    def no_autocast(*args, **kwargs):
        raise AssertionError("fp32 entered torch.autocast")

    monkeypatch.setattr(precision.torch, "autocast", no_autocast)
    support_images, support_masks, query, _ = _phantom_task(SIZE, 4)
    first, _, _ = _in_context(model, support_images, support_masks, query)
    second, _, _ = _in_context(model, support_images, support_masks, query)
    assert torch.equal(first, second)


# ------------------------------------------------------------------ bf16 agrees with fp32
def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum() + b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


@pytest.mark.slow
def test_bf16_masks_agree_with_fp32_on_the_phantoms():
    """In-context: support memory from one phantom, a 16-slice query of another, three structures.

    Setup: the tiny preset with random weights made decisive (as test_propagation's fixture).
    Its masks are not segmentations of the structures (random weights segment texture), so
    this checks that bf16 computes the same function as fp32 through image encoder, support
    encoding, memory attention, decoder and memory encoder, not that accuracy is kept; a
    trained checkpoint is what would show that.
    """
    torch.manual_seed(0)
    model = _decisive(build_icl_sam2("tiny", image_size=128, precision="fp32"))
    support_images, support_masks, query, _ = _phantom_task(128, 16)
    ref, _, _ = _in_context(model, support_images, support_masks, query)
    model.precision = "bf16"
    out, memory, state = _in_context(model, support_images, support_masks, query)
    # what callers keep stays float32 (spatial memories in the storage dtype, as before)
    assert memory.obj_ptr.dtype == memory.object_score_logits.dtype == memory.pred_masks.dtype == torch.float32
    assert memory.maskmem_features.dtype == model.memory_storage_dtype
    assert state.low_res_logits.dtype == state.obj_ptr.dtype == state.iou.dtype == torch.float32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # bf16 did run
    for k in range(ref.shape[0]):
        a, b = ref[k] > 0, out[k] > 0
        assert a.any(), "the fp32 masks must not be empty for the comparison to mean anything"
        dice = _dice(a, b)
        print(f"structure {k + 1}: Dice(bf16, fp32) {dice:.4f}, foreground {float(a.float().mean()):.4f}")
        assert dice >= DICE_BF16_FP32, f"structure {k + 1}: Dice {dice:.4f}"


# ------------------------------------------------------------------ bf16 training
@pytest.mark.slow
def test_a_bf16_training_step_gives_finite_gradients():
    from model_core.training.episodes import EpisodeSampler

    volumes = [make_phantom((16, SIZE, SIZE), seed=i) for i in range(2)]
    sampler = EpisodeSampler(
        volumes, list(PHANTOM_LABELS.values()), num_support=2, num_query=2, image_size=SIZE, seed=0
    )
    torch.manual_seed(0)
    model = build_training_network("tiny", image_size=SIZE, trainable="all", precision="bf16")
    batch = sampler.sample(2)
    outputs = model(batch["support_images"], batch["support_masks"], batch["query_images"])
    assert all(t.dtype == torch.float32 for key in outputs for t in outputs[key])
    loss = ICLSAM2Loss()(outputs, batch["query_masks"])["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None and n.startswith(("sam_mask_decoder.", "memory_attention."))]
    assert not missing, missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert all(g.dtype == torch.float32 for g in grads.values() if g is not None)  # weights stay float32
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    for part in ("image_encoder.trunk.", "memory_encoder.", "memory_attention.", "sam_mask_decoder."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part


# ------------------------------------------------------------------ bundle and app
def test_bundle_passes_precision_to_the_network():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundle" / "configs" / "train.json"))
    assert parser["precision"] == "auto"
    parser["preset"], parser["image_size"], parser["device"] = "tiny", 64, "$torch.device('cpu')"
    parser["precision"] = "bf16"
    assert parser.get_parsed_content("network_def").precision == "bf16"
    parser["precision"] = "fp32"
    parser.parse(True)
    assert parser.get_parsed_content("network_def", lazy=False).precision == "fp32"


def test_app_setting_is_validated():
    from lib.settings import OPTIONS, service_config

    assert OPTIONS["precision"][0] == "auto"
    base = {"bundle": str(ROOT / "bundle"), "device": "cpu", "checkpoint": "/nonexistent/model.pt"}
    assert service_config({**base, "precision": "fp32"}, str(ROOT / "monailabel_app")).precision == "fp32"
    assert service_config({**base, "precision": "bf16"}, str(ROOT / "monailabel_app")).precision == "bf16"
    expected = "bf16" if cpu_bf16_capability()["bf16"] else "fp32"
    assert service_config(base, str(ROOT / "monailabel_app")).precision == expected
    with pytest.raises(
        ValueError, match=r"--conf precision: precision must be one of 'auto', 'fp32', 'bf16', got 'fp16'"
    ):
        service_config({**base, "precision": "fp16"}, str(ROOT / "monailabel_app"))


@pytest.mark.slow
def test_bf16_masks_agree_with_fp32_on_the_real_mri_study(tmp_path):
    """The same comparison on real MRI: Colin27 T1 with AAL regions (Debian's mricron-data).

    Support: 3 axial slices of the study's ``support`` view; query: its ``upper`` view (12 slices
    above, another crop, stored LPS), both as :mod:`model_core.io.mricron` cuts them, scaled
    to [0, 1] by the 0.5/99.5 percentiles and resized to 128 px. Two regions (left and right
    precentral gyrus). Same decisive random weights as on the phantoms, so again agreement of
    bf16 with fp32, not accuracy.
    """
    nib = pytest.importorskip("nibabel")
    from model_core.io.mricron import available, make_study

    if not available():
        pytest.skip("needs Debian's mricron-data (apt-get install mricron-data; .ci/run does)")
    make_study(str(tmp_path), regions=("Precentral_L", "Precentral_R"))
    from model_core.io.mricron import aal_names

    values = [aal_names()[r] for r in ("Precentral_L", "Precentral_R")]

    def load(view: str) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(nib.load(str(tmp_path / f"{view}_t1.nii.gz")).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(tmp_path / f"{view}_aal.nii.gz")).dataobj)
        image, label = np.moveaxis(image, 2, 0), np.moveaxis(label, 2, 0)  # (D, X, Y) axial slices
        lo, hi = np.percentile(image, [0.5, 99.5])
        x = torch.from_numpy(np.clip((image - lo) / (hi - lo), 0, 1))[:, None]
        x = torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False).clamp(0, 1)
        masks = torch.from_numpy(np.stack([label == v for v in values], axis=1)).float()
        masks = torch.nn.functional.interpolate(masks, size=(128, 128), mode="nearest") > 0
        return x.expand(-1, 3, -1, -1).contiguous(), masks

    support_images, support_masks = load("support")
    shown = np.flatnonzero(support_masks.flatten(2).any(-1).all(-1).numpy())
    picks = torch.from_numpy(shown[np.linspace(0, len(shown) - 1, 3).round().astype(int)])
    query, _ = load("upper")
    torch.manual_seed(0)
    model = _decisive(build_icl_sam2("tiny", image_size=128, precision="fp32"))
    ref, _, _ = _in_context(model, support_images[picks], support_masks[picks], query)
    model.precision = "bf16"
    out, _, _ = _in_context(model, support_images[picks], support_masks[picks], query)
    for k in range(ref.shape[0]):
        a, b = ref[k] > 0, out[k] > 0
        assert a.any()
        dice = _dice(a, b)
        print(f"region {k + 1}: Dice(bf16, fp32) {dice:.4f}, foreground {float(a.float().mean()):.4f}")
        assert dice >= DICE_BF16_FP32, f"region {k + 1}: Dice {dice:.4f}"


def test_flush_denormals_zeroes_denormal_arithmetic_on_cpu_only():
    """Training's CPU processes flush denormals (many times slower on x86); CUDA devices are left alone."""
    torch.set_flush_denormal(False)  # an in-process bundle run (ConfigWorkflow's initialize) may have turned it on
    tiny = torch.tensor([1e-40])  # a float32 denormal
    assert float(tiny * 1.0) > 0
    try:
        assert flush_denormals("cuda") is False and float(tiny * 1.0) > 0
        assert flush_denormals("cpu") is True
        assert float(tiny * 1.0) == 0.0
    finally:
        torch.set_flush_denormal(False)
