"""A follow-up click on a used state: re-run only what the click changes.

:func:`correct_incrementally` is the one rule for applying new prompts to a volume that was
already segmented; the app's follow-up clicks (``SegmentationService.interact``) and the
interactive protocol (:mod:`model_core.workflows.protocol`) both use it. It is not in sam2:
``SAM2VideoPredictor`` re-propagates a whole video after every new click, which on a volume of
hundreds of slices costs the whole volume for a change that is usually local.
"""

from __future__ import annotations

from typing import Any, Sequence

from model_core.modeling.prompts import SlicePrompt
from model_core.predictor import VolumePredictor
from model_core.volume_state import VolumeState

__all__ = ["correct_incrementally"]


def correct_incrementally(
    predictor: VolumePredictor,
    state: VolumeState,
    obj: Any,
    prompts: dict[int, SlicePrompt],
    changed: Sequence[int],
    patience: int = 3,
    agreement_iou: float = 0.98,
    stop_after_absent: int = 0,
    absent_score: float = 0.0,
) -> int:
    """Apply the prompts of ``changed`` slices to a used state and propagate outward while the result changes.

    Each changed slice is segmented as a replay from scratch would segment it (``as_first_pass``).
    Propagation then follows the replay's order: a forward pass from the nearest prompted slice
    below the changes (the replay passes through those slices upward) and a backward pass from the
    same slice. Slices up to the highest change always run; beyond the changes a pass stops after
    ``patience`` consecutive slices whose mask agrees with the previous result (IoU at least
    ``agreement_iou``), or where the structure ends (``stop_after_absent``, see
    :meth:`VolumePredictor.propagate`). Slices not reached keep their result.

    Args:
        prompts: every prompt of ``obj`` by slice (the changed ones included).
        changed: slices whose prompts changed.

    Returns:
        The number of slices propagated.
    """
    changed = sorted(int(z) for z in changed)
    k = state.object_ids.index(obj)
    before = state.low_res_logits[:, k, 0] > 0  # (D, h, w) the previous masks
    for z in changed:
        predictor.add_prompt(state, z, obj, prompts[z], as_first_pass=True)
    start = max((z for z in prompts if z < changed[0]), default=changed[0])
    stopping = {"stop_after_absent": int(stop_after_absent), "absent_score": float(absent_score)}
    ran = 0
    for direction, beyond in (("forward", lambda z: z > changed[-1]), ("backward", lambda z: z < start)):
        agreeing = 0
        # the replay's forward pass starts with no memories behind it; its backward pass has the forward pass's
        passes = predictor.propagate(state, start, direction, warm_start=direction == "backward", **stopping)
        for z, _ in passes:
            if z == start:
                continue  # a prompted slice: not tracked again
            ran += 1
            if not beyond(z):
                continue
            now = state.low_res_logits[z, k, 0] > 0
            union = int((now | before[z]).sum())
            iou = 1.0 if union == 0 else int((now & before[z]).sum()) / union
            agreeing = agreeing + 1 if iou >= agreement_iou else 0
            if agreeing >= patience:
                break
    return ran
