"""What the app tells a user, also where the viewer does not show the server's answer.

MONAI Label 0.8.5's OHIF panel answers every failed request with a fixed line ("Failed to Run
Segmentation") and never shows a model's description; of ``/info`` it shows the app's ``name``
(the subtitle under the server field, read when the panel connects) and links ``/info`` itself.
So the app's name carries what a user needs to act on (:func:`panel_name`): untrained weights,
how many series are labelled, and the last failed request's message (:class:`LastErrors`);
pressing the panel's connect button again shows it. ``/info``'s ``models_status`` holds the same
in full, and each model's description (what 3D Slicer shows) says what the model needs.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["LastErrors", "no_support_message", "panel_name"]

INTERACTIVE_HINT = "or use icl_sam2_interactive (Point Prompts: clicks) on this series"


def no_support_message(query_is_labelled: bool, skipped: list[dict[str, str]]) -> str:
    """Why in-context segmentation has no support set, and what to do.

    Args:
        query_is_labelled: the series to segment has a final label itself (it never supports itself).
        skipped: stored labels left out, ``[{"id", "reason"}]``.
    """
    if query_is_labelled:
        return (
            "This series is the only labelled one: in-context segmentation segments a series from the labels "
            "of other series, never from its own. Label another series (save it as a final label), "
            f"{INTERACTIVE_HINT}."
        )
    if skipped:
        reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        return (
            f"No usable labelled series: {len(skipped)} stored label(s) were left out ({reasons}). Fix or replace "
            f"them (save a final label on the series' own grid), {INTERACTIVE_HINT}."
        )
    return (
        "No labelled series yet: in-context segmentation needs at least one series with a final label (3D Slicer's "
        f"Submit Label, or PUT /datastore/label with tag final), {INTERACTIVE_HINT}."
    )


class LastErrors:
    """The last failed inference request of each model (cleared by its next success)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._errors: dict[str, dict[str, Any]] = {}

    def failed(self, model: str, status: int, detail: Any, image: str | None) -> None:
        with self._lock:
            self._errors[str(model)] = {
                "status": int(status),
                "detail": str(detail),
                "image": image,
                "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }

    def succeeded(self, model: str) -> None:
        with self._lock:
            self._errors.pop(str(model), None)

    def get(self, model: str) -> dict[str, Any] | None:
        with self._lock:
            error = self._errors.get(str(model))
            return dict(error) if error else None

    def latest(self) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            if not self._errors:
                return None
            model = max(self._errors, key=lambda m: self._errors[m]["at"])
            return model, dict(self._errors[model])


def panel_name(
    name: str, untrained: list[str], labelled: int | None, last: tuple[str, dict] | None, datastore_error: str = ""
) -> str:
    """The app's name with what OHIF's panel cannot otherwise show, e.g.
    ``ICL-SAM2 | icl_sam2: UNTRAINED weights | 1 labelled series | last error (icl_sam2, 400): ...``.

    Args:
        untrained: models that run untrained (random initial) weights.
        labelled: series with a final label (None: unknown).
        last: ``(model, error)`` of :meth:`LastErrors.latest`.
        datastore_error: why the datastore does not answer (a PACS that is down: the message names it).
    """
    parts = [name]
    parts += [f"{m}: UNTRAINED weights (random; train first)" for m in untrained]
    if datastore_error:
        parts.append(f"datastore not answering: {datastore_error[:300]}")
    elif labelled is None:
        parts.append("labelled series unknown")
    elif labelled == 0:
        parts.append("no labelled series yet: label one before Auto-Segmentation")
    else:
        parts.append(f"{labelled} labelled series")
    if last:
        model, error = last
        parts.append(f"last error ({model}, {error['status']}): {error['detail']}")
    return " | ".join(parts)
