"""The service's settings, and the bundle configs its preprocessing and postprocessing come from.

:class:`ServiceConfig` is what a server configures (bundle, checkpoint, preset, device,
intensities, caches); :func:`load_bundle_parser` (from :mod:`model_core.workflows.configs`, re-exported
here) layers ``inference.json`` on ``train.json`` exactly as ``python -m monai.bundle run`` does, so the
app's volumes go through the bundle's own transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
        precision: ``fp32``, ``bf16`` or ``auto`` (:mod:`model_core.modeling.precision`), passed to the network.
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
    precision: str = "fp32"
