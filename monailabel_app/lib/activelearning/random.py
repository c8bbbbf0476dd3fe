"""Strategy ``random``: MONAI Label's, without its crash when every image was just proposed, and with a choice
of strategy that MONAI Label 0.8.5's OHIF panel can pass on."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from monailabel.tasks.activelearning.random import Random


class SafeRandom(Random):
    """MONAI Label's ``Random`` weighs each unlabelled image by the seconds since it was last proposed;
    when all were proposed within the current second every weight is 0 and ``random.choices`` raises
    (a 500 on every call for that second). Then any unlabelled image is as good as another.

    Args:
        choices: the server's strategy names, offered as this strategy's ``strategy`` option. OHIF's
            panel always asks for ``random`` (its strategy selector has no handler) but sends the options
            saved in its "Options / Configurations" dialog with the request; MONAI Label's
            ``/activelearning`` route lets a ``strategy`` among them choose the strategy that runs.
    """

    def __init__(self, choices: Sequence[str] = ()):
        super().__init__()
        self.choices = ["random", *(c for c in choices if c != "random")] if choices else []

    def info(self) -> dict[str, Any]:
        info = super().info()
        if self.choices:
            # a list is MONAI Label's choice option: OHIF's options dialog and Slicer's show it as a select, and
            # Slicer sends its first item unless changed; the first is random, what runs by default
            info["config"] = {"strategy": list(self.choices)}
        return info

    def __call__(self, request: dict[str, Any], datastore) -> dict[str, Any] | None:
        try:
            return super().__call__(request, datastore)
        except ValueError:  # 'Total of weights must be greater than zero'
            images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
            return {"id": random.choice(images), "weight": 0} if images else None
