"""The service's settings, and the bundle configs its preprocessing and postprocessing come from.

:class:`ServiceConfig` is what a server configures (bundle, checkpoint, preset, device,
intensities, caches); :func:`load_bundle_parser` (from :mod:`model_core.workflows.configs`, re-exported
here) layers ``inference.json`` on ``train.json`` exactly as ``python -m monai.bundle run`` does, so the
app's volumes go through the bundle's own transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from model_core.workflows.configs import load_bundle_parser

__all__ = ["ServiceConfig", "load_bundle_parser"]


@dataclass
class ServiceConfig:
    """What a server configures (MONAI Label's ``--conf``).

    Args:
        bundle_dir: the MONAI bundle whose configs define pre- and postprocessing.
        labels: ``{name: label value}`` of the structures to segment.
        checkpoint: weights to load (reloaded when the file changes); missing = initial weights.
        preset, image_size: the network (see :func:`~model_core.modeling.presets.build_icl_sam2`).
        device: ``cpu`` or ``cuda``.
        modality, window, percentiles: intensity scaling, as in the bundle.
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained.
        max_support_volumes: labelled volumes used as the support set (the most recent first).
        num_support_slices: support slices per class.
        session_cache_mb: memory cap of the interactive sessions: every tensor they hold (the
            preprocessed volume and its model input slices, image features, results), see :func:`held_bytes`.
        max_sessions: at most this many interactive sessions are kept.
        max_preprocessing: requests that read and preprocess a volume at once (a first click on an
            image, in-context segmentation, proposals); each holds its slot until it has answered.
        preprocessing_wait_s: how long a request waits for such a slot before :class:`ServiceBusy`.
        seed: seed of the initial weights when there is no checkpoint, so two starts give the same results.
        incremental: a follow-up click re-runs only the changed slices and propagates outward
            while the result still changes (False: every request replays all clicks over the
            whole volume, the exact mode).
        incremental_patience, incremental_iou: an incremental pass stops after this many
            consecutive slices whose mask agrees with the previous result (IoU at least this).
        stop_after_absent, absent_score: an interactive pass (clicks, alone or on the in-context
            result) stops after this many consecutive slices on which the structures are absent
            (object score logit at most ``absent_score``), so a click costs what the structure
            costs; 0 runs every pass to the volume's end (the full pass). In-context segmentation
            always scans the whole volume. See ``VolumePredictor.propagate``. The default, 2, was
            measured with the tiny preset trained on phantoms (the tests' ``trained_tiny``; 36 clicked
            structures in unseen phantoms of 16 and 48 slices): its object score never dipped to 0 inside
            the region it segmented and fell from present to absent (-0.9) within one slice at both ends,
            so 1 already gave the full pass's masks (Dice at least 0.993 on the structure's slices); 2
            leaves one slice of slack for a structure that fades for a slice, at two slices per pass.
        precision: ``fp32``, ``bf16`` or ``auto`` (:mod:`model_core.modeling.precision`), passed to the network.
        encoder_backend: who computes image features (:mod:`model_core.modeling.encoders`): ``torch``,
            ``torch-bf16``, ``onnxruntime``, ``openvino``, ``openvino-bf16`` or ``auto`` (chosen when the
            network is built).
        encoder_cache_dir: where exported encoders and ``auto``'s probe results are kept (default
            :func:`model_core.modeling.encoders.default_cache_dir`).
        compile: ``off``, ``default``, ``reduce-overhead`` or ``max-autotune`` (:mod:`model_core.modeling.compile`).
    """

    bundle_dir: str
    labels: dict[str, int]
    checkpoint: str | None = None
    preset: str = "sam2.1_hiera_tiny"
    image_size: int = 512
    device: str = "cpu"
    modality: str = "CT"
    window: Sequence[float] = (-200.0, 300.0)
    percentiles: Sequence[float] = (0.5, 99.5)
    channel_mode: str = "replicate"
    max_support_volumes: int = 4
    num_support_slices: int = 3
    session_cache_mb: float = 2048.0
    max_sessions: int = 32
    max_preprocessing: int = 2
    preprocessing_wait_s: float = 30.0
    seed: int = 0
    incremental: bool = True
    incremental_patience: int = 3
    incremental_iou: float = 0.98
    stop_after_absent: int = 2
    absent_score: float = 0.0
    precision: str = "fp32"
    encoder_backend: str = "torch"
    encoder_cache_dir: str | None = None
    compile: str = "off"

    def stopping(self) -> dict[str, Any]:
        """Where an interactive pass stops, as ``VolumePredictor.propagate`` takes it."""
        return {"stop_after_absent": int(self.stop_after_absent), "absent_score": float(self.absent_score)}
