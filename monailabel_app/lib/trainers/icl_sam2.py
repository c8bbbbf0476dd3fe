"""Fine-tuning through the bundle's train.json on the datastore's labelled volumes, then publishing.

MONAI Label's ``BundleTrainTask`` runs the bundle with the datastore's datalist; what
it leaves to the app is everything specific to this bundle (the classes, presets and
intensity of the served model, the support volume of validation, a training set of at
least two volumes) and publishing: the new weights are written atomically to the
checkpoint the infer tasks serve, which reload them on their next request.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from monailabel.tasks.train.bundle import BundleTrainTask

from model_core.modeling.checkpoint import read_state_dict, write_checkpoint
from model_core.serving.service import ServiceConfig

logger = logging.getLogger(__name__)


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

    def _partition_datalist(self, datalist, request, shuffle=False):
        if len(datalist) < 2:
            raise ValueError(f"Training needs at least two labelled volumes (support and query of an episode come from "
                             f"different volumes); the datastore has {len(datalist)}. Label another one first.")
        n_val = max(1, round(len(datalist) * float(request.get("val_split", 0.2)))) if len(datalist) >= 3 else 0
        train, val = datalist[: len(datalist) - n_val], datalist[len(datalist) - n_val:]
        if not val:  # too few volumes to hold one out: validate on a training volume (logged, not hidden)
            logger.warning("Fewer than 3 labelled volumes: validation uses a training volume.")
            val = train[-1:]
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        """Fine-tuning starts from the served checkpoint through ``pretrained_checkpoint`` (strict), not a loader handler."""

    def _update_overrides(self, overrides: dict[str, Any]) -> None:
        c, r = self.service_config, self._request
        run_dir = os.path.join(self.work_dir, "train")
        classes = sorted(c.labels.values())
        overrides.update({
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
            "validate#support_data": overrides["train#dataset#data"][:1],
            "num_support_slices": int(c.num_support_slices),
        })

    def publish(self, since: float) -> str:
        """Write the run's model (best by validation Dice, else final) to the served checkpoint, atomically."""
        run_dir = os.path.join(self.work_dir, "train")
        best, final = os.path.join(run_dir, "model.pt"), os.path.join(run_dir, "model_final.pt")
        source = best if os.path.isfile(best) and os.path.getmtime(best) >= since else final
        if not os.path.isfile(source) or os.path.getmtime(source) < since:
            raise RuntimeError(f"Training wrote no checkpoint in {run_dir}; nothing to publish.")
        state, record = read_state_dict(source)  # {"model": ..., "icl_sam2": <architecture record>, ...}
        target = self.service_config.checkpoint
        meta = {**record, "preset": self.service_config.preset, "image_size": int(self.service_config.image_size),
                "labels": self.service_config.labels, "published": time.time(), "source": source}
        write_checkpoint(state, target, meta)
        logger.info(f"Published {source} -> {target}")
        return target

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        self._request = {**self.config(), **request}
        since = time.time()
        result = super().__call__(self._request, datastore) or {}
        return {**result, "published": self.publish(since)}
