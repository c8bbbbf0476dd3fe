"""Strategy: the unlabelled image the in-context model is least sure of."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.confidence import SCORE_KEY
from model_core.io.validation import image_problem


class LeastConfidence(Strategy):
    """Propose the unlabelled image with the lowest in-context confidence (from the scoring method).

    Images not scored yet (e.g. added after the last scoring run) come first: nothing is
    known about them. Images that scoring could not segment, or that are no volume the
    model can segment, are never proposed. Returns None when no image is left.
    """

    def __init__(self):
        super().__init__("The unlabelled image the in-context model is least confident about")

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        scores, unscored = {}, []
        for image_id in datastore.get_unlabeled_images():
            record = datastore.get_image_info(image_id).get(SCORE_KEY) or {}
            if "failed" in record:
                continue
            if record.get("mean") is not None:
                scores[image_id] = record["mean"]
                continue
            path = datastore.get_image_uri(image_id)
            if path and image_problem(path) is None:
                unscored.append(image_id)
        if unscored:
            return {"id": sorted(unscored)[0], "confidence": None}
        if not scores:
            return None
        image = min(scores, key=lambda i: (scores[i], i))
        return {"id": image, "confidence": scores[image]}
