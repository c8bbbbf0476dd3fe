"""``encoder_backend="auto"``: the fastest image-encoder backend of this machine, measured once and remembered.

On a GPU the torch modules run (in the network's precision; compiled with ``compile``). On a
CPU a short probe times each candidate backend on random slices of the model's size and
batch (one untimed run, which also exports and compiles, then the median of ``runs``), picks
the fastest, and writes the result to ``<cache_dir>/encoder_choice.json`` under a key of
what the speed depends on: the CPU (model name, AMX-BF16 / AVX512-BF16), torch,
onnxruntime and OpenVINO versions, threads, the model (preset, image size, widths) and
batch, and the candidates. The next start with the same key reads the choice without
timing anything (the exported file of the chosen backend is cached separately, by weights).

Candidates follow the precision: float32 ones always (``torch`` in fp32, ``onnxruntime``,
``openvino`` where installed), the bfloat16 ones (``torch`` in bf16, ``openvino-bf16``) only
when the network computes in bf16 (``precision`` ``bf16``, or ``auto`` on a CPU with native
bfloat16), so an ``fp32`` server never gets bfloat16 features unasked.

The same probe picks LiteMedSAM's backend (:func:`lite_medsam_backend`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import statistics
import time
from typing import Any, Callable

import torch

from model_core.export.encoders import (
    ExportedLiteMedSAMBackend,
    runtime_available,
    runtime_version,
)
from model_core.io.files import atomic_path
from model_core.medsam_lite.backends import TorchBackend, load_package_network
from model_core.medsam_lite.model import MODEL_SIZE, LiteMedSAM
from model_core.modeling.encoders import (
    TorchImageEncoder,
    build_encoder_backend,
    check_encoder_backend,
    default_cache_dir,
)
from model_core.modeling.precision import cpu_bf16_capability, resolve_precision

__all__ = [
    "CHOICE_FILE",
    "AutoImageEncoder",
    "ChosenLiteMedSAMBackend",
    "cpu_candidates",
    "lite_medsam",
    "lite_medsam_backend",
    "probe_backends",
]

logger = logging.getLogger(__name__)

#: the file (in the cache folder) that remembers each probe's result
CHOICE_FILE = "encoder_choice.json"


def cpu_candidates(precision: str, openvino: bool = True) -> list[str]:
    """The backends ``auto`` times on a CPU for a network computing in ``precision`` (``fp32`` or ``bf16``).

    With ``bf16`` the ``torch`` candidate already computes in bfloat16 (the network's precision).
    ``openvino=False`` leaves OpenVINO out (SAM2's encoder: see :class:`AutoImageEncoder`).
    """
    names = ["torch"]
    names += [n for n in ("onnxruntime", "openvino") if runtime_available(n) and (openvino or n != "openvino")]
    if precision == "bf16" and openvino and runtime_available("openvino"):
        names.append("openvino-bf16")
    return names


def _machine_key(**model: Any) -> str:
    cpu = cpu_bf16_capability()
    key = {
        "processor": cpu["processor"],
        "amx_bf16": cpu["amx_bf16"],
        "avx512_bf16": cpu["avx512_bf16"],
        "torch": torch.__version__,
        "onnxruntime": runtime_version("onnxruntime"),
        "openvino": runtime_version("openvino"),
        "threads": torch.get_num_threads(),
        **model,
    }
    return json.dumps(key, sort_keys=True)


def _read_choices(cache_dir: str) -> dict[str, Any]:
    path = os.path.join(cache_dir, CHOICE_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_choice(cache_dir: str, key: str, record: dict[str, Any]) -> None:
    choices = _read_choices(cache_dir)
    choices[key] = record
    os.makedirs(cache_dir, exist_ok=True)
    with atomic_path(os.path.join(cache_dir, CHOICE_FILE), suffix=".json") as tmp, open(tmp, "w") as f:
        json.dump(choices, f, indent=1)


def probe_backends(run: dict[str, Callable[[], Any]], slices: int, runs: int = 3) -> dict[str, Any]:
    """Seconds per slice of each ``run[name]()`` (one untimed call, then the median of ``runs``).

    Returns:
        ``{"seconds_per_slice": {name: s}, "errors": {name: message}, "chosen": fastest name}``;
        a candidate that fails is reported in ``errors`` and not chosen.
    """
    seconds, errors = {}, {}
    for name, fn in run.items():
        try:
            with torch.inference_mode():
                fn()
                times = []
                for _ in range(max(int(runs), 1)):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
            seconds[name] = round(statistics.median(times) / slices, 5)
        except Exception as e:  # a runtime that cannot run this model here is skipped, with its reason
            errors[name] = f"{type(e).__name__}: {e}"
            logger.warning(f"encoder_backend auto: {name} cannot run here ({errors[name]}); skipped.")
    if not seconds:
        raise RuntimeError(f"No image-encoder backend ran: {errors}")
    return {"seconds_per_slice": seconds, "errors": errors, "chosen": min(seconds, key=seconds.get)}


def _choose(
    cache_dir: str, key: str, run: dict[str, Callable[[], Any]], slices: int, runs: int, remeasure: bool = False
) -> dict[str, Any]:
    cached = None if remeasure else _read_choices(cache_dir).get(key)
    if cached and cached.get("chosen") in run:
        choice = {**cached, "cached": True}
    else:
        choice = _measure(cache_dir, key, run, slices, runs)
    how = f"measured {choice['when']}" + (" (cached)" if choice["cached"] else "")
    logger.info(f"encoder_backend auto: {choice['chosen']}; seconds per slice {choice['seconds_per_slice']}, {how}.")
    return choice


def _measure(cache_dir: str, key: str, run: dict[str, Callable[[], Any]], slices: int, runs: int) -> dict[str, Any]:
    result = probe_backends(run, slices, runs)
    record = {**result, "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _write_choice(cache_dir, key, record)
    return {**record, "cached": False}


def _probe(choice: dict[str, Any]) -> dict[str, Any]:
    return {k: choice[k] for k in ("seconds_per_slice", "errors", "cached", "when", "reason") if k in choice}


class AutoImageEncoder:
    """The ``auto`` image-encoder backend of :class:`InContextSAM2` (chooses on first use; see the module).

    Args:
        name: ``"auto"``.
        cache_dir: where probe results and exported encoders are kept (default
            :func:`~model_core.modeling.encoders.default_cache_dir`).
        threads: CPU threads of the exported runtimes (default torch's).
        runs: timed runs per candidate.
        remeasure: probe even where a result is cached (and replace it), e.g. on a quiet machine.

    :meth:`resolve` chooses now (a server calls it at start-up); it chooses again when the
    network's device, precision, batch or image size changes.
    """

    def __init__(
        self,
        name: str = "auto",
        cache_dir: str | None = None,
        threads: int | None = None,
        runs: int = 3,
        remeasure: bool = False,
    ):
        if check_encoder_backend(name) != "auto":
            raise ValueError(f"AutoImageEncoder is the 'auto' backend, not {name!r}.")
        self.name = "auto"
        self.cache_dir = os.path.abspath(cache_dir or default_cache_dir())
        self.threads = threads
        self.runs = int(runs)
        self.remeasure = bool(remeasure)
        self._key: tuple | None = None
        self.chosen: Any = None
        self.choice: dict[str, Any] = {}

    def resolve(self, network) -> Any:
        """The backend chosen for ``network`` as it is now (probing, or reading the cached result)."""
        key = (network.device.type, network.compute_precision, network.encoder_batch_size, network.image_size)
        if key == self._key and self.chosen is not None:
            return self.chosen
        if network.device.type != "cpu":
            self.chosen = TorchImageEncoder("torch")
            self.choice = {"chosen": "torch", "reason": f"{network.device.type}: the network's own modules"}
        else:
            # not OpenVINO: in bf16 its CPU plugin (2026.4) moves the trained tiny model's lowest FPN level by up to
            # 0.17 and its masks (tests/model_core/test_encoders.py); in f32 it agrees, but on CPUs with native bf16
            # (where ``auto`` computes in bf16) torch's bf16 is faster (Hiera-tiny at 512: 158 against 255 ms on an
            # Intel Xeon with AMX) and its first compile at 512 px takes about 27 s. By name it runs.
            candidates = cpu_candidates(network.compute_precision, openvino=False)
            backends = {
                n: build_encoder_backend(
                    n, cache_dir=self.cache_dir, **({} if n == "torch" else {"threads": self.threads})
                )
                for n in candidates
            }
            batch = network.encoder_batch_size
            size = network.image_size
            pixels = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) - 0.45) / 0.23
            run = {n: (lambda b=b: b.encode(network, pixels)) for n, b in backends.items()}
            machine = _machine_key(
                model="sam2",
                preset=getattr(network, "preset", "custom"),
                image_size=size,
                hidden_dim=network.hidden_dim,
                encoder_parameters=sum(p.numel() for p in network.image_encoder.parameters()),
                batch=batch,
                precision=network.compute_precision,
                candidates=candidates,
            )
            self.choice = _choose(self.cache_dir, machine, run, batch, self.runs, self.remeasure)
            self.chosen = backends[self.choice["chosen"]]
        self._key = key
        return self.chosen

    def encode(self, network, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.resolve(network).encode(network, pixels)

    def describe(self) -> dict[str, Any]:
        """``{"name": "auto", "chosen": ...}`` with the chosen backend's details and the probe's times, once chosen."""
        if self.chosen is None:
            return {"name": "auto", "chosen": None, "note": "chosen at the first encode"}
        return {
            "name": "auto",
            "chosen": self.choice["chosen"],
            "backend": self.chosen.describe(),
            **_probe(self.choice),
        }


def lite_medsam_backend(
    encoder_backend: str = "torch",
    network: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
    threads: int | None = None,
    batch_size: int = 1,
    checkpoint: str | None = None,
    remeasure: bool = False,
) -> Any:
    """A :class:`~model_core.medsam_lite.backends.LiteMedSAMBackend` by ``encoder_backend`` name.

    Args:
        encoder_backend: ``torch`` (``precision``), ``torch-bf16``, ``onnxruntime``, ``openvino``,
            ``openvino-bf16`` or ``auto`` (torch on a GPU; on a CPU the fastest candidate for
            ``precision``, measured once per machine and cached in ``cache_dir``).
        network: a ``MedSAMLite`` (default: :func:`~model_core.medsam_lite.backends.load_package_network`
            of ``checkpoint``).
        device, precision: where and how the torch backend runs (the exported ones run on the CPU).
        cache_dir, threads: see :class:`~model_core.export.encoders.ExportedEncoder`.
        batch_size: slices per encoder call of the exported backends (their static batch).
        remeasure: with ``auto``, probe even where a result is cached (and replace it).

    Returns:
        The backend; with ``auto`` a :class:`ChosenLiteMedSAMBackend`.

    Raises:
        ValueError: an unknown name, or an exported backend on a non-CPU device.
    """
    name = check_encoder_backend(encoder_backend)
    network = load_package_network(checkpoint) if network is None else network
    dev = torch.device(device)
    resolved = resolve_precision(precision, dev)

    def build(n: str) -> Any:
        if n in ("torch", "torch-bf16"):
            return TorchBackend(network, device=dev, precision="bf16" if n == "torch-bf16" else resolved)
        if dev.type != "cpu":
            raise ValueError(f"encoder_backend {n!r} runs on the CPU, not {dev}; use torch or auto on a GPU.")
        return ExportedLiteMedSAMBackend(network, n, cache_dir=cache_dir, threads=threads, batch_size=batch_size)

    if name != "auto":
        return build(name)
    if dev.type != "cpu":
        return ChosenLiteMedSAMBackend(build("torch"), {"chosen": "torch", "reason": f"{dev.type}: torch"})
    cache = os.path.abspath(cache_dir or default_cache_dir())
    candidates = cpu_candidates(resolved)
    backends = {n: build(n) for n in candidates}
    images = torch.rand(batch_size, 3, MODEL_SIZE, MODEL_SIZE, generator=torch.Generator().manual_seed(0))
    run = {n: (lambda b=b: b.encode(images)) for n, b in backends.items()}
    key = _machine_key(model="medsam_lite", batch=int(batch_size), precision=resolved, candidates=candidates)
    choice = _choose(cache, key, run, int(batch_size), 3, remeasure)
    return ChosenLiteMedSAMBackend(backends[choice["chosen"]], choice)


class ChosenLiteMedSAMBackend:
    """The LiteMedSAM backend ``auto`` chose, with the probe's record (``describe()`` reports both).

    Args:
        backend: the chosen :class:`~model_core.medsam_lite.backends.LiteMedSAMBackend`.
        choice: what :func:`probe_backends` returned (or the cached record).
    """

    def __init__(self, backend: Any, choice: dict[str, Any]):
        self.backend = backend
        self.choice = choice
        self.device = backend.device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend.encode(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.decode(embeddings, boxes)

    def describe(self) -> dict[str, Any]:
        return {
            "name": "auto",
            "chosen": self.choice["chosen"],
            "backend": self.backend.describe(),
            **_probe(self.choice),
        }


def lite_medsam(
    encoder_backend: str = "torch",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    checkpoint: str | None = None,
    cache_dir: str | None = None,
    encoder_batch_size: int = 1,
    threads: int | None = None,
    warm_up: bool = True,
) -> LiteMedSAM:
    """LiteMedSAM (shipped or ``checkpoint`` weights) with its image encoder on ``encoder_backend``.

    Args:
        encoder_backend, device, precision, cache_dir, threads: see :func:`lite_medsam_backend`.
        encoder_batch_size: slices per encoder call (:class:`~model_core.medsam_lite.model.LiteMedSAM`).
        warm_up: encode one blank batch now, so that the first real slice pays no export or compilation.
    """
    backend = lite_medsam_backend(
        encoder_backend,
        device=device,
        precision=precision,
        cache_dir=cache_dir,
        threads=threads,
        batch_size=encoder_batch_size,
        checkpoint=checkpoint,
    )
    model = LiteMedSAM(backend, encoder_batch_size=encoder_batch_size)
    if warm_up:
        with torch.inference_mode():
            backend.encode(torch.zeros(model.encoder_batch_size, 3, MODEL_SIZE, MODEL_SIZE))
    return model
