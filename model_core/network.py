"""The in-context SAM2 network: support memories from ground truth, query volumes by memory attention.

Input contract (the one place it is defined; the bundle and the app resize and scale to it):

- Images: ``(N, 3, H, W)`` with ``H == W == model.image_size``; ``float32`` in ``[0, 1]``
  (CT windowed or MRI percentile-scaled, then replicated or 2.5D stacked to 3
  channels) or ``uint8`` (read as ``value / 255``). ImageNet normalisation is done
  inside the model, as SAM2 was trained with it.
- Masks: ``(N, K, H, W)`` bool (or 0/1) on the same grid, one channel per object.
- Prompts: :class:`~model_core.prompts.SlicePrompt` in pixels ``(x, y)`` of that grid.
- Outputs: mask logits at the model grid (or any ``output_size``), SAM2's predicted
  IoU and object-score logits per slice and object.

A query volume is handled like one of SAM2's videos. Support slices are
conditioning frames placed before the query (frame indices ``0..S-1``; query slice
``z`` is frame ``S + z``), exactly as if the support slices had been given to
``SAM2VideoPredictor.add_new_mask`` and the query frames tracked by
``propagate_in_video``. Propagation towards lower slices runs on the mirrored
timeline (``S + D - 1 - z``), which is what sam2's ``track_in_reverse`` computes.

Why this is not just ``SAM2VideoPredictor``: the predictor loads videos from JPEG
folders, keeps every frame's memory and image features for the whole video
(memory grows with depth), runs objects one at a time, has no support set that
outlives a video, and cannot choose which memories to attend to. Here the image
encoder is batched over slices, objects share each slice's features, memory held
during propagation is bounded, and selection policies plug into ``track_step`` via
the ``output_dict`` view it reads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base

from model_core.memory import FrameEntry, MemoryBank, MemoryPolicy, SupportMemory
from model_core.prompts import SlicePrompt

__all__ = ["InContextSAM2", "EncoderFeatureCache", "VolumeState", "VolumePrediction", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


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
        """``(K,)`` per-object confidence in [0, 1]: mean predicted IoU x presence over slices where the object is predicted."""
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

    def __init__(self, model: "InContextSAM2", images: torch.Tensor, capacity: int):
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
        _, feats, pos, sizes = self.model._prepare_backbone_features(expanded)
        return feats, pos, sizes


class VolumeState:
    """Everything known about one query volume during in-context and interactive segmentation.

    Built only by :meth:`InContextSAM2.init_state`. Per slice it keeps the compact
    results (low-resolution logits, object pointer, scores); spatial memories are
    rebuilt from them when a later pass needs them, so memory stays
    ``O(D * (h/4 * w/4))`` and never holds ``D`` image features.

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

    @property
    def num_support(self) -> int:
        return 0 if self.support is None else self.support.num_slices


class EncoderFeatureCache:
    """Image features of training slices, kept across epochs while the image encoder is frozen.

    MedSAM precomputes embeddings to disk; here they are computed on first use and
    kept in a bounded LRU (``max_slices``), keyed by the episode sampler's slice ids,
    on ``device`` (CPU by default, so GPU memory stays for training). Valid only
    while the encoder's weights do not change, which the network checks.

    Args:
        max_slices: capacity in slices (least recently used slices are dropped).
        device: where the features are stored.
    """

    def __init__(self, max_slices: int, device: str | torch.device = "cpu"):
        if int(max_slices) < 1:
            raise ValueError(f"max_slices must be >= 1, got {max_slices}.")
        self.max_slices, self.device = int(max_slices), torch.device(device)
        self._slices: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self.pos_enc: list[torch.Tensor] | None = None  # the same for every slice: stored once
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._slices)

    def __contains__(self, key: int) -> bool:
        return key in self._slices

    def get(self, key: int) -> list[torch.Tensor]:
        self._slices.move_to_end(key)
        return self._slices[key]

    def put(self, key: int, levels: list[torch.Tensor]) -> None:
        self._slices[key] = [lvl.detach().to(self.device) for lvl in levels]
        self._slices.move_to_end(key)
        while len(self._slices) > self.max_slices:
            self._slices.popitem(last=False)


