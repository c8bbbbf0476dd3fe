"""Fine-tuning through the bundle's train.json on the datastore's labelled volumes, then publishing.

MONAI Label's ``BundleTrainTask`` runs the bundle with the datastore's datalist; what
it leaves to the app is everything specific to this bundle (the classes, presets and
intensity of the served model, the support volumes of validation, a training set of at
least two volumes) and publishing: the new weights are written atomically to the
checkpoint the infer tasks serve, which reload them on their next request.

What a user sees of a run is ``GET /train/``: MONAI Label runs training in a subprocess
and keeps the last 20 lines of its output as the task's ``details``, and its exit code
as ``DONE`` or ``ERROR``. Deep inside the bundle's config a cause is wrapped several
times ("Failed to instantiate component ...") and its traceback pushes it out of those
20 lines, so here:

- every final label is checked first with the datastore's own rules
  (``model_core.io.validation``); a label that breaks one is left out of the run, and the
  file with the rule it breaks is logged and listed in the run's result
  (``skipped_labels``, the last line of the output, so in ``details``);
- a run that raises, wherever (datalist, episodes, an epoch, validation), ends with one
  :class:`TrainingFailed` whose message is the innermost cause, raised without the
  chain so that its short traceback ends the output; the full traceback goes to the log
  first. Nothing is published then: the served checkpoint stays byte for byte.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Any

from monailabel.tasks.train.bundle import BundleTrainTask

from model_core.io.validation import check_label_volume, image_problem
from model_core.modeling.checkpoint import read_state_dict, write_checkpoint
from model_core.serving.config import ServiceConfig

logger = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """A training run failed; the message names the cause (and the file, where one is to blame)."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain (MONAI's config parser wraps the real one in
    "Failed to instantiate component ..." and "Failed to evaluate ..." errors)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None:
            break
        error = inner
    return error


