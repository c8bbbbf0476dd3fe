"""Strategy ``random``: MONAI Label's, without its crash when every image was just proposed."""

from __future__ import annotations

import random
from typing import Any

from monailabel.tasks.activelearning.random import Random


class SafeRandom(Random):
    """MONAI Label's ``Random`` weighs each unlabelled image by the seconds since it was last proposed;
    when all were proposed within the current second every weight is 0 and ``random.choices`` raises
    (a 500 on every call for that second). Then any unlabelled image is as good as another."""

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        try:
            return super().__call__(request, datastore)
        except ValueError:  # 'Total of weights must be greater than zero'
            images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
            return {"id": random.choice(images), "weight": 0} if images else None
