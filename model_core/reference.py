"""Meta's ``SAM2VideoPredictor``, as ``build_sam2_video_predictor`` builds it, on the same tensors as ours.

Used by the equivalence tests and ``scripts/benchmark_icl.py`` to prove that
model_core's :class:`~model_core.predictor.VolumePredictor` with the ``recent`` policy
computes what a SAM2 user gets. The reference is made by Meta's own builder from the
preset's YAML as sam2 ships it (our additions left out), so the builder's
post-processing defaults are part of what is compared. The predictor only
reads videos from JPEG folders or MP4 files; :func:`init_reference_state` hands it
an in-memory tensor instead, by calling its own ``init_state`` with sam2's frame
loader swapped for the duration of the call.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence
from unittest import mock

import torch
from hydra.core.config_store import ConfigStore
from sam2.build_sam import build_sam2_video_predictor

from model_core.modeling.network import IMAGENET_MEAN, IMAGENET_STD, InContextSAM2
from model_core.modeling.presets import preset_config

__all__ = ["build_reference_predictor", "init_reference_state", "reference_in_context", "reference_interactive"]


def build_reference_predictor(model: InContextSAM2, vos_optimized: bool = False, compile_backend: str = "inductor"):
    """``sam2.build_sam.build_sam2_video_predictor`` for ``model``'s preset, with its weights (eval mode, same device).

    The config handed to Meta's builder is the preset's YAML as sam2 ships it, at the
    model's image size (registered in Hydra's config store, so the builder's own
    ``compose`` reads it). One setting is added: ``add_all_frames_to_correct_as_cond=True``,
    since in model_core every slice that receives a prompt becomes a conditioning frame.

    Args:
        model: the network whose preset, size, device and weights the reference gets.
        vos_optimized: Meta's compiled predictor (``SAM2VideoPredictorVOS``: image encoder, memory
            encoder and attention, prompt encoder and mask decoder under ``torch.compile`` in
            ``max-autotune`` mode), as the builder's ``vos_optimized=True`` makes it.
        compile_backend: ``torch.compile``'s backend for that predictor. ``inductor`` is sam2's;
            another (``eager``) runs the same compiled code path without generating code, which
            the CPU smoke runs use (sam2 fixes its compile calls, so they are given the backend
            while the predictor is built).
    """

    name = f"icl_sam2_reference_{model.preset}_{model.image_size}".replace(".", "_")
    ConfigStore.instance().store(name=name, node={"model": preset_config(model.preset, model.image_size, False)})
    patch = contextlib.nullcontext()
    if vos_optimized and compile_backend != "inductor":
        patch = mock.patch("torch.compile", functools.partial(torch.compile, backend=compile_backend))
    with patch:
        predictor = build_sam2_video_predictor(
            name,
            ckpt_path=None,
            device=str(model.device),
            mode="eval",
            hydra_overrides_extra=["++model.add_all_frames_to_correct_as_cond=true"],
            vos_optimized=vos_optimized,
        )
    predictor.load_state_dict(model.state_dict(), strict=True)
    return predictor


def init_reference_state(predictor, frames: torch.Tensor) -> dict[str, Any]:
    """``predictor.init_state`` on ``(N, 3, H, W)`` frames in [0, 1] at the model size."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalized = (frames.float().cpu() - mean) / std
    size = frames.shape[-1]

    def load_video_frames(**_: Any):
        return normalized.to(predictor.device), size, size

    with mock.patch("sam2.sam2_video_predictor.load_video_frames", load_video_frames):
        return predictor.init_state(video_path="<tensor>")


@torch.inference_mode()
def reference_in_context(
    predictor, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
) -> torch.Tensor:
    """Support slices via ``add_new_mask``, query slices via ``propagate_in_video``.

    Args:
        support_images: ``(S, 3, H, W)``; support_masks: ``(S, K, H, W)`` bool;
        query_images: ``(D, 3, H, W)``.

    Returns:
        ``(K, D, H, W)`` mask logits of the query slices.
    """
    S, K = support_masks.shape[:2]
    state = init_reference_state(predictor, torch.cat([support_images, query_images]))
    for s in range(S):
        for k in range(K):
            predictor.add_new_mask(state, frame_idx=s, obj_id=k, mask=support_masks[s, k])
    out = torch.zeros(K, query_images.shape[0], *query_images.shape[-2:])
    for frame_idx, _, logits in predictor.propagate_in_video(state):
        if frame_idx >= S:
            out[:, frame_idx - S] = logits[:, 0].cpu()
    return out


@torch.inference_mode()
def reference_interactive(
    predictor, images: torch.Tensor, rounds: Sequence[tuple[Sequence[tuple[int, int, dict[str, Any]]], int]]
) -> torch.Tensor:
    """Rounds of prompts, each followed by propagation forward then backward from a start frame.

    Args:
        images: ``(D, 3, H, W)``.
        rounds: ``[(prompts, start_frame)]``; prompts are ``(frame, object, kwargs)``
            with kwargs of ``add_new_points_or_box`` (``points``, ``labels``, ``box``)
            or ``{"mask": (H, W)}``, applied in order.

    Returns:
        ``(K, D, H, W)`` mask logits after the last round.
    """
    state = init_reference_state(predictor, images)
    out = None
    for prompts, start in rounds:
        for frame, obj, kwargs in prompts:
            if "mask" in kwargs:
                predictor.add_new_mask(state, frame_idx=frame, obj_id=obj, mask=kwargs["mask"])
            else:
                predictor.add_new_points_or_box(state, frame_idx=frame, obj_id=obj, **kwargs)
        K = len(state["obj_ids"])
        out = torch.zeros(K, images.shape[0], *images.shape[-2:])
        for reverse in (False, True):
            for frame_idx, _, logits in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                out[:, frame_idx] = logits[:, 0].cpu()
    return out
