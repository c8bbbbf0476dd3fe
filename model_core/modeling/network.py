"""The in-context SAM2 network: support memories from ground truth, query volumes by memory attention.

Input contract (the one place it is defined; the bundle and the app resize and scale to it):

- Images: ``(N, 3, H, W)`` with ``H == W == model.image_size``; ``float32`` in ``[0, 1]``
  (CT windowed or MRI percentile-scaled, then replicated or 2.5D stacked to 3
  channels) or ``uint8`` (read as ``value / 255``). ImageNet normalisation is done
  inside the model, as SAM2 was trained with it.
- Masks: ``(N, K, H, W)`` bool (or 0/1) on the same grid, one channel per object.
- Prompts: :class:`~model_core.modeling.prompts.SlicePrompt` in pixels ``(x, y)`` of that grid.
- Outputs: mask logits at the model grid (or any ``output_size``), SAM2's predicted
  IoU and object-score logits per slice and object.

A query volume is handled like one of SAM2's videos, support slices first
(:class:`~model_core.volume_state.PassGeometry` maps slices to frames).

Where things are (sam2's own seams):

- this module: the network (architecture, input contract, support encoding, the
  per-slice tracking step it inherits from ``SAM2Base``);
- :mod:`model_core.predictor`: :class:`~model_core.predictor.VolumePredictor` holds a
  network and owns a volume's state, prompts and propagation (as sam2's
  ``SAM2ImagePredictor(sam_model)`` holds a model);
- :mod:`model_core.training.network`: ``InContextSAM2Train``, the episode ``forward``, the
  frozen-encoder feature cache and what trains (as sam2's training ``SAM2Train``
  subclasses ``SAM2Base``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from sam2.modeling.sam2_base import SAM2Base

from model_core.modeling.encoders import TorchImageEncoder, build_encoder_backend
from model_core.modeling.memory import SupportMemory
from model_core.modeling.precision import PRECISIONS, autocast, resolve_precision

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "InContextSAM2"]

#: what training mode encodes with (the network's own modules, in its precision)
_TORCH_ENCODER = TorchImageEncoder("torch")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _as_float32(value: Any) -> Any:
    """``value`` with every reduced-precision floating tensor (nested in dicts, lists, tuples) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    return value


