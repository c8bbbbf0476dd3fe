"""Support memories and the query memory bank with its selection policies.

SAM2's ``track_step`` reads memories from an ``output_dict`` of the form
``{"cond_frame_outputs": {frame: out}, "non_cond_frame_outputs": {frame: out}}``
and picks the non-conditioning ones by frame arithmetic (the last
``num_maskmem - 1`` frames, object pointers from the last
``max_obj_ptrs_in_encoder - 1``). sam2 keeps every frame's output forever and has
no notion of choosing *useful* memories, so this module adds:

- :class:`SupportMemory`: conditioning memories encoded once from ground-truth
  masks, reusable across query volumes, movable and savable.
- :class:`MemoryBank`: a bounded store of query memories (its size does not grow
  with volume depth) that builds the ``output_dict`` view handed to
  ``track_step``. With the ``recent`` policy the view holds exactly the frames
  SAM2 would pick, so results equal SAM2's; with ``scored`` / ``oracle`` the
  selected memories are re-keyed to the positions just before the current frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch

__all__ = ["FrameEntry", "MemoryBank", "MemoryPolicy", "SupportMemory"]


@dataclass
class SupportMemory:
    """Conditioning memories of a support set, for K objects over S support slices.

    Attributes:
        maskmem_features: ``(S, K, C_mem, h, w)`` spatial memories (storage dtype,
            bfloat16 by default as in SAM2's video predictor).
        maskmem_pos_enc: ``(1, C_mem, h, w)`` their positional encoding (shared).
        obj_ptr: ``(S, K, C)`` object pointers.
        object_score_logits: ``(S, K, 1)`` object presence logits (+10 / -10 from the masks).
        pred_masks: ``(S, K, 1, H/4, W/4)`` low-resolution mask logits the memories were encoded from.
        object_ids: K identifiers (e.g. label values) of the objects, in order.
        image_size: model input size the memories were built at.
        architecture: a fingerprint of the model that built them (checked on use).
        settings: how the caller prepared the support slices (label names, intensity rule, source
            files...), saved with the memory so whoever loads it can check theirs match; the
            network never reads it.
    """

    maskmem_features: torch.Tensor
    maskmem_pos_enc: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor
    pred_masks: torch.Tensor
    object_ids: list[Any]
    image_size: int
    architecture: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return self.maskmem_features.shape[0]

    @property
    def num_objects(self) -> int:
        return self.maskmem_features.shape[1]

    def to(self, device: torch.device | str) -> SupportMemory:
        """A copy with every tensor on ``device``."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return SupportMemory(**kwargs)

    def select_objects(self, object_ids: Iterable[Any]) -> SupportMemory:
        """A view restricted to some objects, in the given order."""
        object_ids = list(object_ids)
        missing = [o for o in object_ids if o not in self.object_ids]
        if missing:
            raise ValueError(f"Objects {missing} are not in the support set (it has {self.object_ids}).")
        idx = torch.tensor([self.object_ids.index(o) for o in object_ids])
        return SupportMemory(
            maskmem_features=self.maskmem_features[:, idx],
            maskmem_pos_enc=self.maskmem_pos_enc,
            obj_ptr=self.obj_ptr[:, idx],
            object_score_logits=self.object_score_logits[:, idx],
            pred_masks=self.pred_masks[:, idx],
            object_ids=object_ids,
            image_size=self.image_size,
            architecture=dict(self.architecture),
            settings=dict(self.settings),
        )

    def save(self, path: str) -> None:
        """Write to ``path`` (a torch file; tensors are moved to CPU)."""
        cpu = self.to("cpu")
        torch.save({"format": "icl_sam2.support_memory/1", **{f.name: getattr(cpu, f.name) for f in fields(cpu)}}, path)

    @classmethod
    def load(cls, path: str, map_location: torch.device | str = "cpu") -> SupportMemory:
        """Read a file written by :meth:`save`."""
        data = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(data, dict) or data.get("format") != "icl_sam2.support_memory/1":
            raise ValueError(f"{path} is not an ICL-SAM2 support memory file (written by SupportMemory.save).")
        data.pop("format")
        return cls(**data)

    def entry(self, s: int, objects: list[int] | None) -> dict[str, Any]:
        """The ``track_step`` output dict of support slice ``s`` for some objects."""
        sel = slice(None) if objects is None else torch.tensor(objects)
        return {
            # stored as bfloat16 (like SAM2's predictor); attended in float32, which is what
            # SAM2 computes once its memories are concatenated with float32 object pointers
            "maskmem_features": self.maskmem_features[s][sel].float(),
            "maskmem_pos_enc": [self.maskmem_pos_enc.expand(self.maskmem_features[s][sel].shape[0], -1, -1, -1)],
            "obj_ptr": self.obj_ptr[s][sel],
            "object_score_logits": self.object_score_logits[s][sel],
        }


@dataclass
class MemoryPolicy:
    """How query memories are chosen for each new slice.

    Args:
        name: ``recent`` (SAM2's rule: the last ``num_maskmem - 1`` slices),
            ``scored`` (rank by predicted IoU, object score, similarity of the
            image embeddings to the current slice and recency; no ground truth
            needed) or ``oracle`` (rank by true IoU against ground truth; an upper
            bound for research).
        num_memories: query memories per slice (default ``num_maskmem - 1``).
        pool_size: candidates kept for ``scored`` / ``oracle`` (bounds memory).
        w_iou, w_object_score, w_similarity, w_recency: weights of the ``scored`` ranking.
    """

    name: str = "recent"
    num_memories: int | None = None
    pool_size: int = 16
    w_iou: float = 1.0
    w_object_score: float = 1.0
    w_similarity: float = 1.0
    w_recency: float = 1.0

    def __post_init__(self):
        if self.name not in ("recent", "scored", "oracle"):
            raise ValueError(f"Unknown memory policy {self.name!r}; use 'recent', 'scored' or 'oracle'.")
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1.")


@dataclass
class FrameEntry:
    """One processed query slice, for all K objects (rows of objects not tracked there are unused).

    ``maskmem_features`` ``(K, C_mem, h, w)`` may be None once the slice is too old to
    be a spatial memory but still gives object pointers.
    """

    slice_index: int
    step: int
    maskmem_features: torch.Tensor | None
    obj_ptr: torch.Tensor  # (K, C)
    object_score_logits: torch.Tensor  # (K, 1)
    iou: torch.Tensor  # (K,) predicted IoU of the chosen mask
    embedding: torch.Tensor | None = None  # (C,) mean image feature, for `scored`
    true_iou: torch.Tensor | None = None  # (K,) for `oracle`


class MemoryBank:
    """Bounded store of query memories for one propagation pass.

    Args:
        policy: the selection policy.
        num_maskmem: the model's ``num_maskmem``.
        max_obj_ptrs: the model's ``max_obj_ptrs_in_encoder``.
        stride: SAM2's ``memory_temporal_stride_for_eval``.
        maskmem_pos_enc: ``(1, C_mem, h, w)`` positional encoding shared by all memories.
    """

    def __init__(self, policy: MemoryPolicy, num_maskmem: int, max_obj_ptrs: int, stride: int, maskmem_pos_enc):
        self.policy = policy
        self.num_memories = policy.num_memories or (num_maskmem - 1)
        self.spatial_window = (num_maskmem - 1) * stride + 1
        self.ptr_window = max_obj_ptrs
        self.maskmem_pos_enc = maskmem_pos_enc
        self.entries: dict[int, FrameEntry] = {}  # step -> entry

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: FrameEntry) -> None:
        self.entries[entry.step] = entry
        self._evict(entry.step)

    def _evict(self, step: int) -> None:
        if self.policy.name == "recent":
            for s in list(self.entries):
                age = step - s
                if age >= self.ptr_window:
                    del self.entries[s]
                elif age >= self.spatial_window:
                    self.entries[s].maskmem_features = None
            return
        # scored / oracle: the most recent `num_memories` plus the best of the rest, up to pool_size
        recent = sorted(self.entries, reverse=True)[: self.num_memories]
        rest = [s for s in self.entries if s not in recent]
        excess = len(self.entries) - max(self.policy.pool_size, self.num_memories)
        if excess > 0:
            rest.sort(key=lambda s: self._static_score(self.entries[s]))
            for s in rest[:excess]:
                del self.entries[s]

    def _static_score(self, e: FrameEntry) -> float:
        if self.policy.name == "oracle":
            return float(e.true_iou.mean())
        return float(
            self.policy.w_iou * e.iou.mean() + self.policy.w_object_score * e.object_score_logits.sigmoid().mean()
        )

    def _entry_out(self, e: FrameEntry, objects: list[int]) -> dict[str, Any]:
        idx = torch.tensor(objects)
        out = {"obj_ptr": e.obj_ptr[idx], "object_score_logits": e.object_score_logits[idx]}
        if e.maskmem_features is not None:
            out["maskmem_features"] = e.maskmem_features[idx].float()
            out["maskmem_pos_enc"] = [self.maskmem_pos_enc.expand(len(objects), -1, -1, -1)]
        return out

    def select(self, step: int, num_objects: int, embedding: torch.Tensor | None) -> list[tuple[int, ...]]:
        """Per object, the steps of the memories to use (most useful first)."""
        if self.policy.name == "recent":
            sel = tuple(sorted(self.entries, reverse=True))
            return [sel] * num_objects
        steps = [s for s in self.entries if self.entries[s].maskmem_features is not None]
        if not steps:
            return [()] * num_objects
        p = self.policy
        chosen = []
        for k in range(num_objects):
            scores = []
            for s in steps:
                e = self.entries[s]
                if p.name == "oracle":
                    score = float(e.true_iou[k]) + 1e-3 / (1 + step - s)  # ties -> more recent
                else:
                    sim = 0.0
                    if embedding is not None and e.embedding is not None:
                        sim = float(torch.nn.functional.cosine_similarity(embedding, e.embedding, dim=0))
                    score = (
                        p.w_iou * float(e.iou[k])
                        + p.w_object_score * float(e.object_score_logits[k].sigmoid())
                        + p.w_similarity * sim
                        + p.w_recency / (1 + step - s)
                    )
                scores.append(score)
            order = sorted(range(len(steps)), key=lambda i: -scores[i])
            chosen.append(tuple(steps[i] for i in order[: self.num_memories]))
        return chosen

    def view(self, step: int, selection: tuple[int, ...], objects: list[int], to_key) -> dict[int, dict[str, Any]]:
        """``non_cond_frame_outputs`` for ``track_step``.

        Args:
            step: the current step (position in this pass).
            selection: steps chosen by :meth:`select` for these objects.
            objects: indices of the objects in the batch handed to ``track_step``.
            to_key: maps a step to the frame index ``track_step`` sees.
        """
        if self.policy.name == "recent":
            return {to_key(s): self._entry_out(self.entries[s], objects) for s in selection}
        # re-key the selected memories to the frames just before the current one
        return {to_key(step - 1 - rank): self._entry_out(self.entries[s], objects) for rank, s in enumerate(selection)}
