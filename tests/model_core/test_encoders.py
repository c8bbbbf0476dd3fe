"""Image-encoder backends (``encoder_backend``): each against torch fp32, ``auto``'s choice, the seam's rules.

fp32 backends (onnxruntime, OpenVINO in f32) must give the features of torch fp32 within 1e-3;
bf16 backends (torch-bf16, OpenVINO in bf16) must give masks with Dice at least 0.99 against torch
fp32 with trained weights (the session's ``trained_tiny``). A backend whose runtime is missing, or a
bf16 one on a CPU without native bfloat16, is skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model_core.export.encoder_choice import CHOICE_FILE, AutoImageEncoder, cpu_candidates, lite_medsam_backend
from model_core.export.encoders import runtime_available
from model_core.io.phantoms import PHANTOM_LABELS, make_phantom
from model_core.modeling.encoders import ENCODER_BACKENDS, TorchImageEncoder
from model_core.modeling.precision import cpu_bf16_capability
from model_core.modeling.presets import build_icl_sam2
from model_core.predictor import VolumePredictor

FP32_EXPORTED = ("onnxruntime", "openvino")


def _skip_unless_runnable(name: str) -> None:
    if name.startswith("openvino") and not runtime_available("openvino"):
        pytest.skip("openvino is not installed")
    if name == "onnxruntime" and not runtime_available("onnxruntime"):
        pytest.skip("onnxruntime is not installed")
    if name == "openvino-bf16" and not cpu_bf16_capability()["bf16"]:
        pytest.skip("this CPU has neither AMX-BF16 nor AVX512-BF16 (OpenVINO would compute in f32)")


def _rgb(volume: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(volume)[:, None].expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_icl_sam2("tiny", image_size=64)


@pytest.fixture(scope="module")
def slices():
    image, _ = make_phantom((3, 64, 64), seed=5)
    return _rgb(image)


#: in a child process, so that a crash fails the test instead of ending the test run
_SHARED_CACHE_SCRIPT = """
import json, sys
import numpy as np
from model_core.export.encoders import EncoderSession
file, cache = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
def run(runtime, folder):
    return EncoderSession(file, runtime, 2, folder).run(x)[0]
reference = run("openvino", None)
out = {}
for order in (("openvino", "openvino-bf16"), ("openvino-bf16", "openvino")):
    folder = cache + "/" + "-".join(order)
    for runtime in order:
        out[folder + ":" + runtime] = float(np.abs(run(runtime, folder) - reference).max())
