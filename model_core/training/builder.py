"""Build the in-context network to train: a preset, what trains (the freezing matrix) and LoRA adapters.

The inference builder (:func:`model_core.modeling.presets.build_icl_sam2`) knows nothing of
training, as nothing under sam2's ``sam2/`` imports its ``training/``; this builder asks it for
the training subclass (:class:`~model_core.training.network.InContextSAM2Train`, as sam2's
training YAML names ``SAM2Train``), then attaches peft's LoRA adapters and chooses what trains.
The bundle's ``train.json`` names this function as its ``network_def``; evaluation and
inference layer ``build_icl_sam2`` over it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from model_core.modeling.presets import build_icl_sam2
from model_core.training.lora import attach_lora
from model_core.training.network import InContextSAM2Train
from model_core.training.trainable import resolve_trainable

__all__ = ["TRAIN_TARGET", "build_training_network"]

#: The class a training network is built as.
TRAIN_TARGET = f"{InContextSAM2Train.__module__}.{InContextSAM2Train.__qualname__}"


def build_training_network(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int | None = None,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    trainable: str | Sequence[str] = "frozen",
    precision: str = "fp32",
    lora_rank: int = 0,
    lora_targets: str | Sequence[str] = ("image_encoder.attn",),
    lora_alpha: float | None = None,
    **model_kwargs: Any,
) -> InContextSAM2Train:
    """Build an :class:`~model_core.training.network.InContextSAM2Train` in train mode.

    Args:
        preset, image_size, checkpoint, device, precision, model_kwargs: as for
            :func:`~model_core.modeling.presets.build_icl_sam2` (the checkpoint is loaded before
            adapters are attached: it is the base they adapt).
        trainable: the freezing matrix: an alias ``frozen`` (default: everything but the image
            encoder, as in MedSAM), ``neck``, ``all``, ``none`` or a list of groups such as
            ``["mask_decoder", "memory_attention"]``
            (:func:`~model_core.training.trainable.resolve_trainable`).
        lora_rank: LoRA rank; 0 (default) builds no adapters. Above 0, peft's LoRA adapters are
            attached (:func:`~model_core.training.lora.attach_lora`); they train whatever
            ``trainable`` says of the base weights.
        lora_targets: LoRA target groups of :data:`~model_core.training.lora.LORA_TARGETS`
            (default Hiera's attention projections).
        lora_alpha: LoRA alpha (default ``lora_rank``: scaling 1).

    Raises:
        ValueError: an unknown trainable group, a bad LoRA rank or target, or a bad precision,
            before the model is built.
    """
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an integer >= 0 (0: no LoRA), got {lora_rank!r}.")
    resolve_trainable(trainable)  # a bad name fails before the model is built
    model = build_icl_sam2(preset, image_size, checkpoint, device, precision, model_class=TRAIN_TARGET, **model_kwargs)
    if lora_rank > 0:
        attach_lora(model, lora_rank, lora_targets, lora_alpha, base_checkpoint=checkpoint)
    model.set_trainable(trainable)
    return model.train()
