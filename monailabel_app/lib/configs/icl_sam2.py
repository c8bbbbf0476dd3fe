"""Model ``icl_sam2``: in-context and interactive infer tasks, training, scoring and strategy, one network."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from monailabel.interfaces.config import TaskConfig

from lib.activelearning.confidence import LeastConfidence
from lib.infers.icl_sam2 import InContextInfer, InteractiveInfer
from lib.scoring.confidence import InContextConfidence
from lib.settings import OPTIONS, apply_malloc_threshold, service_config, verify_checkpoint
from lib.trainers.icl_sam2 import ICLSAM2Train
from model_core.modeling.checkpoint import checkpoint_record
from model_core.modeling.precision import cpu_bf16_capability
from model_core.serving.service import SegmentationService

logger = logging.getLogger(__name__)


class ICLSAM2(TaskConfig):
    """All tasks share one :class:`SegmentationService` (one network, one support cache), built on first use so
    that the server starts fast and MONAI Label's training/scoring subprocesses only load what they use."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        apply_malloc_threshold(conf)  # process-wide: transient volumes go back to the system when freed
        self.settings = service_config(conf, kwargs.get("app_dir") or os.path.dirname(os.path.dirname(model_dir)))
        self.labels = dict(self.settings.labels)
        self.datastore = kwargs.get("datastore")
        self._service: SegmentationService | None = None
        self._lock = threading.Lock()
        self._status: tuple[Any, dict[str, Any]] | None = None
        checkpoint = self.settings.checkpoint
        if not os.path.isfile(checkpoint):
            logger.warning(
                f"No checkpoint at {checkpoint}: the icl_sam2 models run UNTRAINED (initial) weights "
                f"(seed {self.settings.seed}). Train from the app, or pass --conf checkpoint <file>."
            )
        verify_checkpoint(self.settings)  # a checkpoint that does not fit stops the server here, not every request

    def status(self) -> dict[str, Any]:
        """The weights served: checkpoint, its preset and image size, and whether they are trained (no model load)."""
        path = self.settings.checkpoint
        stamp = (os.stat(path).st_mtime_ns, os.stat(path).st_size) if os.path.isfile(path) else None
        if self._status is None or self._status[0] != stamp:
            record = {}
            if stamp is not None:
                try:
                    record = checkpoint_record(path)
                except ValueError as e:  # e.g. being replaced right now: the next request reads it again
                    logger.warning(f"Cannot read the record of {path}: {e}")
            status = {
                "checkpoint": path if stamp else None,
                "trained": stamp is not None,
                "preset": self.settings.preset,
                "image_size": int(self.settings.image_size),
                "trained_as": {k: record.get(k) for k in ("preset", "image_size", "classes", "modality")}
                if record
                else None,
                **self.compute(),
            }
            self._status = (stamp, status)
        return {**self._status[1], "encoder": self.encoder()}

    def encoder(self) -> dict[str, Any]:
        """The image-encoder backend: the option, and what computes once the network is loaded (``auto``'s choice)."""
        service = self._service
        chosen = service.encoder_info() if service is not None else None
        return {
            "encoder_backend": self.settings.encoder_backend,
            "compile": self.settings.compile,
            "backend": chosen if chosen is not None else {"name": self.settings.encoder_backend, "note": "not loaded"},
        }

    def compute(self) -> dict[str, Any]:
        """Device and precision served (``--conf device``/``precision``), with the CPU's bfloat16 support."""
        cpu = cpu_bf16_capability()
        return {
            "device": str(self.settings.device),
            "precision": self.settings.precision,
            "cpu_bf16": {k: cpu[k] for k in ("amx_bf16", "avx512_bf16", "processor")},
        }

    def describe(self) -> str:
        """One line for the model's description, which Slicer and OHIF display."""
        s = self.status()
        arch = f"preset {s['preset']} at {s['image_size']} px"
        cpu = s["cpu_bf16"]
        backend = s["encoder"]["backend"]
        encoder = backend.get("chosen") or backend["name"]
        compute = (
            f"; {s['precision']} on {s['device']}, image encoder {encoder}"
            f"{' (auto)' if s['encoder']['encoder_backend'] == 'auto' else ''} "
            f"(CPU AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}, "
            f"AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'})"
        )
        if s["trained"]:
            return f"weights: {os.path.basename(s['checkpoint'])} ({arch}){compute}"
        return (
            f"weights: UNTRAINED, random initial weights (seed {self.settings.seed}; {arch}): train from "
            f"the app first{compute}"
        )

    def service(self) -> SegmentationService:
        with self._lock:
            if self._service is None:
                self._service = SegmentationService(self.settings)
            return self._service

    def invalidate_support(self) -> None:
        """Forget the support memory (a label was saved); nothing to do before the service exists."""
        if self._service is not None:
            self._service.invalidate_support()

    def infer(self):
        return {
            self.name: InContextInfer(self.service, self.datastore, self.labels, self.describe),
            f"{self.name}_interactive": InteractiveInfer(self.service, self.datastore, self.labels, self.describe),
        }

    def trainer(self):
        # training runs beside the served checkpoint (published there when done)
        return ICLSAM2Train(
            self.settings,
            os.path.join(os.path.dirname(self.settings.checkpoint), f"{self.name}_training"),
            epochs=int(self.conf.get("train_epochs", OPTIONS["train_epochs"][0])),
            episodes=int(self.conf.get("train_episodes", OPTIONS["train_episodes"][0])),
        )

    def strategy(self):
        return {"confidence": LeastConfidence()}

    def scoring_method(self):
        return {f"{self.name}_confidence": InContextConfidence(self.service, self.labels)}