class ICLSAM2Train(BundleTrainTask):
    """Train task ``icl_sam2``: the bundle's ``run`` workflow, then publish to the served checkpoint.

    Args:
        config: the served model's settings (classes, preset, intensity, checkpoint).
        work_dir: where training runs write their checkpoints and metrics.
    """

    def __init__(self, config: ServiceConfig, work_dir: str, epochs: int = 10, episodes: int = 100):
        super().__init__(config.bundle_dir, conf={})
        self.service_config, self.work_dir = config, work_dir
        self.epochs, self.episodes = int(epochs), int(episodes)
        self.description = "Fine-tune in-context SAM2 on the labelled volumes (bundle train.json) and publish it"
        self._request: dict[str, Any] = {}
        self._skipped: list[dict[str, str]] = []  # final labels left out of this run, with the rule each breaks
        self._present: dict[str, tuple[int, ...]] = {}  # label file -> the configured values it holds

    def config(self) -> dict[str, Any]:
        return {
            "max_epochs": self.epochs,
            "episodes_per_epoch": self.episodes,
            "val_split": 0.2,
            "learning_rate": 5e-5,
            "train_encoder": "frozen",
            "num_support": 3,
            "num_query": 4,
            "device": self.service_config.device,
        }

    def _fetch_datalist(self, request, datastore):
        """The datastore's final labels that follow its rules; any other is left out, named with the rule it breaks."""
        values = sorted(self.service_config.labels.values())
        usable, self._skipped, self._present = [], [], {}
        for item in super()._fetch_datalist(request, datastore):
            try:
                problem = image_problem(item["image"])
                if problem:
                    raise ValueError(f"its image {item['image']!r}: {problem}")
                self._present[item["label"]] = check_label_volume(item["label"], item["image"], values)
            except ValueError as e:  # InputError: the rule it breaks; ValueError: its image's header is unreadable
                logger.warning(f"Training leaves out the final label {item['label']!r}: {e}")
                self._skipped.append({"label": item["label"], "reason": str(e)})
                continue
            usable.append(item)
        return usable

    def _partition_datalist(self, datalist, request, shuffle=False):
        if len(datalist) < 2:
            skipped = "".join(f" Left out: {s['label']!r}: {s['reason']}" for s in self._skipped)
            raise ValueError(
                f"Training needs at least two labelled volumes (support and query of an episode come from "
                f"different volumes); the datastore has {len(datalist)} usable. Label another one first."
                f"{skipped}"
            )
        n_val = max(1, round(len(datalist) * float(request.get("val_split", 0.2)))) if len(datalist) >= 3 else 0
        train, val = datalist[: len(datalist) - n_val], datalist[len(datalist) - n_val :]
        if not val:  # too few volumes to hold one out: validate on a training volume (logged, not hidden)
            logger.warning("Fewer than 3 labelled volumes: validation uses a training volume.")
            val = train[-1:]
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """Fine-tuning starts from the served checkpoint through ``pretrained_checkpoint`` (strict), not a loader
        handler.
        """

    def _update_overrides(self, overrides: dict[str, Any]) -> None:
        c, r = self.service_config, self._request
        run_dir = os.path.join(self.work_dir, "train")
        classes = sorted(c.labels.values())
        overrides.update(
            {
                "ckpt_dir": run_dir,
                "output_dir": os.path.join(run_dir, "outputs"),
                "preset": c.preset,
                "image_size": int(c.image_size),
                "classes": classes,
                "modality": c.modality,
                "intensity#window": list(c.window),
                "intensity#percentiles": list(c.percentiles),
                "channel_mode": c.channel_mode,
                "pretrained_checkpoint": c.checkpoint if c.checkpoint and os.path.isfile(c.checkpoint) else None,
                "max_epochs": int(r.get("max_epochs", self.epochs)),
                "episodes_per_epoch": int(r.get("episodes_per_epoch", self.episodes)),
                "learning_rate": float(r.get("learning_rate", 5e-5)),
                "encoder_learning_rate": float(r.get("learning_rate", 5e-5)) * 0.6,
                "train_encoder": str(r.get("train_encoder", "frozen")),
                "num_support": int(r.get("num_support", 3)),
                "num_query": int(r.get("num_query", 4)),
                "objects_per_episode": min(3, len(classes)),
                "validate#support_data": self._support_volumes(overrides["train#dataset#data"], classes),
                "num_support_slices": int(c.num_support_slices),
            }
        )

    def _support_volumes(self, train: list[dict[str, Any]], classes: list[int]) -> list[dict[str, Any]]:
        """Validation's support set: the first training volume holding the most classes, then others for the classes it
        lacks (validation raises when a class is absent from its support set, though the labels could cover it)."""
        missing, chosen, candidates = set(classes), [], list(train)
        while missing and candidates:
            best = max(candidates, key=lambda item: len(missing & set(self._present.get(item["label"], ()))))
            if not missing & set(self._present.get(best["label"], ())):
                break
            chosen.append(best)
            candidates.remove(best)
            missing -= set(self._present.get(best["label"], ()))
        return chosen or train[:1]

    def run_multi_gpu(self, request, cmd, env):
        """``torchrun`` of the bundle, its output passed through; a failed run raises.

        ``BundleTrainTask._run_command`` ignores the exit code, so a multi-GPU run that
        failed in validation would be published from the checkpoint it saved on the way out.
        """
        logger.info(f"Running {cmd}")
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise RuntimeError(f"The multi-GPU training command exited with code {code}; its output above says why.")

    def publish(self, since: float) -> str:
        """Write the run's model (best by validation Dice, else final) to the served checkpoint, atomically."""
        run_dir = os.path.join(self.work_dir, "train")
        best, final = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "model_final.pt")
        source = best if os.path.isfile(best) and os.path.getmtime(best) >= since else final
        if not os.path.isfile(source) or os.path.getmtime(source) < since:
            raise RuntimeError(f"Training wrote no checkpoint in {run_dir}; nothing to publish.")
        state, record = read_state_dict(source)  # {"model": ..., "icl_sam2": <architecture record>, ...}
        target = self.service_config.checkpoint
        meta = {
            **record,
            "preset": self.service_config.preset,
            "image_size": int(self.service_config.image_size),
            "labels": self.service_config.labels,
            "published": time.time(),
            "source": source,
        }
        write_checkpoint(state, target, meta)
        logger.info(f"Published {source} -> {target}")
        return target

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        """Train, then publish; a failure anywhere is one :class:`TrainingFailed` naming its cause, publishing nothing.

        Returns:
            ``{"published": checkpoint, "skipped_labels": [{"label": file, "reason": rule}]}``.
        """
        self._request = {**self.config(), **request}
        since = time.time()
        try:
            result = super().__call__(self._request, datastore) or {}
        except Exception as e:
            cause = root_cause(e)
            message = (
                f"Training failed, nothing was published (the served checkpoint is unchanged): "
                f"{type(cause).__name__}: {cause}"
            )
            logger.error(message, exc_info=e)  # the whole chain, for the log
            raise TrainingFailed(message) from None  # a short traceback, so the cause ends the output
        return {**result, "published": self.publish(since), "skipped_labels": self._skipped}