class InContextSAM2(SAM2Base):
    """SAM2 for in-context segmentation of volumes (a :class:`sam2.modeling.sam2_base.SAM2Base`).

    Args:
        memory_storage_dtype: dtype of stored spatial memories (bfloat16, as SAM2's
            video predictor stores them).
        encoder_batch_size: slices per image-encoder batch; default 8 on CUDA and 1 on
            CPU, where batching measured slower per slice (Hiera-tiny at 512, 2 cores:
            0.34 s/slice at batch 1, 0.42 s at batch 8) and costs memory.
        feature_cache_slices: default LRU size (in slices) of a volume's image features.
        precision: ``"fp32"`` (default: bit-faithful to SAM2), ``"bf16"`` (bfloat16 autocast
            over the image encoder, memory attention, mask decoder and memory encoder, inside
            :meth:`encode_slices`, :meth:`track_step` and :meth:`encode_memory`; what they return
            for callers to keep stays float32) or ``"auto"`` (``bf16`` where the device
            computes it natively, resolved against the current device at each call; see
            :mod:`model_core.modeling.precision`). Settable later (``model.precision = "bf16"``).
        encoder_backend: who computes the image features in eval mode: ``torch`` (default),
            ``torch-bf16``, ``onnxruntime``, ``openvino``, ``openvino-bf16`` or ``auto``
            (:mod:`model_core.modeling.encoders`), or a backend object. Training mode always
            runs the torch modules (gradients). Settable later (``model.encoder_backend = "auto"``).
        encoder_cache_dir: where exported encoders and ``auto``'s probe results are kept
            (default :func:`model_core.modeling.encoders.default_cache_dir`).
        kwargs: :class:`SAM2Base` arguments (from a preset).
    """

    def __init__(
        self,
        memory_storage_dtype: str | torch.dtype = "bfloat16",
        encoder_batch_size: int | None = None,
        feature_cache_slices: int = 16,
        precision: str = "fp32",
        encoder_backend: Any = "torch",
        encoder_cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.precision = precision
        self.encoder_cache_dir = encoder_cache_dir
        self.encoder_backend = encoder_backend
        #: torch.compile mode the network's components run under (``"off"``: eager; see model_core.modeling.compile)
        self.compiled = "off"
        self.memory_storage_dtype = _as_dtype(memory_storage_dtype)
        self._encoder_batch_size = encoder_batch_size
        self.feature_cache_slices = int(feature_cache_slices)
        # not persistent: official checkpoints must load strictly
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.preset = "custom"
        #: number of slices passed through the image encoder (observability for callers and tests)
        self.encoded_slices = 0

    # ------------------------------------------------------------------ helpers
    @property
    def precision(self) -> str:
        """The precision option as set (``"fp32"``, ``"bf16"`` or ``"auto"``; see :attr:`compute_precision`)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        value = "auto" if value is None else str(value).strip().lower()
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {value!r}.")
        self._precision = value

    @property
    def compute_precision(self) -> str:
        """The precision the network computes in on its current device: ``"fp32"`` or ``"bf16"``."""
        return resolve_precision(self._precision, self.device)

    def _autocast(self):
        return autocast(self.compute_precision, self.device)

    @property
    def encoder_backend(self):
        """The backend :meth:`encode_slices` uses in eval mode (an object with ``encode`` and ``describe``)."""
        return self._encoder_backend

    @encoder_backend.setter
    def encoder_backend(self, value: Any) -> None:
        self._encoder_backend = build_encoder_backend(value, cache_dir=self.encoder_cache_dir)

    def describe_encoder(self) -> dict[str, Any]:
        """What computes the image features: the backend's ``describe()`` (for ``auto``, its choice once made)."""
        return self._encoder_backend.describe()

    def position_encodings(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """sam2's positional encodings of ``backbone_fpn`` levels (the neck's, a function of each level's shape)."""
        encode = self.image_encoder.neck.position_encoding
        return [encode(level).to(level.dtype) for level in levels]

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

    @property
    def weights_version(self) -> str:
        """A short id of the loaded weights (a digest of :attr:`architecture`'s checksum), as /info and SEGs name it."""
        return hashlib.sha1(json.dumps(self.architecture["weights"]).encode()).hexdigest()[:12]

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
            sam2's ``backbone_out`` dict (``backbone_fpn``, ``vision_pos_enc`` lists of ``(N, C, h, w)``,
            ``vision_features``); float32, or bfloat16 under ``precision="bf16"`` with the torch
            backend (the features only go back into the network, and stored at half the size).

        In eval mode the :attr:`encoder_backend` computes the levels; in training mode the
        torch modules do, in the network's precision (gradients flow through them).
        """
        x = images.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.pixel_mean) / self.pixel_std
        self.encoded_slices += x.shape[0]
        backend = _TORCH_ENCODER if self.training else self._encoder_backend
        levels = list(backend.encode(self, x))
        return {
            "vision_features": levels[-1],
            "vision_pos_enc": self.position_encodings(levels),
            "backbone_fpn": levels,
        }

    def slice_features(self, backbone_out: dict[str, list[torch.Tensor]]) -> tuple[list, list, list]:
        """``(vision_feats, vision_pos_embeds, feat_sizes)`` as ``track_step`` takes them.

        Args:
            backbone_out: ``backbone_fpn`` / ``vision_pos_enc`` levels of ``(N, C, h, w)``
                (from :meth:`encode_slices`, possibly indexed or expanded to N tracks).
        """
        _, feats, pos, sizes = self._prepare_backbone_features(backbone_out)
        return feats, pos, sizes

    def track_step(self, *args, **kwargs) -> dict[str, Any]:
        """sam2's ``SAM2Base.track_step`` (memory attention, mask decoder and, with
        ``run_mem_encoder``, the memory encoder), computed in the network's precision.

        Under ``bf16`` every tensor of the returned dict (logits, ``obj_ptr``, scores, IoUs,
        memories) is cast back to float32, so callers store what they stored in fp32.
        """
        if self.compute_precision == "fp32":
            return super().track_step(*args, **kwargs)
        with self._autocast():
            out = super().track_step(*args, **kwargs)
        return _as_float32(out)

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
    def best_iou(ious: torch.Tensor) -> torch.Tensor:
        """``(N,)`` predicted IoU of the chosen candidate of ``(N, M)`` (argmax, as SAM2 picks)."""
        return ious.max(dim=-1).values

    def upsample(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """``(N, 1, h, w)`` logits to the model grid, as sam2 upsamples before the memory encoder."""
        size = (self.image_size, self.image_size)
        return F.interpolate(low_res_logits, size=size, mode="bilinear", align_corners=False)

    def encode_memory(
        self,
        vision_feats: list,
        feat_sizes: list,
        low_res_logits: torch.Tensor,
        object_score_logits: torch.Tensor,
        from_points: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A slice's spatial memory from its mask logits (sam2's memory encoder).

        Args:
            vision_feats, feat_sizes: the slice's features for N tracks (:meth:`slice_features`).
            low_res_logits: ``(N, 1, H/4, W/4)`` mask logits.
            object_score_logits: ``(N, 1)``.
            from_points: the mask came from clicks (binarized first when the model's
                ``binarize_mask_from_pts_for_mem_enc`` is set, as SAM2's video predictor does).

        Returns:
            ``(maskmem_features (N, C, h, w), maskmem_pos_enc)``, float32 in either precision.
        """
        if self.compute_precision == "fp32":
            return self._encode_new_memory(
                vision_feats,
                feat_sizes,
                self.upsample(low_res_logits),
                object_score_logits,
                is_mask_from_pts=from_points,
            )
        with self._autocast():
            out = self._encode_new_memory(
                vision_feats,
                feat_sizes,
                self.upsample(low_res_logits.float()),
                object_score_logits,
                is_mask_from_pts=from_points,
            )
        return _as_float32(out)

    def memory_pos_enc(self) -> torch.Tensor:
        """``(1, C, h, w)`` positional encoding of spatial memories (the same for every slice)."""
        h = self.image_size // 16
        dummy = torch.zeros(1, self.mem_dim, h, h, device=self.device)
        return self.memory_encoder.position_encoding(dummy).to(dummy.dtype)

    # ---------------------------------------------------------- support memory
    def encode_support_slices(self, feats_list, masks: torch.Tensor) -> dict[str, torch.Tensor]:
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
            feat, pos = self.encode_memory(
                feats, sizes, out["pred_masks"], out["object_score_logits"], from_points=True
            )
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
        masks = masks.to(self.device)
        maskmem, ptrs, scores, low, pos = [], [], [], [], None
        batch = self.encoder_batch_size
        for s in range(images.shape[0]):
            if s % batch == 0:
                encoded = self.encode_slices(images[s : s + batch])
            levels = {
                key: [f[s % batch : s % batch + 1].expand(K, -1, -1, -1) for f in encoded[key]]
                for key in encoded
                if key in ("backbone_fpn", "vision_pos_enc")
            }
            out = self.encode_support_slices([self.slice_features(levels)], masks[s : s + 1])
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
