"""Numerical precision of the network: ``fp32`` (bit-faithful to SAM2) or ``bf16`` autocast.

``precision`` is chosen by the caller (bundle config, app ``--conf``, benchmark flag) as
one of :data:`PRECISIONS`:

- ``"fp32"``: everything in float32, exactly what Meta's SAM2 computes on CPU (the
  equivalence tests run with it).
- ``"bf16"``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the
  network's own compute (image encoder, memory attention, mask decoder, memory
  encoder), as SAM2 runs on CUDA. What the network returns to callers stays float32.
- ``"auto"``: ``bf16`` where the hardware computes bfloat16 natively (CUDA devices that
  support it; CPUs with AMX-BF16 or AVX512-BF16), ``fp32`` elsewhere. On a CPU without
  those instructions bfloat16 matmuls are emulated and usually slower than float32.

Nothing here runs at import time; the CPU probe runs once, on first use, and is cached.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from typing import Any, ContextManager

import torch

__all__ = ["PRECISIONS", "autocast", "bf16_supported", "cpu_bf16_capability", "flush_denormals", "resolve_precision"]

#: accepted values of every ``precision`` option
PRECISIONS = ("auto", "fp32", "bf16")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags the Linux kernel reports, or None where there is no /proc/cpuinfo."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


@functools.lru_cache(maxsize=1)
def cpu_bf16_capability() -> dict[str, Any]:
    """Whether this CPU computes bfloat16 natively (probed once, then cached).

    Reads the kernel's flags in ``/proc/cpuinfo`` (``amx_bf16``, ``avx512_bf16``) and,
    where the running torch exposes them, its own CPU probes (``torch.cpu._is_amx_tile_supported``,
    ``torch.cpu._is_avx512_bf16_supported``; private, so used only when present).

    Returns:
        ``{"amx_bf16": bool, "avx512_bf16": bool, "bf16": bool, "source": str,
        "torch_cpu_capability": str, "processor": str}`` where ``bf16`` is True when either
        instruction set is present (what ``precision="auto"`` uses on CPU).
    """
    flags = _cpuinfo_flags()
    amx = avx512 = False
    sources = []
    if flags is not None:
        amx, avx512 = "amx_bf16" in flags, "avx512_bf16" in flags
        sources.append("/proc/cpuinfo")
    probes = {
        "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None),
        "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    }
    if any(p is not None for p in probes.values()):
        sources.append("torch.cpu")
        try:
            amx = amx or bool(probes["amx_bf16"] and probes["amx_bf16"]())
            avx512 = avx512 or bool(probes["avx512_bf16"] and probes["avx512_bf16"]())
        except Exception:  # a private probe that changed: the kernel's flags still count
            pass
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        capability = "unknown"
    return {
        "amx_bf16": amx,
        "avx512_bf16": avx512,
        "bf16": amx or avx512,
        "source": " + ".join(sources) or "none",
        "torch_cpu_capability": capability,
        "processor": _processor_name() or platform.processor() or platform.machine(),
    }


def _processor_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def bf16_supported(device: str | torch.device) -> bool:
    """True where bfloat16 autocast runs natively on ``device`` (``cpu``, ``cuda``, ``cuda:1``...)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return bool(cpu_bf16_capability()["bf16"])
    return False


def resolve_precision(precision: str | None, device: str | torch.device = "cpu") -> str:
    """A concrete precision (``"fp32"`` or ``"bf16"``) for ``device``.

    Args:
        precision: one of :data:`PRECISIONS` (None means ``"auto"``). ``"bf16"`` is honoured
            on any CPU or CUDA device when asked for (slower where it is emulated).
        device: where the network runs.

    Raises:
        ValueError: an unknown value (the message lists the accepted ones), or ``"bf16"`` on
            a device type without bfloat16 autocast.
    """
    value = "auto" if precision is None else str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {precision!r}.")
    dev = torch.device(device)
    if value == "auto":
        return "bf16" if bf16_supported(dev) else "fp32"
    if value == "bf16" and dev.type not in ("cpu", "cuda"):
        raise ValueError(f"precision 'bf16' is supported on cpu and cuda devices, not {dev.type!r}; use 'fp32'.")
    return value


def autocast(precision: str, device: str | torch.device) -> ContextManager:
    """The context the network computes in: bfloat16 autocast for ``"bf16"``, nothing for ``"fp32"``.

    Args:
        precision: a resolved precision (``"fp32"`` or ``"bf16"``; ``"auto"`` is resolved for ``device``).
        device: the network's device (its type picks the autocast backend).
    """
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def flush_denormals(device: str | torch.device) -> bool:
    """Treat float32 denormals as zero in this process's CPU arithmetic (``torch.set_flush_denormal``).

    Training drives some weights, optimizer moments and activations into the denormal range
    (below about 1e-38), where x86 arithmetic is many times slower; values that small change no
    result. Measured on a 2-core AMD EPYC, tiny preset at 96 px, one thread: a training step from
    the main job's trained weights took 0.37 s, 0.297 s with denormals flushed (untrained 0.324 s).
    Only on CPU devices, and only where the CPU supports it (x86 with SSE3). The setting is per thread:
    it holds for the calling thread and the threads it starts later, not for torch's intra-op threads
    already started (measured: with 2 threads, half of a large product stayed denormal). The main job's
    training processes have one thread each, so it holds for all their arithmetic.

    Returns:
        Whether flushing is on.
    """
    if torch.device(device).type != "cpu":
        return False
    return bool(torch.set_flush_denormal(True))
