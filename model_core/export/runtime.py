"""Running exported single-slice paths: torch and onnxruntime behind one interface, and their timing.

:class:`TorchSlicePredictor` and :class:`OnnxSlicePredictor` have the same methods
(``encode``, ``decode``, ``predict``), so a test or a benchmark compares them on the same
inputs; :class:`OnnxLiteMedSAMBackend` puts onnxruntime behind
:class:`~model_core.medsam_lite.model.LiteMedSAM`. Exporting is :mod:`model_core.export.onnx`.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from model_core.export.onnx import (
    BF16_MODES,
    OUTPUT_NAMES,
    SlicePath,
    export_slice_path,
    sam2_prompts,
)
from model_core.modeling.precision import (
    autocast,
    cpu_bf16_capability,
    resolve_precision,
)

__all__ = [
    "OnnxLiteMedSAMBackend",
    "OnnxSlicePredictor",
    "TorchSlicePredictor",
    "compare_with_torch",
    "time_slice_path",
]


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
            raise ValueError(
                f"features must be the dict encode() returns with keys {list(self.feature_names)}, got {got}."
            )
        out = {name: torch.as_tensor(features[name]).float().cpu().contiguous() for name in self.feature_names}
        for name, value in out.items():
            if value.ndim != 4 or value.shape[0] != 1:
                raise ValueError(
                    f"features[{name!r}] must be one image's (1, C, H, W) map, got {tuple(value.shape)}; "
                    "decode one image at a time (index the batch encode() returned)."
                )
        return out

    def _check_prompts(self, prompts: Mapping[str, Any]) -> dict[str, Any]:
        if set(prompts) != set(self.prompt_names):
            raise ValueError(f"prompts must be exactly {list(self.prompt_names)}, got {sorted(prompts)}.")
        return {name: prompts[name] for name in self.prompt_names}

    def encode(self, image: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def decode(
        self, features: Mapping[str, Any], **prompts: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def predict(self, image: Any, **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode(encode(image), **prompts)`` for one image ``(1, 3, S, S)``."""
        return self.decode(self.encode(image), **prompts)


class TorchSlicePredictor(_SliceRunner):
    """Run a :class:`SlicePath` with torch (fp32 or bf16 autocast).

    Args:
        path: the modules to run.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:func:`model_core.modeling.precision.resolve_precision`);
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
            raise ValueError(
                f"decoder_file does not take the encoder's outputs {missing}; the two files are not a pair."
            )
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
    """LiteMedSAM's two steps from :func:`export_slice_path` files, as a
    :class:`model_core.medsam_lite.backends.LiteMedSAMBackend`.

    So ``LiteMedSAM(OnnxLiteMedSAMBackend(encoder_file, decoder_file))`` segments slices and
    volumes exactly as the torch model does, with onnxruntime doing the network work.

    Args:
        encoder_file, decoder_file, **options: see :class:`OnnxSlicePredictor`.
    """

    device = torch.device("cpu")

    def __init__(self, encoder_file: str | os.PathLike, decoder_file: str | os.PathLike, **options: Any):
        self.runner = OnnxSlicePredictor(encoder_file, decoder_file, **options)
        if self.runner.feature_names != ("image_embed",) or self.runner.prompt_names != ("boxes",):
            raise ValueError(
                f"{os.fspath(encoder_file)!r} and {os.fspath(decoder_file)!r} are not a LiteMedSAM export "
                f"(features {self.runner.feature_names}, prompts {self.runner.prompt_names})."
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` float32 in [0, 1] -> ``(B, 256, 64, 64)`` float32."""
        return self.runner.encode(images.float().cpu())["image_embed"]

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(1, 256, 64, 64)``, boxes ``(K, 4)`` on the 256 grid -> logits ``(K, 1, 256, 256)``, iou ``(K,
        1)``.
        """
        return self.runner.decode({"image_embed": embeddings.float().cpu()}, boxes=boxes.float().cpu().reshape(-1, 4))


def _median_ms(fn, runs: int, warmup: int) -> float:

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
            natively (:func:`model_core.modeling.precision.cpu_bf16_capability`), ``"force"`` times it
            anyway (emulated: usually slower than fp32), ``"off"`` never.
        threads: CPU threads for torch and onnxruntime alike (None: each library's default).
        dynamo: exporter (see :func:`export_slice_path`).

    Returns:
        ``{"encoder_ms": {backend: ms or None}, "decoder_ms": {...}, "skipped": {backend: why},
        "max_abs_logit_diff_onnx_vs_torch": float, "threads": {...}, "runs": ..., "warmup": ...}``.
    """

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
        encoder_ms[name] = _median_ms(lambda runner=runner: runner.encode(image), int(runs), int(warmup))
        decoder_ms[name] = _median_ms(
            lambda runner=runner, features=features: runner.decode(features, **prompts), int(runs), int(warmup)
        )
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


def compare_with_torch(path: SlicePath, files: Mapping[str, str], seed: int = 0) -> float:
    """Largest absolute difference between torch's and onnxruntime's logits for ``path`` and its exported ``files``.

    One random image and one box (a quarter of the image in from its corners), as an export check.
    """
    size = path.image_size
    box = [size * 0.25, size * 0.3, size * 0.7, size * 0.8]
    prompts = {"boxes": torch.tensor([box])} if "boxes" in path.example_prompts else sam2_prompts(box=box)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    expected = TorchSlicePredictor(path).predict(image, **prompts)[0]
    got = OnnxSlicePredictor(files["encoder"], files["decoder"]).predict(image, **prompts)[0]
    return float((expected - got).abs().max())
