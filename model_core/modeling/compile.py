"""``compile``: the network's components under ``torch.compile``, as sam2's ``vos_optimized=True`` compiles them.

``sam2.build_sam.build_sam2_video_predictor(..., vos_optimized=True)`` builds
``SAM2VideoPredictorVOS``, which compiles the forward functions (not the modules, so
checkpoints still load) of the image encoder (``fullgraph``, static shapes), the memory
encoder (static), memory attention (dynamic: the number of memories varies), the prompt
encoder and the mask decoder (static), all in ``max-autotune`` mode (Triton autotuning and
CUDA graphs), and clones what those functions return, because a CUDA graph's outputs are
overwritten by its next replay. :func:`compile_network` does the same to an
:class:`~model_core.modeling.network.InContextSAM2`: the same five forwards, the same
``fullgraph``/``dynamic`` settings, outputs cloned by a wrapper (sam2 clones inside copies of
three of its methods; a wrapper around each compiled forward clones the same tensors without
copying them). The image encoder sees one shape: with ``compile`` on, a batch shorter than
``encoder_batch_size`` is padded to it (:class:`~model_core.modeling.encoders.TorchImageEncoder`).

Why not sam2's class itself: ``SAM2VideoPredictorVOS`` is a video predictor (JPEG frames,
per-object state), and its ``_compile_all_components`` fixes ``max-autotune``, which on a CPU
(and in tests) takes minutes; here the mode and the ``torch.compile`` backend are parameters.

Modes (:data:`COMPILE_MODES`): ``off`` (eager, the default), ``default``, ``reduce-overhead``,
``max-autotune`` (sam2's). Compilation happens on the first call of each shape, so the first
volume is slow; the benchmark's warm-up run pays it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["COMPILE_MODES", "check_compile_mode", "compile_network"]

#: accepted values of every ``compile`` option
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

#: component -> torch.compile's ``dynamic``, as SAM2VideoPredictorVOS (image encoder: SAM2Base's compile_image_encoder)
_COMPONENTS = {
    "image_encoder": False,
    "memory_encoder": False,
    "memory_attention": True,
    "sam_prompt_encoder": False,
    "sam_mask_decoder": False,
}


def check_compile_mode(mode: Any, field: str = "compile") -> str:
    """``mode`` normalised (None and False: ``off``, True: ``max-autotune``), or a ValueError naming ``field``."""
    if mode is None or mode is False:
        return "off"
    if mode is True:
        return "max-autotune"
    value = str(mode).strip().lower().replace("_", "-")
    if value in ("false", "none", "0"):
        value = "off"
    if value not in COMPILE_MODES:
        raise ValueError(f"{field} must be one of {', '.join(COMPILE_MODES)}, got {mode!r}.")
    return value


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _cloning(fn: Callable) -> Callable:
    """``fn`` whose tensor outputs are cloned (a CUDA graph's outputs are overwritten by its next replay)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _cloned(fn(*args, **kwargs))

    return call


def compile_network(network, mode: str = "max-autotune", backend: str = "inductor"):
    """Compile ``network``'s image encoder and tracking-step modules in place (see the module docstring).

    Args:
        network: an :class:`~model_core.modeling.network.InContextSAM2`, on its final device, eval mode.
        mode: one of :data:`COMPILE_MODES` (``off`` does nothing).
        backend: ``torch.compile``'s backend (``inductor``; ``eager`` or ``aot_eager`` check the
            graphs without generating code, which is what the CPU tests use).

    Returns:
        ``network`` (its ``compiled`` attribute set to ``mode``).

    Raises:
        ValueError: an unknown mode, or a network compiled already in another mode.
    """
    mode = check_compile_mode(mode)
    current = getattr(network, "compiled", "off")
    if mode == "off" or current == mode:
        return network
    if current != "off":
        raise ValueError(f"The network is compiled already ({current!r}); build a new one to compile it as {mode!r}.")
    options: dict[str, Any] = {"fullgraph": True, "backend": backend}
    if mode != "default" and backend == "inductor":  # the modes are inductor's
        options["mode"] = mode
    for name, dynamic in _COMPONENTS.items():
        module = getattr(network, name)
        module.forward = _cloning(torch.compile(module.forward, dynamic=dynamic, **options))
    network.compiled = mode
    return network
