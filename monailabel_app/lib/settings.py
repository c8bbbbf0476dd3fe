"""The app's ``--conf`` options, parsed once (MONAI Label passes them as strings)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from model_core.service import ServiceConfig

#: option: (default, meaning) — also shown in /info
OPTIONS: dict[str, tuple[Any, str]] = {
    "bundle": (None, "the MONAI bundle folder (default: the repository's bundle/)"),
    "preset": ("sam2.1_hiera_tiny", "network preset (model_core.presets)"),
    "image_size": (512, "model input size (a multiple of 32)"),
    "checkpoint": (None, "weights; training publishes here (default: <bundle>/models/model.pt)"),
    "device": (None, "cpu or cuda (default: cuda when available)"),
    "labels": ('{"kidney": 1}', "JSON {name: label value} of the structures to segment"),
    "modality": ("CT", "CT (HU window) or MRI (percentiles)"),
    "window": ("[-200, 300]", "CT window in HU"),
    "percentiles": ("[0.5, 99.5]", "MRI percentiles"),
    "channel_mode": ("replicate", "replicate or 2.5d, as the model was trained"),
    "max_support_volumes": (4, "labelled volumes used as the support set (most recently labelled first)"),
    "num_support_slices": (3, "support slices per structure"),
    "session_cache_mb": (2048, "memory cap of the interactive sessions' image features (MiB)"),
    "max_sessions": (8, "interactive sessions kept (client x image)"),
}


def _json(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--conf {name} must be JSON, got {value!r}: {e}") from e


def service_config(conf: dict[str, str], app_dir: str) -> ServiceConfig:
    """A :class:`ServiceConfig` from MONAI Label's ``--conf`` strings, with clear errors for bad values."""
    get = lambda k: conf.get(k, OPTIONS[k][0])  # noqa: E731
    bundle = os.path.abspath(get("bundle") or os.path.join(app_dir, "..", "bundle"))
    if not os.path.isfile(os.path.join(bundle, "configs", "inference.json")):
        raise ValueError(f"--conf bundle {bundle!r} is not the ICL-SAM2 bundle (no configs/inference.json).")
    labels = _json("labels", get("labels"))
    if not isinstance(labels, dict) or not labels or not all(isinstance(v, int) and v > 0 for v in labels.values()):
        raise ValueError(f"--conf labels must be a JSON object of positive label values, e.g. '{{\"kidney\": 1}}', got {labels!r}.")
    device = get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--conf device cuda, but no CUDA device is available; use --conf device cpu.")
    return ServiceConfig(
        bundle_dir=bundle,
        labels={str(k): int(v) for k, v in labels.items()},
        checkpoint=os.path.abspath(get("checkpoint") or os.path.join(bundle, "models", "model.pt")),
        preset=str(get("preset")),
        image_size=int(get("image_size")),
        device=device,
        modality=str(get("modality")),
        window=[float(v) for v in _json("window", get("window"))],
        percentiles=[float(v) for v in _json("percentiles", get("percentiles"))],
        channel_mode=str(get("channel_mode")),
        max_support_volumes=int(get("max_support_volumes")),
        num_support_slices=int(get("num_support_slices")),
        session_cache_mb=float(get("session_cache_mb")),
        max_sessions=int(get("max_sessions")),
    )