print(json.dumps(out))
"""


def test_openvino_precisions_keep_their_own_compiled_models(tmp_path):
    """f32 and bf16 compiles of one file share a cache folder in either order: each runs in its own precision.

    OpenVINO names a cached blob without the precision hint: with one folder, an f32 compile after a bf16 one ran in
    bf16, and on a CPU with AMX-BF16 a bf16 compile after an f32 one crashed in its first inference.
    """
    _skip_unless_runnable("openvino-bf16")
    backend = lite_medsam_backend("onnxruntime", cache_dir=str(tmp_path))  # LiteMedSAM's real encoder (it crashed)
    backend.encode(torch.rand(1, 3, 256, 256))  # exports it
    (file,) = backend.runner.files.values()
    done = subprocess.run(
        [sys.executable, "-c", _SHARED_CACHE_SCRIPT, file, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for key, error in errors.items():
        if key.endswith(":openvino"):
            assert error < 1e-5, (key, error)  # float32, not a bf16 blob
        else:
            assert error > 1e-4, (key, error)  # bfloat16 indeed


@pytest.mark.parametrize("name", FP32_EXPORTED)
def test_fp32_backend_features_match_torch(network, slices, name):
    _skip_unless_runnable(name)
    network.encoder_backend = "torch"
    with torch.inference_mode():
        expected = network.encode_slices(slices)
        network.encoder_backend = name
        got = network.encode_slices(slices)
    sessions = list(network.encoder_backend.runner._sessions.values())
    network.encoder_backend = "torch"
    assert got.keys() == expected.keys()
    for key in ("backbone_fpn", "vision_pos_enc"):
        for a, b in zip(got[key], expected[key]):
            assert a.shape == b.shape and a.dtype == torch.float32
            assert float((a - b).abs().max()) < 1e-3
    if name == "onnxruntime":  # its idle workers sleep: they would spin on the cores torch's memory path runs on
        options = [session.session.get_session_options() for session in sessions]
        assert options and {o.get_session_config_entry("session.intra_op.allow_spinning") for o in options} == {"0"}


def test_exported_backend_follows_new_weights(slices, tmp_path):
    """Weights loaded after the first encode (a checkpoint, training) are exported again, never served stale."""
    _skip_unless_runnable("onnxruntime")
    torch.manual_seed(1)
    net = build_icl_sam2("tiny", image_size=64, encoder_backend="onnxruntime", encoder_cache_dir=str(tmp_path))
    with torch.inference_mode():
        net.encode_slices(slices[:1])
        first = dict(net.encoder_backend.runner.files)
        with torch.no_grad():
            for p in net.image_encoder.parameters():
                p.mul_(1.1)
        got = net.encode_slices(slices[:1])["backbone_fpn"]
        expected = TorchImageEncoder("torch").encode(net, (slices[:1] - net.pixel_mean) / net.pixel_std)
    assert net.encoder_backend.runner.files != first and len(list((tmp_path / "encoders").glob("*.onnx"))) == 2
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) < 1e-3
    clone = copy.deepcopy(net)  # a copy (LoRA merges copy the model) drops the runtime session, then opens its own
    with torch.inference_mode():
        again = clone.encode_slices(slices[:1])["backbone_fpn"]
    assert max(float((a - b).abs().max()) for a, b in zip(again, expected)) < 1e-3


def test_training_mode_runs_the_torch_modules(slices, tmp_path):
    torch.manual_seed(0)
    net = build_icl_sam2("tiny", image_size=64, encoder_backend="onnxruntime", encoder_cache_dir=str(tmp_path))
    net.train()
    out = net.encode_slices(slices[:1])
    assert out["backbone_fpn"][0].requires_grad  # gradients flow: not an exported runtime
    assert not (tmp_path / "encoders").exists()


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match=r"encoder_backend must be one of auto, torch, torch-bf16, onnxruntime"):
        build_icl_sam2("tiny", image_size=64, encoder_backend="tensorrt")
    with pytest.raises(ValueError, match=r"compile must be one of off, default, reduce-overhead, max-autotune"):
        build_icl_sam2("tiny", image_size=64, compile="fast")
    assert build_icl_sam2("tiny", image_size=64, encoder_backend="ONNXRUNTIME").encoder_backend.name == "onnxruntime"
    assert set(ENCODER_BACKENDS) == {"auto", "torch", "torch-bf16", "onnxruntime", "openvino", "openvino-bf16"}


def test_auto_measures_once_then_reads_its_choice(network, slices, tmp_path, caplog):
    network.encoder_backend = "torch"
    network.precision = "fp32"
    auto = AutoImageEncoder(cache_dir=str(tmp_path))
    with torch.inference_mode():
        got = auto.encode(network, (slices[:1] - network.pixel_mean) / network.pixel_std)
    info = auto.describe()
    # an fp32 network picks among the float32 backends only
    assert (
        set(info["seconds_per_slice"]) == set(cpu_candidates("fp32", openvino=False))
        and "openvino-bf16" not in info["seconds_per_slice"]
    )
    assert info["chosen"] == min(info["seconds_per_slice"], key=info["seconds_per_slice"].get)
    assert info["cached"] is False and info["backend"]["name"] == info["chosen"] and len(got) == 3
    stored = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert [r["chosen"] for r in stored.values()] == [info["chosen"]]
    again = AutoImageEncoder(cache_dir=str(tmp_path))
    with caplog.at_level("INFO", logger="model_core.export.encoder_choice"):
        again.resolve(network)
    assert again.describe()["cached"] is True and again.describe()["chosen"] == info["chosen"]
    assert f"encoder_backend auto: {info['chosen']}" in caplog.text  # what the bundle's log shows
    if cpu_bf16_capability()["bf16"]:  # a bf16 network also weighs the bfloat16 backends (another key: measured)
        network.precision = "bf16"
        try:
            with torch.inference_mode():
                again.resolve(network)
        finally:
            network.precision = "fp32"
        assert again.describe()["cached"] is False
        assert set(again.describe()["seconds_per_slice"]) == set(cpu_candidates("bf16", openvino=False))


# ------------------------------------------------------------------------ with trained weights: masks
def _segment(net, support_images, support_masks, query) -> torch.Tensor:
    with torch.inference_mode():
        memory = net.build_support_memory(support_images, support_masks)
        return VolumePredictor(net).segment_volume(query, memory).masks


@pytest.fixture(scope="module")
def trained_case(trained_tiny):
    """The trained tiny model, a support set from one phantom and a query phantom, and torch fp32's masks."""
    net = build_icl_sam2("tiny", image_size=64, checkpoint=trained_tiny["checkpoint"])
    values = sorted(PHANTOM_LABELS.values())
    image, label = make_phantom((16, 64, 64), seed=101)
    masks = np.stack([label == v for v in values], axis=1)
    picks = np.flatnonzero(masks.any(axis=(2, 3)).all(axis=1))[[2, -3]]
    support = (_rgb(image[picks]), torch.from_numpy(masks[picks]))
    query, truth = make_phantom((16, 64, 64), seed=102)
    reference = _segment(net, *support, _rgb(query))
    return {"network": net, "support": support, "query": _rgb(query), "truth": truth, "reference": reference}


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


