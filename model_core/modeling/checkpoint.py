"""State-dict I/O: loading official SAM2/SAM2.1, MedSAM2, Medical-SAM2 and our own checkpoints, saving ours.

(The Ignite side, saving during training and resuming, is :mod:`model_core.workflows.checkpointing`.)

Formats seen in the wild (all hold sam2's own parameter names):

- Meta SAM2 / SAM2.1 and bowang-lab MedSAM2: ``{"model": state_dict}``.
- Medical-SAM2's ``MedSAM2_pretrain.pth``: ``{"model": state_dict}`` or a bare
  state dict, sometimes saved from DataParallel/DDP (``module.`` prefixes).
- ICL-SAM2 training checkpoints: ``{"model": state_dict, "icl_sam2": {...}}``
  (preset, image size), or the bundle's ``{"network": state_dict, ...}`` from
  MONAI's CheckpointSaver.

Loading is strict: a mismatch raises a ValueError that names the missing and
unexpected keys and the shapes that differ, so a checkpoint of another
architecture is rejected at the boundary instead of half-loading. sam2's own
``_load_checkpoint`` logs the keys and raises a bare RuntimeError, and knows only
the first format.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from model_core.io.files import atomic_path

__all__ = [
    "ARCHITECTURE_KEYS",
    "checkpoint_record",
    "load_checkpoint",
    "read_state_dict",
    "save_checkpoint",
    "write_checkpoint",
]

# : what a checkpoint says about how it was trained (its ``icl_sam2`` record); preset and image size fix the weights'
# shapes
ARCHITECTURE_KEYS = ("preset", "image_size", "classes", "modality", "window", "percentiles", "channel_mode")

_CONTAINER_KEYS = ("model", "network", "state_dict", "net")


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file and return ``(state_dict, metadata)``.

    Raises:
        ValueError: the file is missing, unreadable or holds no state dict.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Checkpoint {path!r} does not exist; download it with scripts/download_checkpoints.sh.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Cannot read checkpoint {path!r}: {e}") from e
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        for key in _CONTAINER_KEYS:
            if isinstance(data.get(key), dict):
                meta = data.get("icl_sam2", {}) or {}
                data = data[key]
                break
    if isinstance(data, dict) and not isinstance(data.get("checkpointer", torch.empty(0)), torch.Tensor):
        # Ignite's Checkpoint with include_self (MONAI's key_metric_save_state) stores its record in the same dict
        data = {k: v for k, v in data.items() if k != "checkpointer"}
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path!r} holds no model state dict (expected {{'model': state_dict}} or a state dict).")
    if all(k.startswith("module.") for k in data):  # saved from DataParallel / DDP
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data, meta


def load_checkpoint(model: torch.nn.Module, path: str) -> dict[str, Any]:
    """Load a checkpoint into ``model`` strictly; returns its ICL-SAM2 metadata (may be empty).

    Raises:
        ValueError: on missing/unexpected keys or shape mismatches, naming them.
    """
    state, meta = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def head(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        hint = f" It was saved for preset {meta.get('preset')!r}." if meta.get("preset") else ""
        if any(".lora_A." in k or ".base_layer." in k for k in unexpected):
            hint += (
                " It holds LoRA adapters (a training checkpoint of a run with lora_rank > 0): load the merged "
                "model.pt of that run, or merge with model_core.training.lora.merge_adapter_file."
            )
        raise ValueError(
            f"Checkpoint {path!r} does not match this model (preset {getattr(model, 'preset', '?')!r}, "
            f"image size {getattr(model, 'image_size', '?')}).{hint} "
            f"Missing keys: [{head(missing)}]. Unexpected keys: [{head(unexpected)}]. "
            f"Shape mismatches: [{head(shapes)}]. Pick the preset the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=True)
    return meta


def write_checkpoint(
    state: dict[str, torch.Tensor], path: str | os.PathLike, record: dict[str, Any], **extra: Any
) -> None:
    """Write ``{"model": state, "icl_sam2": record, **extra}`` atomically (:func:`model_core.io.files.atomic_path`).

    A reader (a server loading the checkpoint it serves) sees the old file or the new one, never half of one.

    Args:
        state: the network's state dict.
        path: the checkpoint file; its folder is created if missing.
        record: the architecture record (preset, image size, classes, intensity settings...).
        extra: more top-level entries (e.g. optimizer state).
    """
    with atomic_path(path) as tmp:
        torch.save({"model": state, "icl_sam2": record, **extra}, tmp)


def save_checkpoint(model: torch.nn.Module, path: str, record: dict[str, Any] | None = None, **extra: Any) -> None:
    """Save ``{"model": state_dict, "icl_sam2": {...}}`` atomically (see :func:`write_checkpoint`).

    Args:
        record: more of the architecture record (classes, intensity settings); preset
            and image size are read from the model.
    """
    meta = {
        **(record or {}),
        "preset": getattr(model, "preset", None),
        "image_size": getattr(model, "image_size", None),
    }
    write_checkpoint(model.state_dict(), path, meta, **extra)


def checkpoint_record(path: str) -> dict[str, Any]:
    """The ``icl_sam2`` record of a checkpoint (empty for official SAM2 files, which carry none).

    Raises:
        ValueError: the file is missing or holds no model state dict.
    """
    return read_state_dict(path)[1]
