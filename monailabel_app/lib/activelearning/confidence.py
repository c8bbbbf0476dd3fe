"""Strategy: the unlabelled image the in-context model is least sure of."""

from __future__ import annotations

from typing import Any

from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.confidence import SCORE_KEY


class LeastConfidence(Strategy):
    """Propose the unlabelled image with the lowest in-context confidence (from the scoring method).

    Images not scored yet (e.g. added after the last scoring run) come first: nothing is
    known about them. Returns None when no image is unlabelled.
    """

    def __init__(self):
        super().__init__("The unlabelled image the in-context model is least confident about")

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        scores = {i: (datastore.get_image_info(i).get(SCORE_KEY) or {}).get("mean") for i in images}
        unscored = sorted(i for i, s in scores.items() if s is None)
        if unscored:
            return {"id": unscored[0], "confidence": None}
        image = min(scores, key=lambda i: (scores[i], i))
        return {"id": image, "confidence": scores[image]}
