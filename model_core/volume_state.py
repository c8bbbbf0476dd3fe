"""The state of one query volume while a :class:`~model_core.predictor.VolumePredictor` segments it.

:class:`VolumeState` holds the slices, the support memory, the slice features (a bounded
cache, encoded on demand) and the per-slice results; :class:`PassGeometry` maps slices to
SAM2 frame indices for a pass in either direction; :class:`VolumePrediction` is what a
whole-volume segmentation returns. sam2's video predictor keeps the same things in its
``inference_state`` dict.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from sam2.modeling.sam2_base import NO_OBJ_SCORE

from model_core.modeling.network import InContextSAM2
from model_core.modeling.prompts import SlicePrompt

__all__ = ["PassGeometry", "VolumePrediction", "VolumeState"]


@dataclass
class VolumePrediction:
    """Result of segmenting a query volume.

    Attributes:
        masks: ``(K, D, H, W)`` bool, per object.
        iou: ``(D, K)`` predicted IoU of each slice's mask (0 where the object is absent).
        object_score_logits: ``(D, K)`` object presence logits.
        logits: ``(K, D, H, W)`` float16 mask logits, when requested.
        object_ids: the K object identifiers.
    """

    masks: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor
    object_ids: list[Any]
    logits: torch.Tensor | None = None

    def confidence(self) -> torch.Tensor:
        """``(K,)`` per-object confidence in [0, 1]: mean predicted IoU x presence over slices where the object is
        predicted.
        """
        present = self.object_score_logits > 0
        score = self.iou * self.object_score_logits.sigmoid()
        num = (score * present).sum(0)
        den = present.sum(0).clamp(min=1)
        return torch.where(present.any(0), num / den, torch.zeros_like(num))

    def label_map(self, label_values: Sequence[int] | None = None) -> torch.Tensor:
        """``(D, H, W)`` int16 label map; overlaps go to the later object. Values default to ``object_ids``."""
        values = list(label_values if label_values is not None else self.object_ids)
        out = torch.zeros(self.masks.shape[1:], dtype=torch.int16)
        for k, v in enumerate(values):
            out[self.masks[k]] = int(v)
        return out


class _SliceFeatures:
    """Image features of a volume's slices: computed in batches, kept in a bounded LRU.

    sam2's predictor caches a single frame; a volume needs batched encoding ahead of
    propagation and, for interactive sessions, a cache sized by the caller.
    """

    def __init__(self, model: InContextSAM2, images: torch.Tensor, capacity: int):
        self.model = model
        self.images = images
        self.capacity = max(int(capacity), 1)
        self.cache: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        # positional encodings depend only on the image size: one copy for all slices
        # (at 512 px they are 21 MB per slice, five times the features themselves)
        self.pos: list[torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Memory held by the cached features (and the shared positional encodings)."""
        tensors = [t for levels in self.cache.values() for t in levels] + list(self.pos or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def shrink(self, max_bytes: int) -> None:
        """Drop least recently used slices until at most ``max_bytes`` are held (at least one slice stays)."""
        while len(self.cache) > 1 and self.nbytes > max_bytes:
            self.cache.popitem(last=False)
        self.capacity = max(min(self.capacity, len(self.cache)), 1)

    def prefetch(self, indices: Sequence[int]) -> None:
        """When ``indices[0]`` (the slice needed now) is not cached, encode it and the next
        uncached ones, up to ``encoder_batch_size``, in one batch."""
        indices = list(indices)
        if not indices or indices[0] in self.cache:
            return
        missing = [i for i in indices if i not in self.cache][: self.model.encoder_batch_size]
        out = self.model.encode_slices(self.images[missing])
        if self.pos is None:
            self.pos = [p[:1].clone() for p in out["vision_pos_enc"]]
        for j, i in enumerate(missing):
            self.cache[i] = [f[j : j + 1] for f in out["backbone_fpn"]]
        while len(self.cache) > max(self.capacity, len(missing)):
            self.cache.popitem(last=False)

    def get(self, i: int, batch_size: int):
        """``(vision_feats, vision_pos_embeds, feat_sizes)`` of slice ``i`` expanded to ``batch_size`` objects."""
        if i not in self.cache:
            self.prefetch([i])
        self.cache.move_to_end(i)
        expanded = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in self.cache[i]],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in self.pos],
        }
        return self.model.slice_features(expanded)


