"""The CVPR 2025 interactive 3D segmentation protocol, run on this project's models.

    python -m monai.bundle run --config_file "['bundle/configs/train.json','bundle/configs/protocol.json']" ...
    icl-sam2 protocol --datalist data/phantoms/datalist.json --checkpoint models/model.pt ...

For each case (a volume and one structure in it) a mode segments from an initial prompt, then up
to ``num_clicks`` simulated corrections (:func:`~model_core.workflows.clicks.next_click`) each followed
by the model's update; after every step DSC and NSD (2 mm, in 3D, the challenge's
:func:`~model_core.medsam_lite.challenge.dsc_nsd`) and the step's seconds are recorded. Modes:

- ``interactive``: the initial prompt (``box``: the structure's box on its middle slice; ``click``: one
  click at its centre) on an empty state, propagated through the volume in both directions; each
  correction is applied as the app applies a follow-up click
  (:func:`model_core.corrections.correct_incrementally`).
- ``in_context``: support memories first (the structure segmented from labelled support slices,
  no prompt, forward through the volume as the bundle's :class:`~model_core.workflows.inferers.InContextInferer`),
  then the same corrections on top: this project's combination.
- ``medsam_lite``: LiteMedSAM from the challenge's 3D box (middle slice, propagated within the box's
  slices); no corrections (the box-only baseline).

Per case: DSC and NSD per step, their area under the curve (:func:`~model_core.workflows.clicks.curve_auc`),
the final values, the clicks needed to reach DSC 0.9 (or not reached) and seconds per interaction.
:class:`ProtocolWorkflow` runs a datalist, writes one CSV row per case and a summary JSON; a bad case
(structure absent, label not on the image's grid, unreadable file) is a failed row naming the case,
and the others run.

Grid: the model sees each axial slice resized to its ``image_size`` (bilinear, as
:func:`~model_core.modeling.inputs.volume_to_slices`); clicks and boxes found on the image's own grid
are mapped onto the model's, and predictions are resized back, so scores are on the image's voxels.
Positions in the rows (``z, y, x``; a box ``x0, y0, x1, y1``) index the ``(D, H, W)`` slices: ``(k, i, j)``
of the image after the preprocessing's orientation (RAS).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model_core.corrections import correct_incrementally
from model_core.io.datalist import check_case
from model_core.io.files import atomic_path
from model_core.io.transforms import load_case
from model_core.io.validation import InputError
from model_core.medsam_lite.challenge import NSD_TOLERANCE, dsc_nsd
from model_core.modeling.inputs import as_slices, volume_to_slices
from model_core.modeling.memory import SupportMemory
from model_core.modeling.prompts import SlicePrompt
from model_core.predictor import VolumePredictor
from model_core.volume_state import VolumeState
from model_core.workflows.clicks import (
    Click,
    centre_click,
    clicks_to_reach,
    curve_auc,
    middle_slice_box,
    next_click,
)

__all__ = [
    "INITIAL_PROMPTS",
    "MODES",
    "CaseResult",
    "InteractiveProtocol",
    "ProtocolCase",
    "ProtocolWorkflow",
    "summarize_results",
]

MODES = ("interactive", "in_context", "medsam_lite")
INITIAL_PROMPTS = ("box", "click")


@dataclass
class ProtocolCase:
    """One structure in one volume.

    Attributes:
        name: the case's name (rows and errors name it).
        image: ``(D, H, W)`` intensities in [0, 1], axial slices first (RAS, as the bundle's preprocessing).
        reference: ``(D, H, W)`` bool, the structure.
        spacing: voxel size in mm along ``(D, H, W)``.
        structure: the structure's label value (the object id of a support memory).
        support: support memory for ``in_context`` (holding ``structure``), or None.
    """

    name: str
    image: torch.Tensor
    reference: np.ndarray
    spacing: tuple[float, float, float]
    structure: int = 1
    support: SupportMemory | None = None


@dataclass
class CaseResult:
    """One row of the protocol's CSV: a case's curve and what follows from it."""

    case: str
    structure: int
    mode: str
    initial_prompt: str
    status: str = "ok"  # "ok" or "failed"
    error: str = ""
    dsc: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    clicks: list[dict[str, Any]] = field(default_factory=list)
    target_dsc: float = 0.9

    @property
    def dsc_auc(self) -> float | None:
        return curve_auc(self.dsc)

    @property
    def nsd_auc(self) -> float | None:
        return curve_auc(self.nsd)

    @property
    def clicks_to_target(self) -> int | None:
        return clicks_to_reach(self.dsc, self.target_dsc)

    def row(self, num_clicks: int) -> dict[str, Any]:
        """The CSV row: per step ``dsc_i``, ``nsd_i``, ``seconds_i`` (``i`` = 0 for the initial prompt)."""
        reach = self.clicks_to_target
        out: dict[str, Any] = {
            "case": self.case,
            "structure": self.structure,
            "mode": self.mode,
            "initial_prompt": self.initial_prompt,
            "status": self.status,
            "error": self.error,
            "final_dsc": _round(self.dsc[-1]) if self.dsc else None,
            "final_nsd": _round(self.nsd[-1]) if self.nsd else None,
            "dsc_auc": _round(self.dsc_auc),
            "nsd_auc": _round(self.nsd_auc),
            f"clicks_to_dsc_{self.target_dsc:g}": (reach if reach is not None else "not reached") if self.dsc else None,
            "seconds_per_interaction": _round(float(np.mean(self.seconds))) if self.seconds else None,
        }
        for i in range(num_clicks + 1):
            out[f"dsc_{i}"] = _round(self.dsc[i]) if i < len(self.dsc) else None
            out[f"nsd_{i}"] = _round(self.nsd[i]) if i < len(self.nsd) else None
            out[f"seconds_{i}"] = _round(self.seconds[i]) if i < len(self.seconds) else None
        out["clicks"] = json.dumps(self.clicks)
        return out


def _round(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 4)


class InteractiveProtocol:
    """Runs the protocol on one :class:`ProtocolCase` at a time.

    Args:
        network: an :class:`~model_core.modeling.network.InContextSAM2` (``interactive``, ``in_context``).
        mode: one of :data:`MODES`.
        initial_prompt: ``box`` or ``click`` (``interactive``; ``in_context`` starts from its support,
            ``medsam_lite`` from the 3D box).
        num_clicks: corrections after the initial prompt (the challenge: 5).
        medsam: a :class:`~model_core.medsam_lite.model.LiteMedSAM`, or a zero-argument callable that
            builds it (``medsam_lite``; default: the package's weights on CPU).
        target_dsc: the DSC whose clicks-to-reach is reported.
        tolerance: NSD tolerance in mm.
        channel_mode: as the model was trained.
        patience, agreement_iou: the incremental update's stopping rule
            (:func:`model_core.corrections.correct_incrementally`);
            ``incremental=False`` propagates the whole volume after each click instead.
        time_limit_s: stop correcting a case once this many seconds are spent (None: no limit).
    """

    def __init__(
        self,
        network=None,
        mode: str = "interactive",
        initial_prompt: str = "box",
        num_clicks: int = 5,
        medsam: Any = None,
        target_dsc: float = 0.9,
        tolerance: float = NSD_TOLERANCE,
        channel_mode: str = "replicate",
        incremental: bool = True,
        patience: int = 3,
        agreement_iou: float = 0.98,
        time_limit_s: float | None = None,
    ):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}.")
        if initial_prompt not in INITIAL_PROMPTS:
            raise InputError(f"initial_prompt must be one of {INITIAL_PROMPTS}, got {initial_prompt!r}.")
        if int(num_clicks) < 0:
            raise InputError(f"num_clicks must be 0 or more, got {num_clicks}.")
        if mode != "medsam_lite" and network is None:
            raise InputError(f"mode {mode!r} needs the network.")
        self.network, self.mode, self.initial_prompt = network, mode, initial_prompt
        self.num_clicks = 0 if mode == "medsam_lite" else int(num_clicks)
        self._medsam = medsam
        self.target_dsc, self.tolerance, self.channel_mode = float(target_dsc), float(tolerance), channel_mode
        self.incremental, self.patience, self.agreement_iou = bool(incremental), int(patience), float(agreement_iou)
        self.time_limit_s = time_limit_s

    @property
    def prompt_name(self) -> str:
        """The initial prompt as rows name it."""
        return {"in_context": "support", "medsam_lite": "box3d"}.get(self.mode, self.initial_prompt)

    @property
    def medsam(self):
        if self._medsam is None:
            from model_core.medsam_lite.model import LiteMedSAM  # LiteMedSAM's weights: only for its mode

            self._medsam = LiteMedSAM.from_package()
        elif callable(self._medsam) and not hasattr(self._medsam, "segment_volume"):
            self._medsam = self._medsam()
        return self._medsam

    # ----------------------------------------------------------------- grids
    def _to_model(self, case: ProtocolCase, x: float, y: float) -> tuple[float, float]:
        """A pixel ``(x, y)`` of the image's slice on the model grid (bilinear resize, align_corners=False)."""
        S = self.network.image_size
        H, W = case.reference.shape[1:]
        mx = min(max((x + 0.5) * S / W - 0.5, 0.0), S - 1.0)
        my = min(max((y + 0.5) * S / H - 0.5, 0.0), S - 1.0)
        return mx, my

    def _prediction(self, case: ProtocolCase, state: VolumeState, k: int) -> np.ndarray:
        """``(D, H, W)`` bool: the state's masks on the image's grid."""
        low = state.low_res_logits[:, k].float()  # (D, 1, h, w)
        logits = F.interpolate(low, size=case.reference.shape[1:], mode="bilinear", align_corners=False)[:, 0]
        return (logits > 0).cpu().numpy()

    def _score(self, case: ProtocolCase, prediction: np.ndarray) -> tuple[float, float]:
        return dsc_nsd(case.reference.astype(np.uint8), prediction.astype(np.uint8), case.spacing, self.tolerance)

    # ------------------------------------------------------------------- run
    def run_case(self, case: ProtocolCase) -> CaseResult:
        """The protocol on one case; a bad case comes back failed with the reason, never raised."""
        result = CaseResult(case.name, case.structure, self.mode, self.prompt_name, target_dsc=self.target_dsc)
        try:
            if not case.reference.any():
                raise InputError(f"case {case.name!r}: structure {case.structure} is absent from its label.")
            if tuple(case.image.shape) != tuple(case.reference.shape):
                raise InputError(
                    f"case {case.name!r}: the label {tuple(case.reference.shape)} is not on the image's grid "
                    f"{tuple(case.image.shape)}."
                )
            if self.mode == "medsam_lite":
                self._run_medsam(case, result)
            else:
                self._run_network(case, result)
        except InputError as e:
            result.status, result.error = "failed", str(e)
        except Exception as e:  # one broken case never stops the others
            result.status, result.error = "failed", f"case {case.name!r}: {type(e).__name__}: {e}"
        return result

    def _record(self, case: ProtocolCase, result: CaseResult, prediction: np.ndarray, seconds: float) -> None:
        dsc, nsd = self._score(case, prediction)
        result.dsc.append(dsc)
        result.nsd.append(nsd)
        result.seconds.append(seconds)

    def _run_medsam(self, case: ProtocolCase, result: CaseResult) -> None:
        ref = case.reference
        zs, ys, xs = np.nonzero(ref)
        box = (int(xs.min()), int(ys.min()), int(zs.min()), int(xs.max()), int(ys.max()), int(zs.max()))
        if box[0] == box[3] or box[1] == box[4]:
            raise InputError(f"case {case.name!r}: the structure is one voxel wide in-plane; no box can be drawn.")
        model = self.medsam
        start = time.perf_counter()
        mask = model.segment_volume(case.image.numpy(), box).mask
        self._record(case, result, np.asarray(mask, bool), time.perf_counter() - start)
        result.clicks.append({"box3d": list(box)})

    @torch.inference_mode()
    def _run_network(self, case: ProtocolCase, result: CaseResult) -> None:
        net = self.network
        was_training = net.training
        net.eval()
        try:
            self._interact(case, result)
        finally:
            net.train(was_training)

    def _interact(self, case: ProtocolCase, result: CaseResult) -> None:
        net = self.network
        predictor = VolumePredictor(net)
        slices = volume_to_slices(case.image.float().clamp(0, 1), net.image_size, self.channel_mode).to(net.device)
        D = slices.shape[0]
        prompts: dict[int, SlicePrompt] = {}
        started = time.perf_counter()
        if self.mode == "in_context":
            if case.support is None:
                raise InputError(f"case {case.name!r}: the in_context mode needs a support memory.")
            if case.structure not in case.support.object_ids:
                raise InputError(
                    f"case {case.name!r}: structure {case.structure} is not in the support set "
                    f"{case.support.object_ids}."
                )
            obj = case.structure
            state = predictor.init_state(slices, case.support, [obj], feature_cache_slices=D)
            for _ in predictor.propagate(state, start_slice=0, direction="forward"):
                pass
        else:
            obj = 1
            state = predictor.init_state(slices, None, [obj], feature_cache_slices=D)
            if self.initial_prompt == "box":
                z, (x0, y0, x1, y1) = middle_slice_box(case.reference)
                mx0, my0 = self._to_model(case, x0 - 0.5, y0 - 0.5)  # the box's outer edges
                mx1, my1 = self._to_model(case, x1 + 0.5, y1 + 0.5)
                mx1, my1 = max(mx1, mx0 + 1), max(my1, my0 + 1)
                prompts[z] = SlicePrompt(box=torch.tensor([mx0, my0, mx1, my1]))
                result.clicks.append({"box": [x0, y0, x1, y1], "z": z})
            else:
                click = centre_click(case.reference, case.spacing)
                z = click.z
                prompts[z] = SlicePrompt(points=torch.tensor([self._to_model(case, click.x, click.y)]), labels=[1])
                result.clicks.append(_click_record(click))
            predictor.add_prompt(state, z, obj, prompts[z])
            for _ in predictor.propagate(state, start_slice=z, direction="both"):
                pass
        k = state.object_ids.index(obj)
        prediction = self._prediction(case, state, k)
        self._record(case, result, prediction, time.perf_counter() - started)
        for _ in range(self.num_clicks):
            if self.time_limit_s is not None and sum(result.seconds) >= self.time_limit_s:
                result.error = f"time limit {self.time_limit_s:g} s reached after {len(result.dsc) - 1} clicks"
                break
            click = next_click(prediction, case.reference, case.spacing)
            if click is None:  # nothing left to correct: the curve stays at its value
                result.dsc.append(result.dsc[-1])
                result.nsd.append(result.nsd[-1])
                result.seconds.append(0.0)
                result.clicks.append({"none": "prediction equals the reference"})
                continue
            started = time.perf_counter()
            point = torch.tensor([self._to_model(case, click.x, click.y)])
            label = torch.tensor([1 if click.positive else 0], dtype=torch.int32)
            old = prompts.get(click.z)
            if old is None:
                prompts[click.z] = SlicePrompt(points=point, labels=label)
            else:
                points = point if old.points is None else torch.cat([old.points, point])
                labels = label if old.labels is None else torch.cat([old.labels, label])
                prompts[click.z] = SlicePrompt(points=points, labels=labels, box=old.box)
            if self.incremental:
                correct_incrementally(predictor, state, obj, prompts, [click.z], self.patience, self.agreement_iou)
            else:  # the exact replay: every prompt again on a fresh state, the whole volume propagated
                state = predictor.init_state(
                    slices, case.support if self.mode == "in_context" else None, [obj], share_features_with=state
                )
                for z, prompt in sorted(prompts.items()):
                    predictor.add_prompt(state, z, obj, prompt)
                for _ in predictor.propagate(state, start_slice=min(prompts), direction="both"):
                    pass
            prediction = self._prediction(case, state, k)
            self._record(case, result, prediction, time.perf_counter() - started)
            result.clicks.append(_click_record(click))


def _click_record(click: Click) -> dict[str, Any]:
    return {"z": click.z, "y": click.y, "x": click.x, "positive": click.positive, "region_voxels": click.region_voxels}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(np.mean(values)), 4) if values else None


def summarize_results(results: Sequence[CaseResult], num_clicks: int, target_dsc: float = 0.9) -> dict[str, Any]:
    """The summary the challenge reports: means per step, of the AUCs and of the final values, clicks to the
    target DSC and seconds per interaction over the scored cases; failed cases with their reasons."""
    ok = [r for r in results if r.status == "ok" and r.dsc]
    steps = max((len(r.dsc) for r in ok), default=0)
    reach = [r.clicks_to_target for r in ok]
    reached = [c for c in reach if c is not None]
    return {
        "cases": len(results),
        "scored": len(ok),
        "failed": len(results) - len(ok),
        "num_clicks": num_clicks,
        "DSC": {
            "per_step": [_mean([r.dsc[i] for r in ok if i < len(r.dsc)]) for i in range(steps)],
            "auc": _mean([r.dsc_auc for r in ok]),
            "final": _mean([r.dsc[-1] for r in ok]),
        },
        "NSD": {
            "per_step": [_mean([r.nsd[i] for r in ok if i < len(r.nsd)]) for i in range(steps)],
            "auc": _mean([r.nsd_auc for r in ok]),
            "final": _mean([r.nsd[-1] for r in ok]),
        },
        f"clicks_to_dsc_{target_dsc:g}": {
            "reached": len(reached),
            "not_reached": len(reach) - len(reached),
            "median_when_reached": float(np.median(reached)) if reached else None,
        },
        "seconds_per_interaction": _mean([s for r in ok for s in r.seconds]),
        "failed_cases": {f"{r.case} (structure {r.structure})": r.error for r in results if r.status != "ok"},
    }


class ProtocolWorkflow:
    """The protocol over a datalist, as the bundle runs it: one CSV row per case and structure, a summary JSON.

    Args:
        protocol: the :class:`InteractiveProtocol` (mode and settings).
        data: datalist entries with ``image`` and ``label``.
        transform: MONAI preprocessing of ``image`` and ``label`` to ``(1, H, W, D)``, oriented, image in
            [0, 1] at its own resolution (the bundle's ``protocol#preprocessing``; no resize: scores are on
            the image's voxels).
        structures: label values to run, each a case per volume.
        output_dir: where ``protocol_<mode>.csv`` and ``protocol_<mode>_summary.json`` go.
        support: for ``in_context``: a :class:`SupportMemory` holding the structures, or a zero-argument
            callable building one (the bundle's ``validate#support``).
    """

    def __init__(
        self,
        protocol: InteractiveProtocol,
        data: Sequence[dict[str, Any]],
        transform: Callable,
        structures: Sequence[int],
        output_dir: str,
        support: SupportMemory | Callable[[], SupportMemory] | None = None,
    ):
        self.protocol, self.data, self.transform = protocol, list(data), transform
        self.structures = [int(s) for s in structures]
        if not self.structures:
            raise InputError("structures is empty: name the label values to run.")
        self.output_dir, self._support = output_dir, support

    @property
    def files(self) -> dict[str, str]:
        """The CSV and JSON this workflow writes."""
        stem = os.path.join(self.output_dir, f"protocol_{self.protocol.mode}")
        return {"csv": f"{stem}.csv", "summary": f"{stem}_summary.json"}

    def support(self) -> SupportMemory | None:
        if self.protocol.mode != "in_context":
            return None
        if callable(self._support) and not isinstance(self._support, SupportMemory):
            self._support = self._support()
        if self._support is None:
            raise InputError("The in_context mode needs a support set (support datalist and classes).")
        return self._support

    def cases(self, entry: dict[str, Any], support: SupportMemory | None) -> list[ProtocolCase] | CaseResult:
        """The cases of one datalist entry, or a failed row naming it."""
        name = os.path.basename(str(entry.get("image", "?"))).split(".")[0]
        p = self.protocol
        try:
            check_case(entry, f"Case {name!r}")
            item = load_case(entry, self.transform)
        except (InputError, ValueError, OSError) as e:
            return CaseResult(name, 0, p.mode, p.prompt_name, "failed", f"case {name!r}: {e}")
        image, label = item["image"], item.get("label")
        if label is None:
            return CaseResult(name, 0, p.mode, p.prompt_name, "failed", f"case {name!r}: no label.")
        volume, labels = as_slices(image).float(), as_slices(label).round().long().numpy()
        affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
        sx, sy, sz = (float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
        # a label on another grid keeps its shape: run_case then fails the case, naming both shapes
        return [ProtocolCase(name, volume, labels == s, (sz, sx, sy), s, support) for s in self.structures]

    def run(self) -> dict[str, Any]:
        """Run every case and structure; write the CSV and the summary; returns the summary."""
        support = self.support()
        results: list[CaseResult] = []
        for entry in self.data:
            cases = self.cases(entry, support)
            if isinstance(cases, CaseResult):
                results.append(cases)
                continue
            results += [self.protocol.run_case(case) for case in cases]
        return self.write(results)

    def write(self, results: Sequence[CaseResult]) -> dict[str, Any]:
        """Write the rows and the summary (atomically); returns the summary."""
        p = self.protocol
        os.makedirs(self.output_dir, exist_ok=True)
        rows = [r.row(p.num_clicks) for r in results]
        columns = list(CaseResult("", 0, p.mode, p.prompt_name, target_dsc=p.target_dsc).row(p.num_clicks))
        with atomic_path(self.files["csv"], suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row[k] is None else row[k]) for k in columns})
        summary = {
            "mode": p.mode,
            "initial_prompt": p.prompt_name,
            **summarize_results(results, p.num_clicks, p.target_dsc),
            "files": self.files,
        }
        with atomic_path(self.files["summary"], suffix=".json") as tmp, open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        return summary