class InContextSAM2(SAM2Base):
    """SAM2 for in-context segmentation of volumes (a :class:`sam2.modeling.sam2_base.SAM2Base`).

    Args:
        memory_storage_dtype: dtype of stored spatial memories (bfloat16, as SAM2's
            video predictor stores them).
        encoder_batch_size: slices per image-encoder batch; default 8 on CUDA and 1 on
            CPU, where batching measured slower per slice (Hiera-tiny at 512, 2 cores:
            0.34 s/slice at batch 1, 0.42 s at batch 8) and costs memory.
        feature_cache_slices: default LRU size (in slices) of a volume's image features.
        kwargs: :class:`SAM2Base` arguments (from a preset).
    """

    def __init__(
        self,
        memory_storage_dtype: str | torch.dtype = "bfloat16",
        encoder_batch_size: int | None = None,
        feature_cache_slices: int = 16,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.memory_storage_dtype = _as_dtype(memory_storage_dtype)
        self._encoder_batch_size = encoder_batch_size
        self.feature_cache_slices = int(feature_cache_slices)
        # not persistent: official checkpoints must load strictly
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.preset = "custom"
        #: number of slices passed through the image encoder (observability for callers and tests)
        self.encoded_slices = 0
        #: training-time features of a frozen encoder (see :meth:`cache_encoder_features`)
        self.feature_cache: EncoderFeatureCache | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def encoder_batch_size(self) -> int:
        """Slices per image-encoder batch (see the constructor)."""
        if self._encoder_batch_size is not None:
            return int(self._encoder_batch_size)
        return 8 if self.device.type == "cuda" else 1

    @property
    def architecture(self) -> dict[str, Any]:
        """Fingerprint of the model that support memories must match: preset, sizes and weights.

        The weight checksum covers the image and memory encoders' first layers, which
        differ between checkpoints of the same preset and change during training, so a
        support memory is never used with weights it was not built by.
        """
        probes = (self.image_encoder.trunk.patch_embed.proj.weight, self.memory_encoder.pix_feat_proj.weight)
        checksum = [round(float(p.detach().double().abs().sum()), 6) for p in probes]
        return {
            "preset": self.preset,
            "image_size": self.image_size,
            "hidden_dim": self.hidden_dim,
            "mem_dim": self.mem_dim,
            "num_maskmem": self.num_maskmem,
            "weights": checksum,
        }

    def check_images(self, images: Any, name: str = "images") -> torch.Tensor:
        """Validate images against the input contract; returns them (float or uint8 tensor).

        Raises:
            ValueError: wrong type, shape, size, dtype or value range.
        """
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}.")
        s = self.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must have shape (N, 3, {s}, {s}), got {tuple(images.shape)}.")
        if images.shape[0] == 0:
            raise ValueError(f"{name} is empty (no slices).")
        if tuple(images.shape[-2:]) != (s, s):
            raise ValueError(
                f"{name} are {images.shape[-2]}x{images.shape[-1]} but this model takes {s}x{s}; "
                f"resize slices to the model's image size first."
            )
        if images.dtype == torch.uint8:
            return images
        if not images.is_floating_point():
            raise ValueError(f"{name} must be float in [0, 1] or uint8, got {images.dtype}.")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3 or images.isnan().any():
            raise ValueError(
                f"{name} must be scaled to [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                f"apply a CT window or MRI percentile scaling first."
            )
        return images

    def check_masks(self, masks: Any, num_images: int, name: str = "masks") -> torch.Tensor:
        s = self.image_size
        if not isinstance(masks, torch.Tensor) or masks.ndim != 4:
            shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"{name} must be a tensor of shape (N, K, {s}, {s}), got {shape}.")
        if masks.shape[0] != num_images or tuple(masks.shape[-2:]) != (s, s):
            raise ValueError(
                f"{name} have shape {tuple(masks.shape)} but the images are ({num_images}, 3, {s}, {s}); "
                f"masks need one (K, {s}, {s}) stack per image."
            )
        if masks.shape[1] == 0:
            raise ValueError(f"{name} have no object channel (K = 0).")
        if masks.dtype != torch.bool:
            if not ((masks == 0) | (masks == 1)).all():
                raise ValueError(
                    f"{name} must be binary (bool or 0/1), one channel per object; "
                    f"split a label map into one channel per label value first."
                )
            masks = masks != 0
        return masks

    def encode_slices(self, images: torch.Tensor) -> dict[str, Any]:
        """Image features of a batch of slices.

        Args:
            images: ``(N, 3, H, W)`` float in [0, 1] or uint8 (any device).

        Returns:
            sam2's ``backbone_out`` dict (``backbone_fpn``, ``vision_pos_enc`` lists of ``(N, C, h, w)``).
        """
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.pixel_mean) / self.pixel_std
        self.encoded_slices += x.shape[0]
        return self.forward_image(x)

    def _track_step(self, *args, **kwargs):
        # keep the three candidates, their IoU predictions and object scores, which
        # sam2's track_step computes but drops (needed for the loss and selection)
        current_out, sam_outputs, high_res_features, pix_feat = super()._track_step(*args, **kwargs)
        current_out["multimask_logits"] = sam_outputs[0]
        current_out["multimask_logits_high_res"] = sam_outputs[1]
        current_out["ious"] = sam_outputs[2]
        current_out["object_score_logits"] = sam_outputs[6]
        return current_out, sam_outputs, high_res_features, pix_feat

    @staticmethod
    def _best_iou(ious: torch.Tensor) -> torch.Tensor:
        return ious.max(dim=-1).values  # (N,) IoU of the chosen candidate (argmax, as SAM2 picks)

    # ---------------------------------------------------------- support memory
    def _encode_support_slices(self, feats_list, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Memories of support slices from ground truth, through SAM2's mask-as-output path.

        Same computation as ``SAM2VideoPredictor.add_new_mask`` followed by
        ``propagate_in_video_preflight``: the mask becomes +/-10 logits, is
        downsampled to the low-resolution grid, upsampled again and encoded by the
        memory encoder.

        Args:
            feats_list: per support slice, ``(vision_feats, vision_pos, feat_sizes)`` for N tracks.
            masks: ``(S, N, H, W)`` bool ground truth.
        """
        empty = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        maskmem, ptrs, scores, low = [], [], [], []
        pos = None
        for s, (feats, pos_embeds, sizes) in enumerate(feats_list):
            out = self.track_step(
                frame_idx=s,
                is_init_cond_frame=True,
                current_vision_feats=feats,
                current_vision_pos_embeds=pos_embeds,
                feat_sizes=sizes,
                point_inputs=None,
                mask_inputs=masks[s][:, None].float(),
                output_dict=empty,
                num_frames=len(feats_list),
                run_mem_encoder=False,
            )
            high_res = F.interpolate(
                out["pred_masks"], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
            feat, pos = self._encode_new_memory(feats, sizes, high_res, out["object_score_logits"], is_mask_from_pts=True)
            maskmem.append(feat)
            ptrs.append(out["obj_ptr"])
            scores.append(out["object_score_logits"])
            low.append(out["pred_masks"])
        return {
            "maskmem_features": torch.stack(maskmem),
            "maskmem_pos_enc": pos[-1][:1],
            "obj_ptr": torch.stack(ptrs),
            "object_score_logits": torch.stack(scores),
            "pred_masks": torch.stack(low),
        }

    @torch.inference_mode()
    def build_support_memory(
        self, images: torch.Tensor, masks: torch.Tensor, object_ids: Sequence[Any] | None = None
    ) -> SupportMemory:
        """Encode a support set once; use it for any number of query volumes.

        Args:
            images: ``(S, 3, H, W)`` support slices (input contract).
            masks: ``(S, K, H, W)`` their ground truth, one channel per object.
            object_ids: K identifiers (default ``1..K``).

        Raises:
            ValueError: shapes or dtypes off, or an object with no foreground on any support slice.
        """
        images = self.check_images(images, "support images")
        masks = self.check_masks(masks, images.shape[0], "support masks")
        K = masks.shape[1]
        object_ids = list(range(1, K + 1)) if object_ids is None else list(object_ids)
        if len(object_ids) != K:
            raise ValueError(f"Got {len(object_ids)} object ids for {K} mask channels.")
        empty = [object_ids[k] for k in range(K) if not masks[:, k].any()]
        if empty:
            raise ValueError(
                f"Support masks are empty for object(s) {empty}: every object needs foreground "
                f"on at least one support slice."
            )
        features = _SliceFeatures(self, images, capacity=self.encoder_batch_size)
        masks = masks.to(self.device)
        maskmem, ptrs, scores, low, pos = [], [], [], [], None
        for s in range(images.shape[0]):
            features.prefetch(range(s, images.shape[0]))
            out = self._encode_support_slices([features.get(s, K)], masks[s : s + 1])
            maskmem.append(out["maskmem_features"][0].to(self.memory_storage_dtype))
            ptrs.append(out["obj_ptr"][0])
            scores.append(out["object_score_logits"][0])
            low.append(out["pred_masks"][0])
            pos = out["maskmem_pos_enc"]
        return SupportMemory(
            maskmem_features=torch.stack(maskmem),
            maskmem_pos_enc=pos,
            obj_ptr=torch.stack(ptrs),
            object_score_logits=torch.stack(scores),
            pred_masks=torch.stack(low),
            object_ids=object_ids,
            image_size=self.image_size,
            architecture=self.architecture,
        )

    # ---------------------------------------------------------- volume state
    def init_state(
        self,
        images: torch.Tensor,
        support: SupportMemory | None = None,
        object_ids: Sequence[Any] | None = None,
        feature_cache_slices: int | None = None,
        storage_device: torch.device | str = "cpu",
        share_features_with: VolumeState | None = None,
    ) -> VolumeState:
        """Start segmenting a query volume.

        Args:
            images: ``(D, 3, H, W)`` query slices (input contract); kept where they are.
            support: support memory (in-context); None for prompts only.
            object_ids: the objects to segment (default: all of the support's, or
                ``[1]`` without support).
            feature_cache_slices: LRU size for image features (default ``self.feature_cache_slices``).
            storage_device: where per-slice results are kept.
            share_features_with: an earlier state of the same slices whose image-feature
                cache this one reuses (an interactive session restarting with other prompts
                or objects without encoding the volume again).
        """
        images = self.check_images(images, "query images")
        if share_features_with is not None and share_features_with.images.shape != images.shape:
            raise ValueError(f"share_features_with holds {tuple(share_features_with.images.shape)} slices, "
                             f"not {tuple(images.shape)}: features can only be shared by the same volume.")
        if support is not None:
            if support.architecture and support.architecture != self.architecture:
                raise ValueError(
                    f"This support memory was built by a different model ({support.architecture}); "
                    f"this model is {self.architecture}. Rebuild it with this model."
                )
            if object_ids is not None:
                support = support.select_objects(object_ids)
            support = support.to(self.device)
            object_ids = support.object_ids
        elif object_ids is None:
            object_ids = [1]
        if len(object_ids) == 0:
            raise ValueError("Nothing to segment: object_ids is empty.")
        cache = self.feature_cache_slices if feature_cache_slices is None else feature_cache_slices
        state = VolumeState(self, images, support, object_ids, cache, storage_device)
        if share_features_with is not None:
            state.features = share_features_with.features
            state.features.capacity = max(state.features.capacity, int(cache))
        return state

    def _object_index(self, state: VolumeState, obj: Any) -> int:
        if obj not in state.object_ids:
            raise ValueError(f"Unknown object {obj!r}; this volume's objects are {state.object_ids}.")
        return state.object_ids.index(obj)

    def _check_slice(self, state: VolumeState, z: int) -> int:
        if not 0 <= int(z) < state.num_slices:
            raise ValueError(f"Slice {z} is outside the volume (slices 0..{state.num_slices - 1}).")
        return int(z)

    # ------------------------------------------------------ memory views
    def _support_cond(self, state: VolumeState, objects: list[int]) -> dict[int, dict[str, Any]]:
        if state.support is None:
            return {}
        return {j: state.support.entry(j, objects) for j in range(state.num_support)}

    def _prompt_cond(self, state, objects: list[int], to_key) -> dict[int, dict[str, Any]]:
        """Conditioning outputs of prompted slices (the same slices for every object in ``objects``)."""
        out = {}
        for c in sorted(state.cond_outputs[objects[0]]):
            rows = [state.cond_outputs[k][c] for k in objects]
            out[to_key(c)] = {
                key: (
                    torch.cat([r[key].float() for r in rows])
                    if key != "maskmem_pos_enc"
                    else [rows[0][key][0].expand(len(objects), -1, -1, -1)]
                )
                for key in ("maskmem_features", "maskmem_pos_enc", "obj_ptr", "object_score_logits")
            }
        return out

    def _memory_entry(self, state: VolumeState, z: int, step: int, embedding=None) -> FrameEntry:
        """Rebuild the spatial memory of an already tracked slice from its stored logits."""
        K = state.num_objects
        feats, _, sizes = state.features.get(z, K)
        high = F.interpolate(
            state.low_res_logits[z].to(self.device), size=(self.image_size,) * 2, mode="bilinear", align_corners=False
        )
        obj_scores = state.object_score_logits[z].to(self.device)
        maskmem, _ = self._encode_new_memory(feats, sizes, high, obj_scores, is_mask_from_pts=False)
        return FrameEntry(
            slice_index=z,
            step=step,
            maskmem_features=maskmem.to(self.memory_storage_dtype),
            obj_ptr=state.obj_ptr[z].to(self.device),
            object_score_logits=obj_scores,
            iou=state.iou[z].to(self.device),
            embedding=embedding,
        )

    def _pass_geometry(self, state: VolumeState, start: int, reverse: bool):
        """Maps of one pass: step -> slice and slice -> frame index seen by track_step."""
        S, D = state.num_support, state.num_slices
        direction = -1 if reverse else 1

        def slice_of(step: int) -> int:
            return start + direction * step

        def key_of_slice(z: int) -> int:
            return S + ((D - 1 - z) if reverse else z)

        return slice_of, key_of_slice, S + D

    # ------------------------------------------------------------ prompts
    @torch.inference_mode()
    def add_prompt(
        self, state: VolumeState, slice_index: int, obj: Any, prompt: SlicePrompt, replace: bool = True
    ) -> torch.Tensor:
        """Add clicks, a box or a mask for one object on one slice (like ``add_new_points_or_box`` / ``add_new_mask``).

        The slice becomes a conditioning frame for that object. Without a support
        set and on a slice not segmented yet it is segmented from the prompt alone
        (SAM); otherwise the prompt corrects the memory-conditioned prediction,
        fed together with the slice's previous logits. Call :meth:`propagate`
        afterwards to carry the change through the volume.

        Args:
            state: from :meth:`init_state`.
            slice_index: slice in ``[0, D)``.
            obj: an object id of the state.
            prompt: the user's input (model-grid pixels).
            replace: replace earlier clicks on this slice (True) or add to them.

        Returns:
            ``(H, W)`` mask logits of the object on this slice at the model grid.
        """
        z = self._check_slice(state, slice_index)
        k = self._object_index(state, obj)
        prompt = prompt.validate(self.image_size)
        old = state.prompts[k].get(z)
        if not replace and old is not None and prompt.mask is None and old.mask is None:
            if prompt.box is not None:
                raise ValueError("A box must come first: add it with replace=True, then add clicks.")
            points = torch.cat([old.points, prompt.points]) if old.points is not None else prompt.points
            labels = torch.cat([old.labels, prompt.labels]) if old.labels is not None else prompt.labels
            prompt = SlicePrompt(points, labels, old.box).validate(self.image_size)
        tracked = bool(state.tracked[z, k]) or z in state.cond_outputs[k]
        is_init_cond = not bool(state.tracked[z, k]) and state.support is None
        reverse = bool(state.tracked_reverse[z, k])
        _, key_of_slice, num_frames = self._pass_geometry(state, z, reverse)
        output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        if not is_init_cond:
            bank, step_of_slice, to_key = self._new_bank(state, MemoryPolicy(), z, reverse, key_of_slice)
            self._warm_bank(state, bank, z, reverse, step_of_slice, exclude_objects=[k])
            output_dict["cond_frame_outputs"] = {
                **self._support_cond(state, [k]),
                **(self._prompt_cond(state, [k], key_of_slice) if state.cond_outputs[k] else {}),
            }
            output_dict["non_cond_frame_outputs"] = bank.view(0, tuple(bank.entries), [k], to_key)
        feats, pos, sizes = state.features.get(z, 1)
        prev_logits = None
        if prompt.mask is None and tracked:
            prev_logits = state.low_res_logits[z, k : k + 1].to(self.device).clamp(-32.0, 32.0)
        out = self.track_step(
            frame_idx=key_of_slice(z),
            is_init_cond_frame=is_init_cond,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=prompt.point_inputs(self.device),
            mask_inputs=None if prompt.mask is None else prompt.mask[None, None].float().to(self.device),
            output_dict=output_dict,
            num_frames=num_frames,
            run_mem_encoder=False,
            prev_sam_mask_logits=prev_logits,
        )
        high = F.interpolate(out["pred_masks"], size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        maskmem, maskmem_pos = self._encode_new_memory(feats, sizes, high, out["object_score_logits"], is_mask_from_pts=True)
        state.prompts[k][z] = prompt
        state.cond_outputs[k][z] = {
            "maskmem_features": maskmem.to(self.memory_storage_dtype),
            "maskmem_pos_enc": maskmem_pos,
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }
        self._store(state, z, [k], out)
        return high[0, 0]

    def _new_bank(self, state, policy, start, reverse, key_of_slice):
        """A memory bank for a pass from ``start``, with its step <-> frame-key maps."""
        slice_of, _, _ = self._pass_geometry(state, start, reverse)
        bank = MemoryBank(
            policy, self.num_maskmem, self.max_obj_ptrs_in_encoder, self.memory_temporal_stride_for_eval, self._pos_enc(1)[0]
        )

        def step_of_slice(z: int) -> int:
            return (z - start) * (-1 if reverse else 1)

        def to_key(step: int) -> int:
            return key_of_slice(slice_of(step))

        return bank, step_of_slice, to_key

    def _warm_bank(self, state, bank, first, reverse, step_of_slice, ground_truth=None, exclude_objects=()):
        """Fill ``bank`` with memories of tracked slices behind ``first``, rebuilt from stored results.

        This is what SAM2's predictor reads from its ever-growing output dict when a
        pass starts next to frames tracked earlier (the other direction of a
        bidirectional run, or a re-propagation after a correction); here only the
        window SAM2 can attend to is rebuilt. Slices that are conditioning frames of
        ``exclude_objects`` are skipped, as the predictor holds no non-conditioning
        output for them.
        """
        direction = -1 if reverse else 1
        spatial = (self.num_maskmem - 1) * self.memory_temporal_stride_for_eval + 1
        window = max(self.max_obj_ptrs_in_encoder, spatial)
        for d in range(window - 1, 0, -1):
            y = first - direction * d
            if not (0 <= y < state.num_slices) or not bool(state.tracked[y].all()):
                continue
            if any(y in state.cond_outputs[k] for k in exclude_objects):
                continue
            if d < spatial:
                entry = self._memory_entry(state, y, step_of_slice(y))
            else:  # too far for a spatial memory: only its object pointer is used
                entry = FrameEntry(
                    slice_index=y,
                    step=step_of_slice(y),
                    maskmem_features=None,
                    obj_ptr=state.obj_ptr[y].to(self.device),
                    object_score_logits=state.object_score_logits[y].to(self.device),
                    iou=state.iou[y].to(self.device),
                )
            if ground_truth is not None:
                entry.true_iou = self._true_iou(state.low_res_logits[y], ground_truth[y])
            bank.add(entry)

    def _pos_enc(self, n: int) -> list[torch.Tensor]:
        h = self.image_size // 16
        dummy = torch.zeros(1, self.mem_dim, h, h, device=self.device)
        pos = self.memory_encoder.position_encoding(dummy).to(dummy.dtype)
        return [pos.expand(n, -1, -1, -1)]

    def _store(self, state: VolumeState, z: int, objects: list[int], out: dict[str, Any]) -> None:
        idx = torch.tensor(objects)
        dev = state.low_res_logits.device
        state.low_res_logits[z, idx] = out["pred_masks"].to(dev, torch.float32)
        state.obj_ptr[z, idx] = out["obj_ptr"].to(dev, torch.float32)
        state.object_score_logits[z, idx] = out["object_score_logits"].to(dev, torch.float32)
        state.iou[z, idx] = self._best_iou(out["ious"]).to(dev, torch.float32)

    # ------------------------------------------------------------ propagation
    def propagate(
        self,
        state: VolumeState,
        start_slice: int | None = None,
        direction: str = "both",
        policy: MemoryPolicy | None = None,
        ground_truth: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Segment the volume slice by slice, streaming results.

        Args:
            state: from :meth:`init_state` (with support and/or prompts).
            start_slice: first slice (default: the lowest prompted slice, else 0).
            direction: ``forward`` (increasing slice index), ``backward`` or ``both``
                (forward from the start, then backward from it, as SAM2 does).
            policy: memory selection (default ``recent``, SAM2's rule).
            ground_truth: ``(D, K, H, W)`` bool, required by the ``oracle`` policy.
            output_size: ``(H, W)`` of the yielded logits (default the model grid).

        Yields:
            ``(slice_index, logits)`` with logits ``(K, 1, H, W)`` float32, in processing order.
        """
        policy = policy or MemoryPolicy()
        if direction not in ("forward", "backward", "both"):
            raise ValueError(f"direction must be 'forward', 'backward' or 'both', got {direction!r}.")
        unprompted = [state.object_ids[k] for k in range(state.num_objects) if not state.cond_outputs[k]]
        if state.support is None and unprompted:
            raise ValueError(f"Objects {unprompted} have neither a support set nor a prompt; add one first.")
        if policy.name == "oracle":
            if ground_truth is None:
                raise ValueError("The oracle policy ranks memories by true IoU and needs ground_truth (D, K, H, W).")
            expected = (state.num_slices, state.num_objects)
            if not isinstance(ground_truth, torch.Tensor) or ground_truth.ndim != 4 or tuple(ground_truth.shape[:2]) != expected:
                raise ValueError(f"ground_truth must be (D, K, H, W) with (D, K) = {expected}.")
            ground_truth = ground_truth.bool()
        if start_slice is None:
            prompted = [z for k in range(state.num_objects) for z in state.cond_outputs[k]]
            start_slice = min(prompted) if prompted else 0
        start = self._check_slice(state, start_slice)
        output_size = tuple(output_size or (self.image_size, self.image_size))
        passes = {"forward": [False], "backward": [True], "both": [False, True]}[direction]
        # arguments are checked above, when propagate() is called; the work runs lazily
        return self._propagate_passes(state, start, passes, policy, ground_truth, output_size)

    @torch.inference_mode()
    def _propagate_passes(self, state, start, passes, policy, ground_truth, output_size):
        for reverse in passes:
            yield from self._propagate_pass(state, start, reverse, policy, ground_truth, output_size)

    def _propagate_pass(self, state, start, reverse, policy, ground_truth, output_size):
        K, D = state.num_objects, state.num_slices
        _, key_of_slice, num_frames = self._pass_geometry(state, start, reverse)
        order = list(range(start, D)) if not reverse else list(range(start, -1, -1))
        bank, step_of_slice, to_key = self._new_bank(state, policy, start, reverse, key_of_slice)
        self._warm_bank(state, bank, start, reverse, step_of_slice, ground_truth)
        for i, z in enumerate(order):
            state.features.prefetch(order[i : i + self.encoder_batch_size])
            step = step_of_slice(z)
            cond_objs = [k for k in range(K) if z in state.cond_outputs[k]]
            track_objs = [k for k in range(K) if k not in cond_objs]
            feats_k, _, sizes = state.features.get(z, K)
            embedding = feats_k[-1][:, 0].float().mean(0) if policy.name == "scored" else None
            maskmem = None
            if track_objs:
                selection = bank.select(step, K, embedding)
                groups: dict[tuple, list[int]] = {}
                for k in track_objs:
                    groups.setdefault((tuple(sorted(state.cond_outputs[k])), selection[k]), []).append(k)
                for (cond_slices, sel), objs in groups.items():
                    excluded = {step_of_slice(c) for c in cond_slices}
                    sel = tuple(s for s in sel if s not in excluded)
                    output_dict = {
                        "cond_frame_outputs": {
                            **self._support_cond(state, objs),
                            **(self._prompt_cond(state, objs, key_of_slice) if cond_slices else {}),
                        },
                        "non_cond_frame_outputs": bank.view(step, sel, objs, to_key),
                    }
                    feats, pos, sizes = state.features.get(z, len(objs))
                    out = self.track_step(
                        frame_idx=key_of_slice(z),
                        is_init_cond_frame=False,
                        current_vision_feats=feats,
                        current_vision_pos_embeds=pos,
                        feat_sizes=sizes,
                        point_inputs=None,
                        mask_inputs=None,
                        output_dict=output_dict,
                        num_frames=num_frames,
                        run_mem_encoder=True,
                    )
                    self._store(state, z, objs, out)
                    if maskmem is None:
                        shape = (K, *out["maskmem_features"].shape[1:])
                        maskmem = torch.zeros(shape, dtype=self.memory_storage_dtype, device=self.device)
                    maskmem[torch.tensor(objs)] = out["maskmem_features"].to(self.memory_storage_dtype)
            state.tracked[z] = True
            state.tracked_reverse[z] = reverse
            if maskmem is not None:
                entry = FrameEntry(
                    slice_index=z,
                    step=step,
                    maskmem_features=maskmem,
                    obj_ptr=state.obj_ptr[z].to(self.device),
                    object_score_logits=state.object_score_logits[z].to(self.device),
                    iou=state.iou[z].to(self.device),
                    embedding=embedding,
                )
                if policy.name == "oracle":
                    entry.true_iou = self._true_iou(state.low_res_logits[z], ground_truth[z])
                bank.add(entry)
            logits = state.low_res_logits[z].to(self.device)
            if tuple(logits.shape[-2:]) != output_size:
                logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
            yield z, logits

    def _true_iou(self, low_res_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pred = F.interpolate(low_res_logits.float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0
        gt = gt.to(pred.device)
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).to(self.device)

    # ------------------------------------------------------------- training
    def set_trainable(self, image_encoder: str = "frozen") -> None:
        """Choose what trains.

        Args:
            image_encoder: ``frozen`` (default: trunk and neck frozen, as in MedSAM),
                ``neck`` (train the FPN neck, trunk frozen) or ``all`` (whole encoder).
                Everything else (memory attention and encoder, prompt encoder, mask
                decoder, pointers) always trains.
        """
        if image_encoder not in ("frozen", "neck", "all"):
            raise ValueError(f"image_encoder must be 'frozen', 'neck' or 'all', got {image_encoder!r}.")
        for p in self.parameters():
            p.requires_grad_(True)
        if image_encoder in ("frozen", "neck"):
            self.image_encoder.trunk.requires_grad_(False)
        if image_encoder == "frozen":
            self.image_encoder.neck.requires_grad_(False)

    def param_groups(self, lr: float, encoder_lr: float | None = None, weight_decay: float = 0.01) -> list[dict[str, Any]]:
        """Trainable parameters in two groups for an optimizer (image encoder, the rest).

        Args:
            lr: learning rate of everything but the image encoder.
            encoder_lr: learning rate of the image encoder (default ``lr``).
            weight_decay: AdamW weight decay (not applied to norms, biases and embeddings).
        """
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "image_encoder" if name.startswith("image_encoder.") else "rest"
            no_decay = p.ndim <= 1 or "pos_embed" in name or name.endswith("_embed") or "tpos_enc" in name
            groups.setdefault((part, no_decay), []).append(p)
        out = []
        for (part, no_decay), params in sorted(groups.items()):
            out.append(
                {
                    "name": f"{part}{'_no_decay' if no_decay else ''}",
                    "params": params,
                    "lr": (encoder_lr if encoder_lr is not None else lr) if part == "image_encoder" else lr,
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
        return out

    def cache_encoder_features(self, max_slices: int, device: str | torch.device = "cpu") -> "InContextSAM2":
        """Reuse training slices' image features across epochs while the encoder is frozen.

        Args:
            max_slices: cache capacity in slices; 0 turns caching off.
            device: where features are kept (CPU by default).

        Returns:
            ``self``, so a config can write ``network_def.to(device).cache_encoder_features(n)``.

        Raises:
            ValueError: the image encoder is trainable (its features would go stale).
        """
        if int(max_slices) <= 0:
            self.feature_cache = None
            return self
        self._check_encoder_frozen()
        self.feature_cache = EncoderFeatureCache(max_slices, device)
        return self

    def _check_encoder_frozen(self) -> None:
        if any(p.requires_grad for p in self.image_encoder.parameters()):
            raise ValueError(
                "Caching image features needs a frozen image encoder (train_encoder 'frozen'); the encoder is "
                "trainable, so its features change every step. Set feature_cache_slices to 0 or freeze it."
            )

    def _episode_features(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        """sam2 ``backbone_out`` levels for ``(N, 3, H, W)`` images, from the feature cache where it has them."""
        def encode(x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
            outs = [self.encode_slices(x[i : i + self.encoder_batch_size]) for i in range(0, x.shape[0], self.encoder_batch_size)]
            return {key: [torch.cat([o[key][lvl] for o in outs]) for lvl in range(len(outs[0][key]))]
                    for key in ("backbone_fpn", "vision_pos_enc")}

        cache = self.feature_cache
        if cache is None or keys is None:
            return encode(images)
        self._check_encoder_frozen()
        keys_list = [int(k) for k in keys.flatten().tolist()]
        if len(keys_list) != images.shape[0]:
            raise ValueError(f"{len(keys_list)} slice keys for {images.shape[0]} images.")
        first_of = {}
        for i, k in enumerate(keys_list):
            if k not in cache:
                first_of.setdefault(k, i)
        cache.misses += len(first_of)
        cache.hits += len(set(keys_list)) - len(first_of)
        # read the hits before storing new slices, whose insertion may evict them
        rows = {k: cache.get(k) for k in keys_list if k not in first_of}
        if first_of:
            with torch.no_grad():
                new = encode(images[list(first_of.values())])
            for j, k in enumerate(first_of):
                rows[k] = [lvl[j] for lvl in new["backbone_fpn"]]
                cache.put(k, rows[k])
            if cache.pos_enc is None:
                cache.pos_enc = [p[:1].detach().to(cache.device) for p in new["vision_pos_enc"]]
        levels = len(next(iter(rows.values())))
        fpn = [torch.stack([rows[k][lvl].to(self.device) for k in keys_list]) for lvl in range(levels)]
        pos = [p.to(self.device).expand(len(keys_list), -1, -1, -1) for p in cache.pos_enc]
        return {"backbone_fpn": fpn, "vision_pos_enc": pos}

    def forward(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
        query_prompts: Sequence[dict[str, torch.Tensor] | None] | None = None,
        support_keys: torch.Tensor | None = None,
        query_keys: torch.Tensor | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """Training forward over a batch of in-context episodes.

        Each episode's K objects are tracks; tracks are episode-major (``n = b * K + k``).
        Support slices become conditioning memories from ground truth (the same path
        as :meth:`build_support_memory`); query slices are tracked in order with
        memory attention, as in SAM2's training. Prompted query slices also become
        conditioning frames.

        Args:
            support_images: ``(B, S, 3, H, W)`` in [0, 1].
            support_masks: ``(B, S, K, H, W)`` bool.
            query_images: ``(B, Q, 3, H, W)`` in [0, 1].
            query_prompts: Q entries, each None or SAM2 ``point_inputs`` for the ``B*K``
                tracks (``point_coords (B*K, P, 2)``, ``point_labels (B*K, P)``), e.g. from
                :class:`~model_core.prompts.PromptSampler`.
            support_keys, query_keys: optional ``(B, S)`` and ``(B, Q)`` int64 slice ids
                (from :class:`~model_core.episodes.EpisodeSampler`); with a feature cache
                (:meth:`cache_encoder_features`) slices seen before are not encoded again.

        Returns:
            Per query slice (lists of length Q): ``multimask_logits`` ``(B*K, M, H, W)``
            (M = 3 candidates, 1 with a box or several clicks), ``ious`` ``(B*K, M)``,
            ``object_score_logits`` ``(B*K, 1)``.
        """
        if support_images.ndim != 5 or query_images.ndim != 5 or support_masks.ndim != 5:
            raise ValueError(
                "Episodes need support_images (B, S, 3, H, W), support_masks (B, S, K, H, W) and "
                f"query_images (B, Q, 3, H, W); got {tuple(support_images.shape)}, "
                f"{tuple(support_masks.shape)}, {tuple(query_images.shape)}."
            )
        B, S = support_images.shape[:2]
        Q, K = query_images.shape[1], support_masks.shape[2]
        if query_images.shape[0] != B or tuple(support_masks.shape[:2]) != (B, S):
            raise ValueError("support_images, support_masks and query_images disagree on B or S.")
        if query_prompts is not None and len(query_prompts) != Q:
            raise ValueError(f"query_prompts must have one entry per query slice ({Q}), got {len(query_prompts)}.")
        self.check_images(support_images.flatten(0, 1), "support images")
        self.check_images(query_images.flatten(0, 1), "query images")
        masks = self.check_masks(support_masks.flatten(0, 1), B * S, "support masks").view(B, S, K, *support_masks.shape[-2:])
        N = B * K
        keys = None
        if support_keys is not None and query_keys is not None:
            keys = torch.cat([torch.as_tensor(support_keys).flatten(), torch.as_tensor(query_keys).flatten()])
        feats = self._episode_features(torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)]), keys)

        def frame(index_of_b) -> tuple:
            idx = torch.tensor([index_of_b(b) for b in range(B)], device=self.device).repeat_interleave(K)
            sub = {key: [f[idx] for f in feats[key]] for key in feats}
            _, vision_feats, vision_pos, sizes = self._prepare_backbone_features(sub)
            return vision_feats, vision_pos, sizes

        support_frames = [frame(lambda b, s=s: b * S + s) for s in range(S)]
        sup_masks = masks.to(self.device).transpose(0, 1).reshape(S, N, *masks.shape[-2:])
        sup = self._encode_support_slices(support_frames, sup_masks)
        pos = [sup["maskmem_pos_enc"].expand(N, -1, -1, -1)]
        output_dict = {
            "cond_frame_outputs": {
                s: {
                    "maskmem_features": sup["maskmem_features"][s],
                    "maskmem_pos_enc": pos,
                    "obj_ptr": sup["obj_ptr"][s],
                    "object_score_logits": sup["object_score_logits"][s],
                }
                for s in range(S)
            },
            "non_cond_frame_outputs": {},
        }
        result: dict[str, list[torch.Tensor]] = {"multimask_logits": [], "ious": [], "object_score_logits": []}
        for q in range(Q):
            vision_feats, vision_pos, sizes = frame(lambda b, q=q: B * S + b * Q + q)
            point_inputs = None if query_prompts is None else query_prompts[q]
            if point_inputs is not None:
                point_inputs = {k: v.to(self.device) for k, v in point_inputs.items()}
            out = self.track_step(
                frame_idx=S + q,
                is_init_cond_frame=False,
                current_vision_feats=vision_feats,
                current_vision_pos_embeds=vision_pos,
                feat_sizes=sizes,
                point_inputs=point_inputs,
                mask_inputs=None,
                output_dict=output_dict,
                num_frames=S + Q,
                run_mem_encoder=True,
            )
            key = "cond_frame_outputs" if point_inputs is not None else "non_cond_frame_outputs"
            output_dict[key][S + q] = out
            result["multimask_logits"].append(out["multimask_logits_high_res"])
            result["ious"].append(out["ious"])
            result["object_score_logits"].append(out["object_score_logits"])
        return result

    @torch.inference_mode()
    def segment_volume(
        self,
        images: torch.Tensor,
        support: SupportMemory | None = None,
        prompts: dict[tuple[int, Any], SlicePrompt] | None = None,
        object_ids: Sequence[Any] | None = None,
        policy: MemoryPolicy | None = None,
        start_slice: int | None = None,
        direction: str | None = None,
        ground_truth: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        return_logits: bool = False,
    ) -> VolumePrediction:
        """Segment every slice of a query volume in one call.

        Args:
            images: ``(D, 3, H, W)`` query slices (input contract).
            support: support memory from :meth:`build_support_memory` (in-context).
            prompts: ``{(slice, object_id): SlicePrompt}`` clicks/boxes/masks, alone or on top of the support.
            object_ids: subset of objects (default all of the support's, or those prompted).
            policy: memory selection policy (default ``recent``).
            start_slice, direction: see :meth:`propagate` (default ``forward`` from 0
                with support only, ``both`` from the first prompted slice with prompts).
            ground_truth: ``(D, K, H, W)`` for the ``oracle`` policy.
            output_size: ``(H, W)`` of the output masks (default the model grid).
            return_logits: also return float16 logits.
        """
        if object_ids is None and support is None:
            object_ids = sorted({o for (_, o) in (prompts or {})}) or [1]
        state = self.init_state(images, support, object_ids)
        for (z, obj), prompt in (prompts or {}).items():
            self.add_prompt(state, z, obj, prompt)
        direction = direction or ("both" if prompts else "forward")
        K, D = state.num_objects, state.num_slices
        H, W = output_size or (self.image_size, self.image_size)
        masks = torch.zeros(K, D, H, W, dtype=torch.bool)
        logits_out = torch.zeros(K, D, H, W, dtype=torch.float16) if return_logits else None
        for z, logits in self.propagate(state, start_slice, direction, policy, ground_truth, (H, W)):
            masks[:, z] = (logits[:, 0] > 0).cpu()
            if logits_out is not None:
                logits_out[:, z] = logits[:, 0].to(torch.float16).cpu()
        present = state.object_score_logits[..., 0]
        return VolumePrediction(
            masks=masks,
            iou=torch.where(present > 0, state.iou, torch.zeros_like(state.iou)).cpu(),
            object_score_logits=present.cpu(),
            object_ids=state.object_ids,
            logits=logits_out,
        )
