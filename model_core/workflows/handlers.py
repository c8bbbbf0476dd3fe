"""Ignite handlers the bundle's engines attach: gradient clipping, confidence files, progress bars, the training curve.

Ignite's and MONAI's trainers have no clipping option that sees the ``GradScaler``; MONAI
has no handler that writes a per-case confidence beside a saved label; Ignite's ``ProgressBar``
draws a bar wherever it runs (a CI log gets a line per refresh), and MONAI's ``MetricLogger``
keeps the loss and the validation metrics in memory only.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, TextIO

import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.engines.utils import IterationEvents
from monai.handlers import MetricLogger

from model_core.io.files import atomic_path
from model_core.workflows.inferers import InContextInferer

__all__ = ["ConfidenceSaver", "GradientClipHandler", "TerminalProgressBar", "TrainingCurve", "is_terminal"]


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress bars belong on ``stream`` (default ``sys.stderr``, where tqdm draws): a terminal, and
    ``TQDM_DISABLE`` unset (the tests and benchmarks set it). CI logs and captured output get plain lines instead.
    """
    stream = sys.stderr if stream is None else stream
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


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


class TerminalProgressBar:
    """Ignite's ``ProgressBar`` on an engine when the output is a terminal (:func:`is_terminal`); nothing otherwise.

    In a terminal the bar replaces the per-iteration log lines (the bundle turns ``StatsHandler``'s
    ``iteration_log`` off there with the same test); in a CI log or a captured output, where a bar
    would print one line per refresh, the engine keeps ``StatsHandler``'s plain lines.

    Args:
        desc: the bar's title (``training``, ``validation``, ``inference``).
        output_transform: engine output to the values shown beside the bar (e.g. ``{"loss": ...}``).
        persist: keep the finished bar on screen (default: cleared at the end of each epoch).
    """

    def __init__(self, desc: str = "", output_transform: Callable[[Any], Any] | None = None, persist: bool = False):
        self.desc, self.output_transform, self.persist = desc, output_transform, bool(persist)
        #: the Ignite bar once attached (None when the output is not a terminal)
        self.bar: ProgressBar | None = None

    def attach(self, engine) -> None:
        stream = sys.stderr
        if not is_terminal(stream):
            return
        # tqdm reads TQDM_* variables when it is imported; the choice made here, at attach time, wins
        self.bar = ProgressBar(persist=self.persist, desc=self.desc, file=stream, disable=False)
        self.bar.attach(engine, output_transform=self.output_transform)


def _loss_of(output: Any) -> float:
    """The loss of a trainer's output, decollated (a list of dicts) or not (a dict)."""
    item = output[0] if isinstance(output, (list, tuple)) else output
    loss = item["loss"]
    return float(loss.detach().mean()) if isinstance(loss, torch.Tensor) else float(loss)


class TrainingCurve(MetricLogger):
    """MONAI's ``MetricLogger`` that also writes the curve to a JSON file after every epoch (atomically).

    The file is ``{"epochs": [{"epoch", "iteration", "loss" (mean over the epoch), <metric>: value}],
    "iterations": [[iteration, loss], ...]}``; the validation metrics come from ``evaluator`` (the
    trainer's ``ValidationHandler`` runs it when an epoch ends; a validation before training, Ignite's
    ``exec_at_start``, is epoch 0). Plots read it (:func:`model_core.io.pictures.training_curve_png`), and a
    run that stops early leaves the epochs it finished.

    Args:
        path: the JSON file.
        evaluator: the validation evaluator whose scalar metrics to record.
        loss_transform: the trainer's output to a float loss (default: its ``loss``, decollated or not).
    """

    def __init__(self, path: str, evaluator=None, loss_transform: Callable[[Any], Any] = _loss_of):
        super().__init__(loss_transform=loss_transform, evaluator=evaluator)
        self.path = str(path)
        self.epochs: list[dict[str, Any]] = []
        self._epoch_start = 0  # index into self.loss where the current epoch began
        self._pending: dict[str, float] = {}  # metrics of a validation that ran before its epoch was recorded
        if evaluator is not None:
            evaluator.add_event_handler(Events.COMPLETED, self._metrics_arrived)

    def attach(self, engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_completed(self, engine) -> None:
        losses = [float(v) for _, v in self.loss[self._epoch_start :]]
        self._epoch_start = len(self.loss)
        entry = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)}
        entry["loss"] = sum(losses) / len(losses) if losses else None
        self.epochs.append({**entry, **self._pending})
        self._pending = {}
        self.write()

    def _metrics_arrived(self, evaluator) -> None:
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        if not self.loss and not self.epochs:  # before the first iteration: the untrained model
            self.epochs.append({"epoch": 0, "iteration": 0, "loss": None, **metrics})
        elif self.epochs and self.epochs[-1]["iteration"] == self.iteration:  # after its epoch was recorded
            self.epochs[-1].update(metrics)
        else:  # the trainer's ValidationHandler ran before this handler saw the epoch end
            self._pending = metrics
            return
        self.write()

    def write(self) -> None:
        """Write the curve so far to :attr:`path`."""
        record = {"epochs": self.epochs, "iterations": [[int(i), float(v)] for i, v in self.loss]}
        with atomic_path(self.path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)
