"""Segment a query volume with an in-context SAM2 network: state, prompts, propagation.

:class:`VolumePredictor` holds an :class:`~model_core.modeling.network.InContextSAM2` (composition,
as sam2's ``SAM2ImagePredictor(sam_model)`` holds its model) and owns everything about
one query volume: the :class:`VolumeState`, prompts on slices, propagation through the
volume and the per-slice results. The network stays stateless between calls, so one
network serves training, validation and any number of predictors.

A query volume is handled like one of SAM2's videos. Support slices are conditioning
frames placed before the query (frame indices ``0..S-1``; query slice ``z`` is frame
``S + z``), exactly as if they had been given to ``SAM2VideoPredictor.add_new_mask``
and the query frames tracked by ``propagate_in_video``. Propagation towards lower
slices runs on the mirrored timeline (``S + D - 1 - z``), which is what sam2's
``track_in_reverse`` computes; :class:`PassGeometry` is that mapping, in one place.

What a SAM2 user gets from ``build_sam2_video_predictor`` (its post-processing
defaults) is what this predictor does, with one documented difference (see
:class:`VolumePredictor`). Why not ``SAM2VideoPredictor`` itself: it loads videos from
JPEG folders, keeps every frame's memory and image features for the whole video
(memory grows with depth), runs objects one at a time, has no support set that
outlives a video, and cannot choose which memories to attend to. Here the image
encoder is batched over slices, objects share each slice's features, memory held
during propagation is bounded, and selection policies plug into ``track_step`` via
the ``output_dict`` view it reads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from sam2.utils.misc import fill_holes_in_mask_scores

from model_core.modeling.memory import (
    FrameEntry,
    MemoryBank,
    MemoryPolicy,
    SupportMemory,
)
from model_core.modeling.network import InContextSAM2
from model_core.modeling.prompts import SlicePrompt
from model_core.volume_state import PassGeometry, VolumePrediction, VolumeState

__all__ = ["FILL_HOLE_AREA", "VolumePredictor"]

#: Holes up to this many low-resolution pixels are filled in predicted masks, as
#: ``sam2.build_sam.build_sam2_video_predictor`` sets ``fill_hole_area=8``. sam2 does it
#: with its CUDA extension and skips it (with a warning) where that is not built.
FILL_HOLE_AREA = 8


@dataclass(frozen=True)
class _Stop:
    """When a propagation pass stops (see ``stop_after_absent`` of :meth:`VolumePredictor.propagate`)."""

    after: int  # consecutive absent slices; 0: never
    score: float  # object score logit at or below which an object is absent


@functools.cache
def _sam2_extension_built() -> bool:
    """Whether sam2's CUDA extension (connected components for hole filling) is importable."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class VolumePredictor:
    """In-context and interactive segmentation of query volumes with one network.

    Args:
        network: the :class:`~model_core.modeling.network.InContextSAM2` to run (held, never copied).
        fill_hole_area: fill holes up to this area (low-resolution pixels) in predicted
            masks, as ``build_sam2_video_predictor`` does (0 turns it off).

    Same masks as ``build_sam2_video_predictor(..., apply_postprocessing=True)`` with
    ``add_all_frames_to_correct_as_cond=True`` (every prompted slice is a conditioning
    frame here) for the ``recent`` policy, given a network built by
    :func:`~model_core.modeling.presets.build_icl_sam2` (which sets the predictor's dynamic
    multimask and binarized click memories). One difference, only where sam2's CUDA
    extension fills holes: a memory rebuilt from stored results (when a pass starts
    next to slices tracked earlier by a pass that did not start there) is encoded
    from the hole-filled mask, where SAM2 kept the memory it encoded before filling.
    """

    def __init__(self, network: InContextSAM2, fill_hole_area: int = FILL_HOLE_AREA):
        self.network = network
        self.fill_hole_area = int(fill_hole_area)

    def _fill_holes(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        # sam2's kernel is CUDA-only: elsewhere sam2 skips the step (with a warning per
        # call site), which is what happens here too, without the warning
        if self.fill_hole_area <= 0 or not low_res_logits.is_cuda or not _sam2_extension_built():
            return low_res_logits
        return fill_holes_in_mask_scores(low_res_logits, self.fill_hole_area)

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
            feature_cache_slices: LRU size for image features (default ``self.network.feature_cache_slices``).
            storage_device: where per-slice results are kept.
            share_features_with: an earlier state of the same slices whose image-feature
                cache this one reuses (an interactive session restarting with other prompts
                or objects without encoding the volume again).
        """
        images = self.network.check_images(images, "query images")
        if share_features_with is not None and share_features_with.images.shape != images.shape:
            raise ValueError(
                f"share_features_with holds {tuple(share_features_with.images.shape)} slices, "
                f"not {tuple(images.shape)}: features can only be shared by the same volume."
            )
        if support is not None:
            if support.architecture and support.architecture != self.network.architecture:
                raise ValueError(
                    f"This support memory was built by a different model ({support.architecture}); "
                    f"this model is {self.network.architecture}. Rebuild it with this model."
                )
            if object_ids is not None:
                support = support.select_objects(object_ids)
            support = support.to(self.network.device)
            object_ids = support.object_ids
        elif object_ids is None:
            object_ids = [1]
        if len(object_ids) == 0:
            raise ValueError("Nothing to segment: object_ids is empty.")
        cache = self.network.feature_cache_slices if feature_cache_slices is None else feature_cache_slices
        state = VolumeState(self.network, images, support, object_ids, cache, storage_device)
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

    def _prompt_cond(
        self, state: VolumeState, objects: list[int], geometry: PassGeometry, slices: Any = None
    ) -> dict[int, dict[str, Any]]:
        """Conditioning outputs of prompted slices (the same slices for every object in ``objects``;
        ``slices`` limits them)."""
        out = {}
        for c in sorted(state.cond_outputs[objects[0]] if slices is None else slices):
            rows = [state.cond_outputs[k][c] for k in objects]
            out[geometry.frame_of(c)] = {
                key: (
                    torch.cat([r[key].float() for r in rows])
                    if key != "maskmem_pos_enc"
                    else [rows[0][key][0].expand(len(objects), -1, -1, -1)]
                )
                for key in ("maskmem_features", "maskmem_pos_enc", "obj_ptr", "object_score_logits")
            }
        return out

    def _memory_entry(self, state: VolumeState, z: int, step: int, embedding=None) -> FrameEntry:
        """The spatial memory of an already tracked slice, for a pass that starts next to it.

        It is the memory the slice's tracking encoded where the state kept it (slices within the
        memory window of a pass's start, as SAM2's predictor keeps every frame's memory in its output
        dict), else rebuilt from the stored logits by the memory encoder and kept until the slice's
        result changes: a correction's backward pass then re-encodes none of the slices its forward
        pass just tracked.
        """
        obj_scores = state.object_score_logits[z].to(self.network.device)
        maskmem = state.memories.get(z)
        if maskmem is None:
            feats, _, sizes = state.features.get(z, state.num_objects)
            low = state.low_res_logits[z].to(self.network.device)
            maskmem, _ = self.network.encode_memory(feats, sizes, low, obj_scores, from_points=False)
            maskmem = state.memories[z] = maskmem.to(self.network.memory_storage_dtype)
        return FrameEntry(
            slice_index=z,
            step=step,
            maskmem_features=maskmem,
            obj_ptr=state.obj_ptr[z].to(self.network.device),
            object_score_logits=obj_scores,
            iou=state.iou[z].to(self.network.device),
            embedding=embedding,
        )

    # ------------------------------------------------------------ prompts
    @torch.inference_mode()
    def add_prompt(
        self,
        state: VolumeState,
        slice_index: int,
        obj: Any,
        prompt: SlicePrompt,
        replace: bool = True,
        as_first_pass: bool = False,
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
            as_first_pass: segment the slice as a new state would (no previous mask, no
                memories of tracked neighbours, not its own earlier prompt), so that a
                click list replayed onto a used state gives what replaying it from scratch
                gives (incremental corrections, see ``SegmentationService.interact``).

        Returns:
            ``(H, W)`` mask logits of the object on this slice at the model grid.
        """
        z = self._check_slice(state, slice_index)
        k = self._object_index(state, obj)
        prompt = prompt.validate(self.network.image_size)
        old = state.prompts[k].get(z)
        if not replace and old is not None and prompt.mask is None and old.mask is None:
            if prompt.box is not None:
                raise ValueError("A box must come first: add it with replace=True, then add clicks.")
            points = torch.cat([old.points, prompt.points]) if old.points is not None else prompt.points
            labels = torch.cat([old.labels, prompt.labels]) if old.labels is not None else prompt.labels
            prompt = SlicePrompt(points, labels, old.box).validate(self.network.image_size)
        tracked = not as_first_pass and (bool(state.tracked[z, k]) or z in state.cond_outputs[k])
        is_init_cond = (as_first_pass or not bool(state.tracked[z, k])) and state.support is None
        reverse = bool(state.tracked_reverse[z, k])
        geometry = PassGeometry(z, reverse, state.num_support, state.num_slices)
        output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        if not is_init_cond:
            bank = self._new_bank(MemoryPolicy())
            if not as_first_pass:
                self._warm_bank(state, bank, geometry, exclude_objects=[k])
            prompted = {c: out for c, out in state.cond_outputs[k].items() if not (as_first_pass and c == z)}
            output_dict["cond_frame_outputs"] = {
                **self._support_cond(state, [k]),
                **(self._prompt_cond(state, [k], geometry, prompted) if prompted else {}),
            }
            output_dict["non_cond_frame_outputs"] = bank.view(0, tuple(bank.entries), [k], geometry.frame_at)
        feats, pos, sizes = state.features.get(z, 1)
        prev_logits = None
        if prompt.mask is None and tracked:
            prev_logits = state.low_res_logits[z, k : k + 1].to(self.network.device).clamp(-32.0, 32.0)
        out = self.network.track_step(
            frame_idx=geometry.frame_of(z),
            is_init_cond_frame=is_init_cond,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            point_inputs=prompt.point_inputs(self.network.device),
            mask_inputs=None if prompt.mask is None else prompt.mask[None, None].float().to(self.network.device),
            output_dict=output_dict,
            num_frames=geometry.num_frames,
            run_mem_encoder=False,
            prev_sam_mask_logits=prev_logits,
        )
        out["pred_masks"] = self._fill_holes(out["pred_masks"])
        # as SAM2's predictor encodes a prompted frame's memory (propagate_in_video_preflight):
        # from the hole-filled mask, binarized when the model says so
        maskmem, maskmem_pos = self.network.encode_memory(
            feats, sizes, out["pred_masks"], out["object_score_logits"], from_points=True
        )
        state.prompts[k][z] = prompt
        state.cond_outputs[k][z] = {
            "maskmem_features": maskmem.to(self.network.memory_storage_dtype),
            "maskmem_pos_enc": maskmem_pos,
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
        }
        self._store(state, z, [k], out)
        return self.network.upsample(out["pred_masks"])[0, 0]

    def _new_bank(self, policy: MemoryPolicy) -> MemoryBank:
        net = self.network
        return MemoryBank(
            policy,
            net.num_maskmem,
            net.max_obj_ptrs_in_encoder,
            net.memory_temporal_stride_for_eval,
            net.memory_pos_enc(),
        )

    @property
    def _spatial_reach(self) -> int:
        """Steps from a slice within which SAM2 attends to a slice's spatial memory (plus one)."""
        return (self.network.num_maskmem - 1) * self.network.memory_temporal_stride_for_eval + 1

    def _warm_bank(self, state, bank, geometry: PassGeometry, ground_truth=None, exclude_objects=()):
        """Fill ``bank`` with memories of tracked slices behind the pass's start, rebuilt from stored results.

        This is what SAM2's predictor reads from its ever-growing output dict when a
        pass starts next to frames tracked earlier (the other direction of a
        bidirectional run, or a re-propagation after a correction); here only the
        window SAM2 can attend to is rebuilt. Slices that are conditioning frames of
        ``exclude_objects`` are skipped, as the predictor holds no non-conditioning
        output for them.
        """
        spatial = self._spatial_reach
        window = max(self.network.max_obj_ptrs_in_encoder, spatial)
        for d in range(window - 1, 0, -1):
            y = geometry.slice_at(-d)
            if not (0 <= y < state.num_slices) or not bool(state.tracked[y].all()):
                continue
            if any(y in state.cond_outputs[k] for k in exclude_objects):
                continue
            if d < spatial:
                entry = self._memory_entry(state, y, geometry.step_of(y))
            else:  # too far for a spatial memory: only its object pointer is used
                entry = FrameEntry(
                    slice_index=y,
                    step=geometry.step_of(y),
                    maskmem_features=None,
                    obj_ptr=state.obj_ptr[y].to(self.network.device),
                    object_score_logits=state.object_score_logits[y].to(self.network.device),
                    iou=state.iou[y].to(self.network.device),
                )
            if ground_truth is not None:
                entry.true_iou = self._true_iou(state.low_res_logits[y], ground_truth[y])
            bank.add(entry)

    def _store(self, state: VolumeState, z: int, objects: list[int], out: dict[str, Any]) -> None:
        idx = torch.tensor(objects)
        dev = state.low_res_logits.device
        state.memories.pop(z, None)  # made from the result this replaces
        state.low_res_logits[z, idx] = out["pred_masks"].to(dev, torch.float32)  # hole-filled, as SAM2 stores them
        state.obj_ptr[z, idx] = out["obj_ptr"].to(dev, torch.float32)
        state.object_score_logits[z, idx] = out["object_score_logits"].to(dev, torch.float32)
        state.iou[z, idx] = self.network.best_iou(out["ious"]).to(dev, torch.float32)

    # ------------------------------------------------------------ propagation
    def propagate(
        self,
        state: VolumeState,
        start_slice: int | None = None,
        direction: str = "both",
        policy: MemoryPolicy | None = None,
        ground_truth: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        warm_start: bool = True,
        stop_after_absent: int = 0,
        absent_score: float = 0.0,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Segment the volume slice by slice, streaming results.

        Slices are encoded as a pass reaches them (batched ahead up to the network's
        ``encoder_batch_size``, never past where a stopping pass must still go) and kept in the
        state's feature cache, so a pass that stops early encodes only the slices it reached.

        Args:
            state: from :meth:`init_state` (with support and/or prompts).
            start_slice: first slice (default: the lowest prompted slice, else 0).
            direction: ``forward`` (increasing slice index), ``backward`` or ``both``
                (forward from the start, then backward from it, as SAM2 does).
            policy: memory selection (default ``recent``, SAM2's rule).
            ground_truth: ``(D, K, H, W)`` bool, required by the ``oracle`` policy.
            output_size: ``(H, W)`` of the yielded logits (default the model grid).
            warm_start: the first pass attends to memories of slices tracked earlier behind
                its start (rebuilt from stored results), as SAM2's predictor does; False
                starts it from prompts and support only, as on a new state (a replay).
                A ``both`` run's second pass always uses the first pass's slices.
            stop_after_absent: N > 0 stops each pass after N consecutive slices on which every
                object is absent (object score logit at most ``absent_score``), once the pass has
                gone past every prompted slice ahead of it; the slices beyond are left untracked,
                with no object (:meth:`VolumeState.forget`). 0 (default) runs every pass to the
                volume's end, as SAM2's predictor does. SAM2 itself empties a slice's mask where
                the score is at most 0, so with the default ``absent_score`` the pass stops after
                N empty slices; N is the slack for a structure that fades out and comes back.
            absent_score: the object score logit at or below which an object counts as absent.

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
            if (
                not isinstance(ground_truth, torch.Tensor)
                or ground_truth.ndim != 4
                or tuple(ground_truth.shape[:2]) != expected
            ):
                raise ValueError(f"ground_truth must be (D, K, H, W) with (D, K) = {expected}.")
            ground_truth = ground_truth.bool()
        if start_slice is None:
            prompted = [z for k in range(state.num_objects) for z in state.cond_outputs[k]]
            start_slice = min(prompted) if prompted else 0
        start = self._check_slice(state, start_slice)
        output_size = tuple(output_size or (self.network.image_size, self.network.image_size))
        passes = {"forward": [False], "backward": [True], "both": [False, True]}[direction]
        if isinstance(stop_after_absent, bool) or not isinstance(stop_after_absent, int) or stop_after_absent < 0:
            raise ValueError(f"stop_after_absent must be a whole number of slices >= 0, got {stop_after_absent!r}.")
        if not isinstance(absent_score, (int, float)) or not math.isfinite(absent_score):
            raise ValueError(f"absent_score must be a finite object score logit, got {absent_score!r}.")
        stop = _Stop(stop_after_absent, float(absent_score))
        # arguments are checked above, when propagate() is called; the work runs lazily
        return self._propagate_passes(state, start, passes, policy, ground_truth, output_size, warm_start, stop)

    @torch.inference_mode()
    def _propagate_passes(self, state, start, passes, policy, ground_truth, output_size, warm_start, stop):
        for i, reverse in enumerate(passes):
            yield from self._propagate_pass(
                state, start, reverse, policy, ground_truth, output_size, warm_start or i > 0, stop
            )

    def _propagate_pass(self, state, start, reverse, policy, ground_truth, output_size, warm_start, stop):
        K = state.num_objects
        geometry = PassGeometry(start, reverse, state.num_support, state.num_slices)
        order = geometry.order()
        bank = self._new_bank(policy)
        if warm_start:
            self._warm_bank(state, bank, geometry, ground_truth)
        # the pass goes at least as far as the farthest prompted slice ahead of it (any object)
        last_prompt = max((geometry.step_of(c) for outputs in state.cond_outputs for c in outputs), default=0)
        absent_run = 0
        for i, z in enumerate(order):
            # a stopping pass surely reaches the next `after - absent_run` slices: encode no further ahead
            ahead = self.network.encoder_batch_size
            if stop.after:
                ahead = max(min(ahead, stop.after - absent_run), 1)
            state.features.prefetch(order[i : i + ahead])
            step = geometry.step_of(z)
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
                    excluded = {geometry.step_of(c) for c in cond_slices}
                    sel = tuple(s for s in sel if s not in excluded)
                    output_dict = {
                        "cond_frame_outputs": {
                            **self._support_cond(state, objs),
                            **(self._prompt_cond(state, objs, geometry) if cond_slices else {}),
                        },
                        "non_cond_frame_outputs": bank.view(step, sel, objs, geometry.frame_at),
                    }
                    feats, pos, sizes = state.features.get(z, len(objs))
                    out = self.network.track_step(
                        frame_idx=geometry.frame_of(z),
                        is_init_cond_frame=False,
                        current_vision_feats=feats,
                        current_vision_pos_embeds=pos,
                        feat_sizes=sizes,
                        point_inputs=None,
                        mask_inputs=None,
                        output_dict=output_dict,
                        num_frames=geometry.num_frames,
                        run_mem_encoder=True,
                    )
                    out["pred_masks"] = self._fill_holes(out["pred_masks"])
                    self._store(state, z, objs, out)
                    if maskmem is None:
                        shape = (K, *out["maskmem_features"].shape[1:])
                        maskmem = torch.zeros(
                            shape, dtype=self.network.memory_storage_dtype, device=self.network.device
                        )
                    maskmem[torch.tensor(objs)] = out["maskmem_features"].to(self.network.memory_storage_dtype)
            state.tracked[z] = True
            state.tracked_reverse[z] = reverse
            if maskmem is not None and not cond_objs and 0 < step < self._spatial_reach:
                state.memories[z] = maskmem  # what a pass from this start the other way attends to
            if maskmem is not None:
                entry = FrameEntry(
                    slice_index=z,
                    step=step,
                    maskmem_features=maskmem,
                    obj_ptr=state.obj_ptr[z].to(self.network.device),
                    object_score_logits=state.object_score_logits[z].to(self.network.device),
                    iou=state.iou[z].to(self.network.device),
                    embedding=embedding,
                )
                if policy.name == "oracle":
                    entry.true_iou = self._true_iou(state.low_res_logits[z], ground_truth[z])
                bank.add(entry)
            logits = state.low_res_logits[z].to(self.network.device)
            if tuple(logits.shape[-2:]) != output_size:
                logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
            if stop.after:
                absent = bool((state.object_score_logits[z, :, 0] <= stop.score).all())
                absent_run = absent_run + 1 if absent else 0
            yield z, logits
            if stop.after and absent_run >= stop.after and i >= last_prompt:
                state.forget(order[i + 1 :])
                return

    def _true_iou(self, low_res_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        pred = F.interpolate(low_res_logits.float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > 0
        gt = gt.to(pred.device)
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).to(self.network.device)

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
        stop_after_absent: int = 0,
        absent_score: float = 0.0,
        on_slice: Callable[[int], Any] | None = None,
    ) -> VolumePrediction:
        """Segment a query volume in one call (every slice, unless ``stop_after_absent`` stops it).

        Args:
            images: ``(D, 3, H, W)`` query slices (input contract).
            support: support memory from the network's ``build_support_memory`` (in-context).
            prompts: ``{(slice, object_id): SlicePrompt}`` clicks/boxes/masks, alone or on top of the support.
            object_ids: subset of objects (default all of the support's, or those prompted).
            policy: memory selection policy (default ``recent``).
            start_slice, direction: see :meth:`propagate` (default ``forward`` from 0
                with support only, ``both`` from the first prompted slice with prompts).
            ground_truth: ``(D, K, H, W)`` for the ``oracle`` policy.
            output_size: ``(H, W)`` of the output masks (default the model grid).
            return_logits: also return float16 logits.
            stop_after_absent, absent_score: stop each pass where the objects end (see
                :meth:`propagate`; default: every slice); slices not reached are empty.
            on_slice: called with each slice's index once it is segmented (e.g. a progress bar's update).
        """
        if object_ids is None and support is None:
            object_ids = sorted({o for (_, o) in (prompts or {})}) or [1]
        state = self.init_state(images, support, object_ids)
        for (z, obj), prompt in (prompts or {}).items():
            self.add_prompt(state, z, obj, prompt)
        direction = direction or ("both" if prompts else "forward")
        K, D = state.num_objects, state.num_slices
        H, W = output_size or (self.network.image_size, self.network.image_size)
        masks = torch.zeros(K, D, H, W, dtype=torch.bool)
        logits_out = torch.zeros(K, D, H, W, dtype=torch.float16) if return_logits else None
        for z, logits in self.propagate(
            state,
            start_slice,
            direction,
            policy,
            ground_truth,
            (H, W),
            stop_after_absent=stop_after_absent,
            absent_score=absent_score,
        ):
            masks[:, z] = (logits[:, 0] > 0).cpu()
            if logits_out is not None:
                logits_out[:, z] = logits[:, 0].to(torch.float16).cpu()
            if on_slice is not None:
                on_slice(z)
        present = state.object_score_logits[..., 0]
        return VolumePrediction(
            masks=masks,
            iou=torch.where(present > 0, state.iou, torch.zeros_like(state.iou)).cpu(),
            object_score_logits=present.cpu(),
            object_ids=state.object_ids,
            logits=logits_out,
        )
