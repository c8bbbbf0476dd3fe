"""Ignite handlers the bundle's engines attach: gradient clipping inside ``SupervisedTrainer``, confidence files.

Ignite's and MONAI's trainers have no clipping option that sees the ``GradScaler``; MONAI
has no handler that writes a per-case confidence beside a saved label.
"""

from __future__ import annotations

import json
import os

import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents

from model_core.io.files import atomic_path
from model_core.workflows.inferers import InContextInferer

__all__ = ["ConfidenceSaver", "GradientClipHandler"]


class GradientClipHandler:
    """Clip the gradient norm between backward and the optimizer step of a MONAI trainer.

    Under mixed precision ``SupervisedTrainer`` backpropagates the loss multiplied by
    its ``GradScaler``'s scale (2**16 at start) and unscales only inside
    ``scaler.step``; the gradients are unscaled here first (``scaler.unscale_``, as
    sam2's own trainer does before clipping), so ``max_norm`` bounds the true gradient
    and ``scaler.step`` does not unscale them again. ``engine.state.grad_norm`` is the
    unscaled norm before clipping (inf or nan when the scaler found an overflow; that
    step is then skipped by the scaler).

    Args:
        max_norm: maximum total norm (SAM2 fine-tuning uses 0.1).
        norm_type: the p of the p-norm.
    """

    def __init__(self, max_norm: float = 0.1, norm_type: float = 2.0):
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @staticmethod
    def _check(engine) -> None:
        if int(getattr(engine, "accumulation_steps", 1)) > 1:
            raise ValueError(
                "GradientClipHandler clips after every backward pass; with accumulation_steps > 1 it would "
                "clip (and unscale) partial sums. Use accumulation_steps 1 or clip elsewhere."
            )

    def __call__(self, engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled():
            scaler.unscale_(engine.optimizer)
        params = [p for p in engine.network.parameters() if p.grad is not None]
        engine.state.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type))


class ConfidenceSaver:
    """Write each query's per-class confidence to ``<name>_confidence.json`` beside its label map.

    Confidence per class is the mean, over slices where the class is predicted, of
    predicted IoU x object presence (see ``VolumePrediction.confidence``).

    Args:
        inferer: the :class:`InContextInferer` of the evaluator.
        output_dir: where the label maps are written.
        class_names: optional ``{name: label value}`` for readable keys.
    """

    def __init__(self, inferer: InContextInferer, output_dir: str, class_names: dict[str, int] | None = None):
        self.inferer, self.output_dir = inferer, output_dir
        self.names = {int(v): k for k, v in (class_names or {}).items()}

    def attach(self, engine) -> None:

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        images = (
            engine.state.batch["image"]
            if isinstance(engine.state.batch, dict)
            else [b["image"] for b in engine.state.batch]
        )
        os.makedirs(self.output_dir, exist_ok=True)
        for image, confidence in zip(images, self.inferer.last_confidence):
            source = str(image.meta.get("filename_or_obj", "volume"))
            name = os.path.basename(os.path.normpath(source))
            # named as MONAI's SaveImaged names the label map (a DICOM series folder keeps its whole name)
            stem = (
                name if os.path.isdir(source) else name[:-7] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
            )
            values = {
                self.names.get(int(c), str(c)): round(float(v), 4)
                for c, v in zip(self.inferer.support.object_ids, confidence)
            }
            path = os.path.join(self.output_dir, f"{stem}_confidence.json")
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump({"image": source, "confidence": values}, f, indent=2)
