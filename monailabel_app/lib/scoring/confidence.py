"""Scoring: per-volume confidence of the in-context model on every unlabelled image."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.datastore import labelled_volumes
from model_core.io.validation import image_problem
from model_core.serving.service import SegmentationService

logger = logging.getLogger(__name__)

#: image-info key the scores are stored under (read by the confidence strategy)
SCORE_KEY = "icl_sam2_confidence"


class InContextConfidence(ScoringMethod):
    """Segment each unlabelled image in context and store its confidence (mean over structures of
    predicted IoU x object presence) in the datastore's image info.

    Scores are recomputed when the model or the support set changed since they were stored.
    An image that cannot be segmented is skipped, not fatal: the reason is logged, stored
    as ``{"failed": reason}`` (so the strategy never proposes it) and listed in the answer.
    """

    def __init__(self, service: Callable[[], SegmentationService], labels: dict[str, int]):
        super().__init__("Confidence of the in-context model on each unlabelled image")
        self._service, self._labels = service, dict(labels)

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any]:
        labelled, skipped_support = labelled_volumes(datastore, self._labels.values())
        if not labelled:
            return {
                "scored": 0,
                "reason": "no labelled volume yet: nothing to segment in context",
                "skipped_support": skipped_support,
            }
        service = self._service()
        version = service.model_info()["model_version"]
        support = sorted(d["id"] for d in labelled[: service.config.max_support_volumes])
        scored, failed = {}, {}
        for image_id in datastore.get_unlabeled_images():
            previous = datastore.get_image_info(image_id).get(SCORE_KEY) or {}
            if (
                previous.get("model_version") == version
                and previous.get("support") == support
                and not request.get("force")
            ):
                if "mean" in previous:
                    scored[image_id] = previous["mean"]
                else:
                    failed[image_id] = previous.get("failed", "failed before")
                continue
            path = datastore.get_image_uri(image_id)
            try:
                problem = image_problem(path) if path else "its file is missing"
                if problem:
                    raise ValueError(problem)
                seg = service.segment(path, labelled, wait_s=math.inf)  # batch work queues, never busy
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                logger.warning(f"Scoring skipped {image_id!r}: {reason}")
                failed[image_id] = reason
                datastore.update_image_info(
                    image_id, {SCORE_KEY: {"failed": reason, "model_version": version, "support": support}}
                )
                continue
            mean = sum(seg.confidence.values()) / max(len(seg.confidence), 1)
            datastore.update_image_info(
                image_id,
                {
                    SCORE_KEY: {
                        "mean": round(mean, 4),
                        "per_label": seg.confidence,
                        "model_version": version,
                        "support": support,
                    }
                },
            )
            scored[image_id] = round(mean, 4)
            logger.info(f"confidence of {image_id}: {mean:.4f}")
        return {"scored": len(scored), "confidence": scored, "skipped": failed, "skipped_support": skipped_support}
