"""Training side of the in-context network: episode forward, cached encoder features.

As sam2's training code subclasses ``SAM2Base`` (``training/model/sam2.py``,
``SAM2Train``), :class:`InContextSAM2Train` subclasses the inference network with
what only training needs. Its weights and ``state_dict`` are the network's, so a
checkpoint trained here loads into :class:`~model_core.modeling.network.InContextSAM2` and a
:class:`~model_core.predictor.VolumePredictor` can hold either (validation during
training uses the very object being trained). What trains is the freezing matrix of
:mod:`model_core.training.trainable`; :func:`~model_core.training.builder.build_training_network`
builds one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Sequence

import torch

from model_core.modeling.network import InContextSAM2
from model_core.training.lora import adapter_parameter_names, lora_settings
from model_core.training.trainable import (
    TRAINABLE_GROUPS,
    format_trainable_summary,
    parameter_unit,
    resolve_trainable,
)

__all__ = ["EncoderFeatureCache", "InContextSAM2Train"]

logger = logging.getLogger(__name__)


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


class InContextSAM2Train(InContextSAM2):
    """:class:`~model_core.modeling.network.InContextSAM2` with the episode ``forward`` the bundle's trainer calls.

    Built by :func:`~model_core.modeling.presets.build_icl_sam2` with ``trainable=...``; takes
    the network's constructor arguments.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        #: training-time features of a frozen encoder (see :meth:`cache_encoder_features`)
        self.feature_cache: EncoderFeatureCache | None = None

    def set_trainable(self, trainable: str | Sequence[str] = "frozen") -> dict[str, dict[str, int]]:
        """Choose what trains: the freezing matrix (see :func:`resolve_trainable`).

        Parameters of the groups named in ``trainable`` get ``requires_grad``, all others
        are frozen; LoRA adapters (:mod:`model_core.training.lora`), when attached, always train.
        The counts are logged and returned.

        Args:
            trainable: an alias (``frozen``: everything but the image encoder, the
                default, as in MedSAM; ``neck``: everything but Hiera's trunk; ``all``;
                ``none``: nothing, for LoRA adapters only) or a list of groups of
                :data:`TRAINABLE_GROUPS`, e.g. ``["mask_decoder", "memory_attention"]``.

        Returns:
            :meth:`trainable_summary`.

        Raises:
            ValueError: an unknown name (the message lists the valid ones).
        """

        units = set(resolve_trainable(trainable))
        adapters = adapter_parameter_names(self)
        for name, p in self.named_parameters():
            p.requires_grad_(name in adapters or parameter_unit(name) in units)
        self.trainable = resolve_trainable(trainable)
        settings = lora_settings(self)
        if settings is not None:
            overlap = sorted({parameter_unit(n) for n in settings["target_modules"]} & units)
            if overlap:
                logger.warning(
                    f"LoRA targets lie in trainable group(s) {overlap}: their base weights train as well as "
                    "the adapters (freeze those groups to train only the adapters there)."
                )
        summary = self.trainable_summary()
        logger.info(format_trainable_summary(summary, self.trainable, settings))
        return summary

    def trainable_summary(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameter counts per group of :data:`TRAINABLE_GROUPS`, ``lora`` and ``total``.

        Group counts are of the base weights (what a merged model holds); ``lora`` counts the adapters.
        """

        adapters = adapter_parameter_names(self)
        out = {group: {"trainable": 0, "total": 0} for group in (*TRAINABLE_GROUPS, "lora", "total")}
        for name, p in self.named_parameters():
            row = out["lora"] if name in adapters else out[parameter_unit(name).split(".")[0]]
            for r in (row, out["total"]):
                r["total"] += p.numel()
                r["trainable"] += p.numel() if p.requires_grad else 0
        return out

    def param_groups(
        self, lr: float, encoder_lr: float | None = None, weight_decay: float = 0.01
    ) -> list[dict[str, Any]]:
        """Trainable parameters in groups for an optimizer (image encoder, LoRA adapters, the rest).

        Args:
            lr: learning rate of everything but the image encoder's own weights (LoRA adapters
                are new weights, so they take ``lr`` wherever they sit).
            encoder_lr: learning rate of the image encoder (default ``lr``).
            weight_decay: AdamW weight decay (not applied to norms, biases and embeddings).

        Raises:
            ValueError: nothing trains (an optimizer needs parameters).
        """

        adapters = adapter_parameter_names(self)
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "lora" if name in adapters else "image_encoder" if name.startswith("image_encoder.") else "rest"
            no_decay = p.ndim <= 1 or "pos_embed" in name or name.endswith("_embed") or "tpos_enc" in name
            groups.setdefault((part, no_decay), []).append(p)
        if not groups:
            raise ValueError(
                f"Nothing to train: trainable is {list(getattr(self, 'trainable', ()))} and there are no LoRA "
                "adapters. Name groups to train (e.g. 'frozen', ['mask_decoder']) or set lora_rank > 0."
            )
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

    def cache_encoder_features(self, max_slices: int, device: str | torch.device = "cpu") -> InContextSAM2Train:
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
                "Caching image features needs a frozen image encoder (trainable without 'image_encoder', e.g. "
                "'frozen', and no LoRA target in it); the encoder is trainable, so its features change every step. "
                "Set feature_cache_slices to 0 or freeze it."
            )

    def _episode_features(
        self, images: torch.Tensor, keys: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor]]:
        """sam2 ``backbone_out`` levels for ``(N, 3, H, W)`` images, from the feature cache where it has them."""

        def encode(x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
            outs = [
                self.encode_slices(x[i : i + self.encoder_batch_size])
                for i in range(0, x.shape[0], self.encoder_batch_size)
            ]
            return {
                key: [torch.cat([o[key][lvl] for o in outs]) for lvl in range(len(outs[0][key]))]
                for key in ("backbone_fpn", "vision_pos_enc")
            }

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
        as :meth:`~model_core.modeling.network.InContextSAM2.build_support_memory`); query slices are tracked in order
        with
        memory attention, as in SAM2's training. Prompted query slices also become
        conditioning frames.

        Args:
            support_images: ``(B, S, 3, H, W)`` in [0, 1].
            support_masks: ``(B, S, K, H, W)`` bool.
            query_images: ``(B, Q, 3, H, W)`` in [0, 1].
            query_prompts: Q entries, each None or SAM2 ``point_inputs`` for the ``B*K``
                tracks (``point_coords (B*K, P, 2)``, ``point_labels (B*K, P)``), e.g. from
                :class:`~model_core.training.prompts.PromptSampler`.
            support_keys, query_keys: optional ``(B, S)`` and ``(B, Q)`` int64 slice ids
                (from :class:`~model_core.training.episodes.EpisodeSampler`); with a feature cache
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
        masks = self.check_masks(support_masks.flatten(0, 1), B * S, "support masks").view(
            B, S, K, *support_masks.shape[-2:]
        )
        N = B * K
        keys = None
        if support_keys is not None and query_keys is not None:
            keys = torch.cat([torch.as_tensor(support_keys).flatten(), torch.as_tensor(query_keys).flatten()])
        feats = self._episode_features(torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)]), keys)

        def frame(index_of_b) -> tuple:
            idx = torch.tensor([index_of_b(b) for b in range(B)], device=self.device).repeat_interleave(K)
            sub = {key: [f[idx] for f in feats[key]] for key in feats}
            return self.slice_features(sub)

        support_frames = [frame(lambda b, s=s: b * S + s) for s in range(S)]
        sup_masks = masks.to(self.device).transpose(0, 1).reshape(S, N, *masks.shape[-2:])
        sup = self.encode_support_slices(support_frames, sup_masks)
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