#: measured with the fp32-trained tiny model (tests/conftest.py): OpenVINO 2026.4's CPU plugin in bf16 moves the
#: lowest FPN level (``vision_features``) up to 0.17 from torch fp32 (torch's bf16 autocast: 0.04 at random weights),
#: and the masks differ (Dice 0.908 / 0.996 / 0.902 against torch fp32 on an Intel Xeon with AMX-BF16, 2026-12-05), so
#: SAM2's ``auto`` leaves OpenVINO out. OpenVINO in f32 agrees (Dice 1.0); it had failed here too while both
#: precisions shared one compiled-model cache (``test_openvino_precisions_keep_their_own_compiled_models``).
OPENVINO_BF16_DIFFERS = pytest.mark.xfail(
    strict=True, reason="OpenVINO's bf16 moves the trained tiny model's lowest FPN level (0.17) and its masks"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "torch-bf16",
        pytest.param("openvino-bf16", marks=OPENVINO_BF16_DIFFERS),
        "onnxruntime",
        "openvino",
    ],
)
def test_backend_masks_match_torch_fp32_with_trained_weights(trained_case, name):
    _skip_unless_runnable(name)
    net, reference = trained_case["network"], trained_case["reference"]
    truth = torch.from_numpy(trained_case["truth"])
    # the reference finds every structure (else agreement would be of empty masks); how well it finds them is
    # the recipe's quality, not the backends': the tests' 400-step model is weak in context (Dice printed)
    dice = [_dice(reference[k], truth == v) for k, v in enumerate(sorted(PHANTOM_LABELS.values()))]
    print("reference Dice against truth", [round(d, 3) for d in dice])
    assert all(int(reference[k].sum()) > 50 for k in range(reference.shape[0])), [int(m.sum()) for m in reference]
    net.encoder_backend = name
    try:
        got = _segment(net, *trained_case["support"], trained_case["query"])
    finally:
        net.encoder_backend = "torch"
    for k in range(reference.shape[0]):
        assert _dice(got[k], reference[k]) >= 0.99, (name, k, _dice(got[k], reference[k]))
