"""Checkpoint objects and resumption for the bundle's Ignite engines.

MONAI's ``CheckpointSaver`` saves objects with ``state_dict()``; these give it what an
ICL-SAM2 checkpoint holds (the architecture record beside the weights, merged LoRA weights
for ``model.pt``, adapters for ``model_lora.pt``), save atomically, and resume a run from
its latest checkpoint. State-dict I/O itself is :mod:`model_core.modeling.checkpoint`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from monai.handlers import CheckpointLoader, CheckpointSaver

from model_core.training.lora import (
    adapter_state,
    load_adapter_state,
    merged_state_dict,
)

__all__ = [
    "AdapterCheckpoint",
    "ArchitectureRecord",
    "MergedWeights",
    "TrainingCheckpointSaver",
    "find_resume_checkpoint",
    "resume_training",
]


class ArchitectureRecord:
    """How a model was trained, saved beside its weights as ``icl_sam2`` by MONAI's ``CheckpointSaver``.

    The saver stores ``obj.state_dict()`` of everything in its ``save_dict``; this object
    makes the training config one of them, so every checkpoint the bundle writes says
    which preset, image size, classes and intensity settings its weights belong to, and
    a server can serve that architecture instead of guessing. Loading it restores nothing
    (the config being run is the truth).

    Args:
        preset, image_size, classes, modality, window, percentiles, channel_mode: the training config.
    """

    def __init__(
        self,
        preset: str,
        image_size: int,
        classes: Any = None,
        modality: str | None = None,
        window: Any = None,
        percentiles: Any = None,
        channel_mode: str | None = None,
    ):
        self.record = {
            "preset": str(preset),
            "image_size": int(image_size),
            "classes": [int(c) for c in classes] if classes is not None else None,
            "modality": modality,
            "window": [float(v) for v in window] if window is not None else None,
            "percentiles": [float(v) for v in percentiles] if percentiles is not None else None,
            "channel_mode": channel_mode,
        }

    def state_dict(self) -> dict[str, Any]:
        return dict(self.record)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the record describes the config, which the running config already is."""


class TrainingCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` that also saves the trainer it is attached to (epoch, iteration).

    A bundle config cannot name the trainer inside the save_dict of one of the
    trainer's own handlers (a circular reference), so the trainer is added when the
    handler is attached. Everything else is ``CheckpointSaver``'s, including saving
    ``final_filename`` when training ends by an exception or an interruption.

    Args:
        save_dir, save_dict, **kwargs: as for ``CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict[str, Any], **kwargs: Any):
        self._deferred = (save_dir, dict(save_dict), kwargs)

    def attach(self, engine) -> None:
        save_dir, save_dict, kwargs = self._deferred
        super().__init__(save_dir, {**save_dict, "trainer": engine}, **kwargs)
        super().attach(engine)


def find_resume_checkpoint(ckpt_dir: str, prefixes: tuple[str, ...] = ("latest_", "model_final")) -> str:
    """The newest training checkpoint in ``ckpt_dir`` that holds a trainer state.

    The bundle writes ``latest_checkpoint_epoch=N.pt`` after every epoch and
    ``model_final.pt`` when a run ends, also when it ends by an exception or an
    interruption, so the newest of them is where training stopped.

    Raises:
        ValueError: no such checkpoint.
    """
    candidates = []
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            path = os.path.join(ckpt_dir, name)
            if name.startswith(prefixes) and name.endswith(".pt") and os.path.isfile(path):
                candidates.append((os.path.getmtime(path), path))
    for _, path in sorted(candidates, reverse=True):
        try:
            if "trainer" in torch.load(path, map_location="cpu", weights_only=True):
                return path
        except Exception:
            continue
    raise ValueError(
        f"Nothing to resume from: {ckpt_dir!r} holds no training checkpoint (latest_*.pt or model_final.pt "
        "with a trainer state). Start without resume, or point ckpt_dir at the interrupted run's folder."
    )


def resume_training(
    trainer,
    objects: dict[str, Any],
    ckpt_dir: str,
    best_saver=None,
    best_file: str = "model.pt",
    map_location: Any = None,
) -> str:
    """Continue an interrupted bundle run where it stopped.

    Restores, when the trainer starts, the weights, optimizer, LR schedule, engine
    counters (epoch, iteration) and the episode and prompt random streams from the
    newest training checkpoint (MONAI's ``CheckpointLoader``), and now, the best-Dice
    saver's record, so the next validation compares against the best score so far
    instead of overwriting ``model.pt`` with a worse model.

    Args:
        trainer: the Ignite trainer.
        objects: what the training checkpoint holds besides the trainer (``{"model": ..., "optimizer": ...}``).
        ckpt_dir: the run's checkpoint folder.
        best_saver: the key-metric ``CheckpointSaver`` (saved with ``key_metric_save_state``).
        best_file: its file name in ``ckpt_dir``.
        map_location: device to load tensors onto.

    Returns:
        The checkpoint resumed from.
    """

    path = find_resume_checkpoint(ckpt_dir)
    CheckpointLoader(load_path=path, load_dict={**objects, "trainer": trainer}, map_location=map_location).attach(
        trainer
    )
    best = os.path.join(ckpt_dir, best_file)
    if best_saver is not None and os.path.isfile(best):
        record = torch.load(best, map_location="cpu", weights_only=True)
        if "checkpointer" in record:
            best_saver.load_state_dict(record["checkpointer"])
    return path


class MergedWeights:
    """The network's weights as served, for MONAI's ``CheckpointSaver``: adapters merged, a plain state dict.

    The bundle's best-Dice ``model.pt`` saves this in place of the network, so evaluation,
    inference and the app load it as any checkpoint, with or without LoRA in training.
    """

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        return merged_state_dict(self.network)


class AdapterCheckpoint:
    """The network's LoRA adapters for MONAI's ``CheckpointSaver`` (``model_lora.pt`` beside ``model.pt``).

    ``state_dict`` is :func:`adapter_state`; ``load_state_dict`` puts one back onto the network.
    """

    def __init__(self, network: torch.nn.Module):
        self.network = network

    def state_dict(self) -> dict[str, Any]:
        return adapter_state(self.network)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter_state(self.network, state)