class VolumeState:
    """Everything known about one query volume during in-context and interactive segmentation.

    Built only by :meth:`VolumePredictor.init_state`. Per slice it keeps the compact
    results (low-resolution logits, object pointer, scores). Spatial memories are kept
    only for the few slices next to where a pass started (the ones a pass from there in
    the other direction attends to), and rebuilt from the results when another pass
    needs them, so memory stays ``O(D * (h/4 * w/4))`` and never holds ``D`` image features.

    Attributes:
        images: ``(D, 3, H, W)`` query slices (float in [0, 1] or uint8), on the storage device.
        support: the support memory, or None for prompts only.
        object_ids: K object identifiers.
        prompts: per object, ``{slice: SlicePrompt}``.
        cond_outputs: per object, ``{slice: output}`` of prompted slices (conditioning frames).
        low_res_logits: ``(D, K, 1, H/4, W/4)`` mask logits (NO_OBJ_SCORE where untracked).
        obj_ptr: ``(D, K, C)``; object_score_logits: ``(D, K, 1)``; iou: ``(D, K)``.
        tracked: ``(D, K)`` bool; tracked_reverse: ``(D, K)`` bool, direction of the last pass.
        features: the slice feature cache.
        memories: ``{slice: (K, C, h/16, w/16)}`` spatial memories of every object as tracking encoded
            them, for slices within SAM2's memory window of a pass's start; dropped when the slice's
            result changes (see :meth:`VolumePredictor._memory_entry`).
    """

    def __init__(self, model, images, support, object_ids, feature_cache_slices, storage_device):
        D = images.shape[0]
        K = len(object_ids)
        low = model.image_size // 4
        self.images = images
        self.support = support
        self.object_ids = list(object_ids)
        self.num_slices, self.num_objects = D, K
        self.prompts: list[dict[int, SlicePrompt]] = [{} for _ in range(K)]
        self.cond_outputs: list[dict[int, dict[str, Any]]] = [{} for _ in range(K)]
        self.low_res_logits = torch.full((D, K, 1, low, low), NO_OBJ_SCORE, device=storage_device)
        self.obj_ptr = torch.zeros(D, K, model.hidden_dim, device=storage_device)
        self.object_score_logits = torch.full((D, K, 1), NO_OBJ_SCORE, device=storage_device)
        self.iou = torch.zeros(D, K, device=storage_device)
        self.tracked = torch.zeros(D, K, dtype=torch.bool)
        self.tracked_reverse = torch.zeros(D, K, dtype=torch.bool)
        self.features = _SliceFeatures(model, images, feature_cache_slices)
        self.memories: dict[int, torch.Tensor] = {}

    def forget(self, slices: Sequence[int]) -> None:
        """Make ``slices`` untracked again, with no object on them, as a new state has them.

        A propagation pass that stops where the structure ends leaves the slices beyond it
        so (see ``stop_after_absent`` of :meth:`~model_core.predictor.VolumePredictor.propagate`),
        whatever an earlier pass over them had found: the result is then what a replay of the
        same prompts on a new state gives.
        """
        index = torch.as_tensor(list(slices), dtype=torch.long)
        if index.numel() == 0:
            return
        self.low_res_logits[index] = NO_OBJ_SCORE
        self.obj_ptr[index] = 0.0
        self.object_score_logits[index] = NO_OBJ_SCORE
        self.iou[index] = 0.0
        self.tracked[index] = False
        self.tracked_reverse[index] = False
        for z in index.tolist():
            self.memories.pop(z, None)

    @property
    def nbytes(self) -> int:
        """Memory held by the per-slice results and the slices' memories (not the images or the feature cache)."""
        tensors = [self.low_res_logits, self.obj_ptr, self.object_score_logits, self.iou, *self.memories.values()]
        tensors += [
            t
            for outputs in self.cond_outputs
            for out in outputs.values()
            for t in (out["maskmem_features"], out["obj_ptr"])
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_support(self) -> int:
        return 0 if self.support is None else self.support.num_slices


@dataclass(frozen=True)
class PassGeometry:
    """One propagation pass as sam2's video timeline sees it.

    A pass starts at slice ``start`` and walks up (``reverse=False``) or down the
    volume. ``step`` counts slices from the start along the pass (negative behind
    it); ``frame`` is the frame index ``track_step`` sees: support slices are frames
    ``0..S-1`` and query slice ``z`` is frame ``S + z``, or ``S + D - 1 - z`` on the
    mirrored timeline of a reverse pass.
    """

    start: int
    reverse: bool
    num_support: int
    num_slices: int

    @property
    def direction(self) -> int:
        return -1 if self.reverse else 1

    @property
    def num_frames(self) -> int:
        """Frames of the video sam2 sees: support slices, then query slices."""
        return self.num_support + self.num_slices

    def order(self) -> list[int]:
        """Slices in processing order, from the start to the volume's end in the pass's direction."""
        return list(range(self.start, -1, -1)) if self.reverse else list(range(self.start, self.num_slices))

    def slice_at(self, step: int) -> int:
        return self.start + self.direction * step

    def step_of(self, z: int) -> int:
        return (z - self.start) * self.direction

    def frame_of(self, z: int) -> int:
        return self.num_support + ((self.num_slices - 1 - z) if self.reverse else z)

    def frame_at(self, step: int) -> int:
        return self.frame_of(self.slice_at(step))
