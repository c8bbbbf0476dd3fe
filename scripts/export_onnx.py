"""Export a single-slice path (image encoder; prompt encoder + mask decoder) to two ONNX files.

    python scripts/export_onnx.py --model sam2 --preset sam2.1_hiera_tiny --image_size 512 --output_dir onnx
    python scripts/export_onnx.py --model sam2 --checkpoint sam2.1_hiera_tiny.pt --output_dir onnx
    python scripts/export_onnx.py --model medsam_lite --output_dir onnx     # LiteMedSAM, its shipped weights

Writes ``<name>_encoder.onnx`` and ``<name>_decoder.onnx`` (opset 18, weights inside) and,
unless ``--check False``, runs both with onnxruntime on a random image and a box and prints
the largest difference of the logits from torch. Load them with
``model_core.export.runtime.OnnxSlicePredictor(encoder_file, decoder_file)``.
"""

from __future__ import annotations

import json

import fire
import torch

from model_core.export.onnx import DEFAULT_OPSET, export_slice_path, medsam_lite_slice_path, sam2_prompts, sam2_slice_path
from model_core.export.runtime import OnnxSlicePredictor, TorchSlicePredictor

MODELS = ("sam2", "medsam_lite")


def main(model: str = "sam2", output_dir: str = "onnx", preset: str = "sam2.1_hiera_tiny", image_size: int | None = None,
         checkpoint: str | None = None, opset: int = DEFAULT_OPSET, dynamo: bool = False, multimask_output: bool = True,
         check: bool = True) -> None:
    """Args:
        model: ``sam2`` (a model_core preset) or ``medsam_lite`` (LiteMedSAM, 256 px, shipped weights).
        output_dir: where the two files go.
        preset, image_size, checkpoint: the SAM2 model (random weights without a checkpoint).
        opset: ONNX opset (18 by default).
        dynamo: the torch.export-based exporter instead of the TorchScript one.
        multimask_output: SAM2's decoder returns 3 candidate masks (else 1).
        check: compare onnxruntime's logits with torch's on a random image and a box.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}.")
    if model == "sam2":
        from model_core.modeling.presets import build_icl_sam2

        path = sam2_slice_path(build_icl_sam2(preset, image_size=image_size, checkpoint=checkpoint),
                               multimask_output=multimask_output, name=preset)
    else:
        path = medsam_lite_slice_path()
    files = export_slice_path(path, output_dir, opset=opset, dynamo=dynamo)
    result = {"model": path.name, "image_size": path.image_size, "opset": opset, **files}
    if check:
        size = path.image_size
        box = [size * 0.25, size * 0.3, size * 0.7, size * 0.8]
        prompts = sam2_prompts(box=box) if model == "sam2" else {"boxes": torch.tensor([box])}
        image = torch.rand(1, 3, size, size)
        expected = TorchSlicePredictor(path).predict(image, **prompts)[0]
        got = OnnxSlicePredictor(files["encoder"], files["decoder"]).predict(image, **prompts)[0]
        result["max_abs_logit_diff"] = float((expected - got).abs().max())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    fire.Fire(main)
