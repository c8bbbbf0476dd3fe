"""Image-encoder backends: who computes the features of :meth:`InContextSAM2.encode_slices`.

The image encoder (Hiera and its FPN neck, plus the mask decoder's two high-resolution
projections that sam2's ``forward_image`` applies) is most of a CPU's time and a pure
function of the slice, so it may run on another runtime than the memory path (memory
attention, mask decoder, memory encoder), which always stays in torch. A backend is
chosen by name with one option, ``encoder_backend``, everywhere (``build_icl_sam2``, the
service, the app's ``--conf``, the bundle, ``icl-sam2``):

- ``torch``: the network's own modules in the network's precision (``fp32`` unless the
  network's ``precision`` is ``bf16``): what SAM2 computes.
- ``torch-bf16``: the same modules under bfloat16 autocast, whatever the network's precision
  (for CPUs with AMX-BF16 or AVX512-BF16, or CUDA); features go back as float32 to an fp32 network.
- ``onnxruntime``: the encoder exported to ONNX (once per weights and batch size, cached on
  disk by a digest of the weights) and run by onnxruntime on the CPU, float32.
- ``openvino`` / ``openvino-bf16``: the same ONNX file run by OpenVINO's CPU plugin in
  float32 / bfloat16 (its inference precision hint; bf16 where the CPU computes it natively).
- ``auto``: on CUDA ``torch``; on a CPU the fastest of the candidates a short measured probe
  finds on the first encode, cached on disk per CPU, software versions and model size
  (:mod:`model_core.export.encoder_choice`). It follows the network's precision: an ``fp32``
  network picks among the float32 backends (``torch``, ``onnxruntime``, ``openvino``), a
  ``bf16`` one also among the bfloat16 ones.

The exported backends live in :mod:`model_core.export.encoders` (they need the ONNX
exporter, and ``export/`` imports ``modeling/``): this module names them by dotted path
and builds them through ``hydra.utils.instantiate``, as the presets name the network class,
so ``modeling/`` never imports ``export/``. Nothing is exported or probed at import time.

Why this is not upstream: sam2 runs its image encoder only in torch (its ``compile_image_encoder``
flag compiles it, see :mod:`model_core.modeling.compile`); onnxruntime and OpenVINO each run one
exported graph and know nothing of sam2's feature dict or of weights that change.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from hydra.utils import instantiate

from model_core.modeling.precision import autocast

__all__ = [
    "BF16_ENCODER_BACKENDS",
    "CACHE_ENV",
    "ENCODER_BACKENDS",
    "ImageEncoderBackend",
    "TorchImageEncoder",
    "build_encoder_backend",
    "check_encoder_backend",
    "default_cache_dir",
]

#: accepted values of every ``encoder_backend`` option
ENCODER_BACKENDS = ("auto", "torch", "torch-bf16", "onnxruntime", "openvino", "openvino-bf16")
#: the backends that compute in bfloat16 (mask Dice at least 0.99 against torch fp32, not 1e-3 features)
BF16_ENCODER_BACKENDS = ("torch-bf16", "openvino-bf16")
#: environment variable naming the cache folder of exported encoders and probe results
CACHE_ENV = "ICL_SAM2_CACHE_DIR"

#: backend name -> the class ``instantiate`` builds (dotted: the exported ones live in export/)
_TARGETS = {
    "torch": "model_core.modeling.encoders.TorchImageEncoder",
    "torch-bf16": "model_core.modeling.encoders.TorchImageEncoder",
    "onnxruntime": "model_core.export.encoders.ExportedImageEncoder",
    "openvino": "model_core.export.encoders.ExportedImageEncoder",
    "openvino-bf16": "model_core.export.encoders.ExportedImageEncoder",
    "auto": "model_core.export.encoder_choice.AutoImageEncoder",
}


def default_cache_dir() -> str:
    """Where exported encoders and probe results are kept: ``$ICL_SAM2_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/icl-sam2``, else ``~/.cache/icl-sam2`` (created when first written)."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "icl-sam2")


def check_encoder_backend(name: Any, field: str = "encoder_backend") -> str:
    """``name`` normalised (lower case, ``_`` as ``-``), or a ValueError naming ``field`` and the accepted values."""
    value = "torch" if name is None else str(name).strip().lower().replace("_", "-")
    if value not in ENCODER_BACKENDS:
        raise ValueError(f"{field} must be one of {', '.join(ENCODER_BACKENDS)}, got {name!r}.")
    return value


class ImageEncoderBackend(Protocol):
    """What :meth:`InContextSAM2.encode_slices` calls.

    ``encode(network, pixels)``: ``pixels`` ``(N, 3, S, S)`` float32, ImageNet-normalised, on
    ``network.device`` -> the ``backbone_fpn`` levels of sam2's ``forward_image`` (after the
    mask decoder's ``conv_s0``/``conv_s1``), ``(N, C_l, S/4, S/4)``, ``(N, C_l, S/8, S/8)``,
    ``(N, C_l, S/16, S/16)`` on ``network.device``, float32 or the network's compute dtype.

    ``describe()``: a JSON-able dict, at least ``{"name": ...}`` (what ``/info`` and logs show).
    """

    name: str

    def encode(self, network: Any, pixels: torch.Tensor) -> list[torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class TorchImageEncoder:
    """The network's own image encoder (sam2's ``forward_image``), in torch.

    Args:
        name: ``"torch"`` (the network's precision) or ``"torch-bf16"`` (bfloat16 autocast always;
            float32 features for an fp32 network, so its memory path is unchanged).

    With a compiled network (:func:`model_core.modeling.compile.compile_network`) a batch
    shorter than the network's ``encoder_batch_size`` is padded to it, so the compiled graph
    (and its CUDA graph) sees one shape.
    """

    def __init__(self, name: str = "torch", **_: Any):
        self.name = check_encoder_backend(name)
        if self.name not in ("torch", "torch-bf16"):
            raise ValueError(f"TorchImageEncoder runs 'torch' or 'torch-bf16', not {name!r}.")

    def encode(self, network, pixels: torch.Tensor) -> list[torch.Tensor]:
        precision = "bf16" if self.name == "torch-bf16" else network.compute_precision
        count = pixels.shape[0]
        batch = network.encoder_batch_size
        if getattr(network, "compiled", "off") != "off" and count < batch:
            pixels = torch.cat([pixels, pixels[-1:].expand(batch - count, -1, -1, -1)])
        with autocast(precision, network.device):
            levels = network.forward_image(pixels)["backbone_fpn"]
        levels = [level[:count] for level in levels]
        if precision == "bf16" and network.compute_precision == "fp32":
            levels = [level.float() for level in levels]
        return levels

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def build_encoder_backend(name: str | Any = "torch", cache_dir: str | None = None, **options: Any):
    """The backend called ``name`` (or ``name`` itself when it is already a backend object).

    Args:
        name: one of :data:`ENCODER_BACKENDS`.
        cache_dir: where exported encoders and the ``auto`` probe's results are kept
            (default :func:`default_cache_dir`); unused by the torch backends.
        options: passed to the backend (e.g. ``threads`` for the exported ones).

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(name, str) and hasattr(name, "encode"):
        return name
    value = check_encoder_backend(name)
    config = {"_target_": _TARGETS[value], "name": value, **options}
    if value not in ("torch", "torch-bf16"):
        config["cache_dir"] = cache_dir
    return instantiate(config, _recursive_=False)
