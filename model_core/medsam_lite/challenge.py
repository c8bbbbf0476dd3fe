"""The CVPR 2024 "Segment Anything in Medical Images on Laptop" case format, inference and scoring.

**Cases** (one ``.npz`` per case, the challenge's layout ``imgs/``, ``segs/``, ``gts/``):

- ``imgs/<case>.npz``: ``imgs`` (2D: ``(H, W, 3)`` uint8 or ``(H, W)``; 3D: ``(D, H, W)``),
  ``boxes`` (2D: ``(N, 4)`` ``x_min, y_min, x_max, y_max``; 3D: ``(N, 6)``
  ``x_min, y_min, z_min, x_max, y_max, z_max``, pixel indices, z inclusive) and, for 3D,
  ``spacing`` (not used by inference). Whether a case is 2D or 3D is read from the boxes'
  width; a name starting ``2D_`` or ``3D_`` (the challenge's naming) must agree.
- ``segs/<case>.npz``: ``segs``, the image's shape without channels, label ``i`` where box
  ``i`` (1-based) segmented its structure (a later box wins where two overlap, as the
  baseline); uint8, or uint16 beyond 255 boxes. :func:`infer_folder` also writes
  ``segs/timing.csv`` (``case, seconds, status, error``): each case's wall time from reading
  its npz to its written result, the model already loaded.
- ``gts/<case>.npz``: ``gts`` (labels as ``segs``) and, for 3D, ``spacing``.

**Metrics** (:func:`score_case`), as the challenge's ``compute_metrics.py`` defines them:
per label ``1..max(gts)`` the Dice similarity coefficient and the normalized surface Dice
(NSD) at a tolerance of 2 (mm for 3D; for 2D the challenge scores an ``(H, W, 1)`` volume
with spacing 1, so 2 pixels), each averaged over the labels of the case. NSD is computed
only when the case's DSC exceeds 0.2 and is 0 otherwise (the challenge's shortcut; set
``nsd_min_dsc=None`` to always compute it). The challenge uses DeepMind's
``surface-distance`` package; MONAI's ``compute_surface_dice(use_subvoxels=True)`` computes
the same surfel-area-weighted NSD and ``compute_dice`` the same Dice, so those are used.
A label absent from both ``gts`` and ``segs`` is skipped (the challenge's mean would be NaN).

Spacing: the challenge's npz files store ``spacing`` as SimpleITK's ``GetSpacing()``,
i.e. ``(x, y, z)``, while the arrays are ``(z, y, x)``; its evaluation applies the stored
values to the array's axes in the stored order. ``spacing_order="array"`` (default)
reproduces that; ``"xyz"`` reverses the spacing onto ``(D, H, W)`` (the physically right
reading of SimpleITK-ordered values). The two agree when the voxels are isotropic.

**Bad input** never stops a batch: a case with a missing key, a box outside the image,
reversed or of zero size, or a 2D image given with 3D boxes (or the reverse) fails with a
:class:`CaseError` naming the case and the key, is recorded with its reason, and the next
case runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice

from model_core.io.files import atomic_path
from model_core.io.validation import InputError
from model_core.medsam_lite.model import LiteMedSAM, SliceEmbedding, check_box, check_slice_step

__all__ = [
    "NSD_MIN_DSC",
    "NSD_TOLERANCE",
    "SPACING_ORDERS",
    "TIMING_FILE",
    "CaseError",
    "CaseRun",
    "CaseScore",
    "ChallengeCase",
    "case_files",
    "dsc_nsd",
    "evaluate_folder",
    "infer_case",
    "infer_folder",
    "load_case",
    "score_case",
    "summarize",
    "write_summary",
]

#: NSD tolerance of the challenge (mm in 3D, pixels in 2D)
NSD_TOLERANCE = 2.0
#: the challenge computes NSD only above this case DSC (0 below)
NSD_MIN_DSC = 0.2
#: the file :func:`infer_folder` writes beside the segmentations
TIMING_FILE = "timing.csv"
SPACING_ORDERS = ("array", "xyz")


class CaseError(InputError):
    """A case's file is wrong: names the case and the npz key.

    Attributes:
        case: the case name (file name without ``.npz``).
        key: the npz key at fault (``"imgs"``, ``"boxes"``, ``"gts"``...), or None for the file itself.
    """

    def __init__(self, case: str, key: str | None, message: str):
        where = f"case {case!r}" + (f", key {key!r}" if key else "")
        super().__init__(f"{where}: {message}")
        self.case, self.key = case, key


@dataclass
class ChallengeCase:
    """One validated input case.

    Attributes:
        name: file name without ``.npz``.
        image: 2D ``(H, W)`` / ``(H, W, 3)`` or 3D ``(D, H, W)`` as stored.
        boxes: ``(N, 4)`` (2D) or ``(N, 6)`` (3D) float64.
        is_3d: whether it is a 3D case.
        spacing: as stored, or None.
    """

    name: str
    image: np.ndarray
    boxes: np.ndarray
    is_3d: bool
    spacing: np.ndarray | None = None

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of its segmentation: ``(H, W)`` or ``(D, H, W)``."""
        return tuple(self.image.shape[:3] if self.is_3d else self.image.shape[:2])


@dataclass
class CaseRun:
    """What inference did with one case (a row of ``timing.csv``)."""

    case: str
    seconds: float
    status: str  # "ok" or "failed"
    error: str = ""


@dataclass
class CaseScore:
    """A row of the evaluation CSV; DSC and NSD are None for a failed case."""

    case: str
    DSC: float | None
    NSD: float | None
    seconds: float | None
    status: str  # "ok" or "failed"
    error: str = ""


def _case_name(path: str | os.PathLike) -> str:
    name = os.path.basename(os.fspath(path))
    return name[:-4] if name.endswith(".npz") else name


def _read_npz(path: str | os.PathLike, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (required) and ``optional`` (if present) of an npz, or a :class:`CaseError`."""
    case = _case_name(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            present = set(npz.files)
            missing = [k for k in keys if k not in present]
            if missing:
                raise CaseError(
                    case, missing[0], f"missing from the npz (it has {sorted(present)}); needed: {list(keys)}."
                )
            return {k: np.asarray(npz[k]) for k in [*keys, *optional] if k in present}
    except CaseError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CaseError(case, None, f"not a readable npz file ({type(e).__name__}: {e}).") from e


def load_case(path: str | os.PathLike) -> ChallengeCase:
    """Read and check an input case (see the module docstring for the format).

    Raises:
        CaseError: a missing key, an image that is not 2D/3D as its boxes say, boxes that are
            not ``(N, 4)``/``(N, 6)``, reversed, of zero size or outside the image.
    """
    case = _case_name(path)
    data = _read_npz(path, ("imgs", "boxes"), optional=("spacing",))
    image, boxes = data["imgs"], data["boxes"]
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise CaseError(case, "imgs", f"has values of type {image.dtype}; real numbers are needed.")
    if not np.issubdtype(boxes.dtype, np.number):
        raise CaseError(case, "boxes", f"has values of type {boxes.dtype}; numbers are needed.")
    boxes = boxes.astype(np.float64)
    if boxes.ndim == 1 and boxes.size in (4, 6):
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6) or len(boxes) == 0:
        raise CaseError(
            case,
            "boxes",
            f"has shape {tuple(data['boxes'].shape)}; (N, 4) x_min, y_min, x_max, y_max for a 2D "
            "case or (N, 6) x_min, y_min, z_min, x_max, y_max, z_max for a 3D case, N >= 1, is needed.",
        )
    is_3d = boxes.shape[1] == 6
    named = "3D" if case.startswith("3D_") else "2D" if case.startswith("2D_") else None
    kind = "3D" if is_3d else "2D"
    if named is not None and named != kind:
        raise CaseError(
            case,
            "boxes",
            f"has {boxes.shape[1]} columns ({kind} boxes) but the case is named {named}; "
            f"a {named} case needs {'(N, 6)' if named == '3D' else '(N, 4)'} boxes.",
        )
    if is_3d:
        if image.ndim != 3:
            raise CaseError(
                case,
                "imgs",
                f"has shape {tuple(image.shape)}, not a 3D volume (D, H, W), but 'boxes' are 3D "
                "(N, 6); a 2D case needs (N, 4) boxes, a 3D case a (D, H, W) image.",
            )
        shape = image.shape[1:3]
    else:
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
            raise CaseError(
                case,
                "imgs",
                f"has shape {tuple(image.shape)}, not a 2D image (H, W) or (H, W, 3), but "
                "'boxes' are 2D (N, 4); a 3D case needs (N, 6) boxes.",
            )
        shape = image.shape[:2]
    if image.size and not np.isfinite(image).all():
        raise CaseError(case, "imgs", "has NaN or infinite values.")
    if min(image.shape) < (1 if is_3d else 2) or min(shape) < 2:
        raise CaseError(case, "imgs", f"has shape {tuple(image.shape)}; too small to segment.")
    for i, row in enumerate(boxes):
        try:
            check_box(row[[0, 1, 3, 4]] if is_3d else row, tuple(shape), name=f"box {i}")
        except InputError as e:
            raise CaseError(case, "boxes", str(e)) from None
        if is_3d:
            z_lo, z_hi, depth = row[2], row[5], image.shape[0]
            if z_hi < z_lo:
                raise CaseError(case, "boxes", f"box {i} has z_min {z_lo:g} > z_max {z_hi:g} (reversed).")
            if z_lo < 0 or z_hi > depth - 1 or not (float(z_lo).is_integer() and float(z_hi).is_integer()):
                raise CaseError(
                    case,
                    "boxes",
                    f"box {i} has z range [{z_lo:g}, {z_hi:g}] outside the volume's slice indices "
                    f"0..{depth - 1} (whole numbers).",
                )
    return ChallengeCase(case, image, boxes, is_3d, data.get("spacing"))


def _segment(
    model: LiteMedSAM, case: ChallengeCase, on_empty: str, min_iou: float | None, slice_step: int = 1
) -> np.ndarray:
    """Labels ``(H, W)`` or ``(D, H, W)``: box ``i`` (1-based) writes ``i`` where its mask is."""
    dtype = np.uint8 if len(case.boxes) < 256 else np.uint16
    segs = np.zeros(case.label_shape, dtype=dtype)
    if case.is_3d:
        embeddings: dict[int, SliceEmbedding] = {}  # boxes of one volume share its slices' embeddings
        for i, box in enumerate(case.boxes, start=1):
            segs[
                model.segment_volume(
                    case.image, box, on_empty=on_empty, embeddings=embeddings, min_iou=min_iou, slice_step=slice_step
                ).mask
            ] = i
    else:
        embedding = model.embed(case.image)
        for i, box in enumerate(case.boxes, start=1):
            segs[model.segment_slice(embedding, box).mask] = i
    return segs


def infer_case(
    model: LiteMedSAM,
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    on_empty: str = "stop",
    min_iou: float | None = None,
    slice_step: int = 1,
) -> CaseRun:
    """Segment one case's boxes and write ``output_dir/<case>.npz`` (key ``segs``).

    Never raises for a bad case: a :class:`CaseError` becomes a failed :class:`CaseRun`.

    Args:
        model: the segmentation model.
        path: the case's npz.
        output_dir: where the result goes.
        on_empty, min_iou: 3D propagation's stopping rule (see :meth:`LiteMedSAM.segment_volume`).
        slice_step: 3D propagation's step where consecutive masks agree (1: every slice; see
            :meth:`LiteMedSAM.segment_volume`).
    """
    start = time.perf_counter()
    case = _case_name(path)
    try:
        loaded = load_case(path)
        segs = _segment(model, loaded, on_empty, min_iou, slice_step)
        with atomic_path(Path(output_dir) / f"{case}.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, segs=segs)
    except InputError as e:
        return CaseRun(case, round(time.perf_counter() - start, 4), "failed", str(e))
    except Exception as e:
        return CaseRun(case, round(time.perf_counter() - start, 4), "failed", f"case {case!r}: {type(e).__name__}: {e}")
    return CaseRun(case, round(time.perf_counter() - start, 4), "ok")


def _write_csv(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str]) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row[k] is None else row[k]) for k in columns})


def case_files(input_dir: str | os.PathLike) -> list[Path]:
    """The cases of a challenge ``imgs`` folder (``*.npz``, sorted by name).

    Raises:
        InputError: ``input_dir`` is missing or holds no npz file.
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"input_dir {os.fspath(input_dir)!r} is not a folder; give the challenge's imgs/ folder.")
    paths = sorted(folder.glob("*.npz"))
    if not paths:
        raise InputError(f"input_dir {os.fspath(input_dir)!r} holds no .npz case.")
    return paths


def infer_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: LiteMedSAM | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    on_empty: str = "stop",
    min_iou: float | None = None,
    slice_step: int = 1,
) -> list[CaseRun]:
    """Segment every ``input_dir/*.npz`` into ``output_dir`` and write ``output_dir/timing.csv``.

    Args:
        input_dir: the challenge's ``imgs`` folder.
        output_dir: the ``segs`` folder (created).
        model: default :meth:`LiteMedSAM.from_package` on ``device`` with ``precision``.
        on_empty, min_iou: 3D propagation's stopping rule within each box's z-range (``"stop"``, or the
            baseline's ``"box"``; see :meth:`LiteMedSAM.segment_volume`).
        slice_step: slices per propagation step where consecutive masks agree, the slices between filled by
            interpolation (1: every slice segmented, the baseline's rule).

    Returns:
        One :class:`CaseRun` per case, sorted by name.

    Raises:
        InputError: ``input_dir`` is missing or holds no npz file.
    """
    paths = case_files(input_dir)
    model = model or LiteMedSAM.from_package(device=device, precision=precision)
    if on_empty not in ("stop", "box"):
        raise InputError(f"on_empty must be 'stop' or 'box', got {on_empty!r}.")
    check_slice_step(slice_step)
    runs = [infer_case(model, p, output_dir, on_empty, min_iou, slice_step) for p in paths]
    _write_csv(Path(output_dir) / TIMING_FILE, (asdict(r) for r in runs), ("case", "seconds", "status", "error"))
    return runs


# ------------------------------------------------------------------------------------------- metrics
def dsc_nsd(
    gts: np.ndarray,
    segs: np.ndarray,
    spacing: Sequence[float] | None = None,
    tolerance: float = NSD_TOLERANCE,
    nsd_min_dsc: float | None = NSD_MIN_DSC,
) -> tuple[float, float]:
    """The challenge's DSC and NSD of one case, averaged over labels ``1..max(gts)``.

    Args:
        gts: reference labels, ``(H, W)`` (a 2D case) or ``(D, H, W)`` (3D).
        segs: predicted labels, the same shape.
        spacing: voxel size per array axis for 3D (None: 1); ignored for 2D, which the
            challenge scores as an ``(H, W, 1)`` volume with spacing 1.
        tolerance: NSD tolerance (mm in 3D, pixels in 2D).
        nsd_min_dsc: NSD is 0 when the DSC is at most this (the challenge's 0.2); None: always computed.

    Returns:
        ``(DSC, NSD)``; NaN when neither has any label.
    """

    gts, segs = np.asarray(gts), np.asarray(segs)
    if gts.ndim == 2:
        gts, segs, spacing = gts[..., None], segs[..., None], (1.0, 1.0, 1.0)
    n = int(gts.max(initial=0))
    labels = [i for i in range(1, n + 1) if (gts == i).any() or (segs == i).any()]
    if not labels:
        return math.nan, math.nan

    def one_hot(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([a == i for i in labels])[None])  # (1, L, *spatial) bool

    y_pred, y = one_hot(segs), one_hot(gts)
    dsc = float(np.nanmean(compute_dice(y_pred, y, include_background=True, ignore_empty=False).numpy()))
    if nsd_min_dsc is not None and not dsc > nsd_min_dsc:
        return dsc, 0.0
    with warnings.catch_warnings():  # MONAI warns of a label missing from one side; its NSD (0) is what is meant
        warnings.filterwarnings("ignore", message=r".* is all 0, this may result in nan/inf distance")
        nsd = compute_surface_dice(
            y_pred,
            y,
            class_thresholds=[float(tolerance)] * len(labels),
            include_background=True,
            spacing=None if spacing is None else [float(s) for s in spacing],
            use_subvoxels=True,
        )
    return dsc, float(np.nanmean(nsd.numpy()))


def score_case(
    seg_path: str | os.PathLike,
    gt_path: str | os.PathLike,
    tolerance: float = NSD_TOLERANCE,
    nsd_min_dsc: float | None = NSD_MIN_DSC,
    spacing_order: str = "array",
) -> tuple[float, float]:
    """DSC and NSD of ``segs`` in ``seg_path`` against ``gts`` in ``gt_path`` (see :func:`dsc_nsd`).

    A 3D case's spacing is read from the gts file (key ``spacing``), as the challenge's evaluation.

    Raises:
        CaseError: a missing key (``segs``, ``gts``, a 3D case's ``spacing``) or shapes that differ.
    """
    if spacing_order not in SPACING_ORDERS:
        raise InputError(f"spacing_order must be one of {SPACING_ORDERS}, got {spacing_order!r}.")
    case = _case_name(gt_path)
    gt = _read_npz(gt_path, ("gts",), optional=("spacing",))
    seg = _read_npz(seg_path, ("segs",))
    gts, segs = gt["gts"], seg["segs"]
    if gts.shape != segs.shape:
        raise CaseError(
            case, "segs", f"has shape {tuple(segs.shape)} but 'gts' has {tuple(gts.shape)}; they must match."
        )
    if gts.ndim not in (2, 3):
        raise CaseError(case, "gts", f"has shape {tuple(gts.shape)}; (H, W) or (D, H, W) labels are needed.")
    for key, a in (("gts", gts), ("segs", segs)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise CaseError(case, key, f"has values of type {a.dtype}; integer labels are needed.")
    spacing = None
    if gts.ndim == 3:
        if "spacing" not in gt:
            raise CaseError(case, "spacing", "missing from the gts npz; a 3D case needs its voxel spacing (3 numbers).")
        spacing = np.asarray(gt["spacing"], dtype=np.float64).reshape(-1)
        if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise CaseError(case, "spacing", f"is {spacing.tolist()}; 3 positive numbers are needed.")
        if spacing_order == "xyz":
            spacing = spacing[::-1]
    return dsc_nsd(gts, segs, spacing, tolerance, nsd_min_dsc)


def _read_timing(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def summarize(scores: Sequence[CaseScore]) -> dict:
    """Counts, mean/median of DSC, NSD and seconds over the scored cases (``total`` seconds over all cases), and
    the failed cases with their reasons."""
    ok = [s for s in scores if s.status == "ok"]

    def stats(values: list[float]) -> dict[str, float | None]:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return {"mean": None, "median": None}
        return {"mean": round(float(np.mean(values)), 4), "median": round(float(np.median(values)), 4)}

    return {
        "cases": len(scores),
        "scored": len(ok),
        "failed": len(scores) - len(ok),
        "DSC": stats([s.DSC for s in ok]),
        "NSD": stats([s.NSD for s in ok]),
        "seconds": {
            **stats([s.seconds for s in ok if s.seconds is not None]),
            "total": round(sum(s.seconds or 0.0 for s in scores), 3),
        },
        "failed_cases": {s.case: s.error for s in scores if s.status != "ok"},
    }


def evaluate_folder(
    seg_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    output_csv: str | os.PathLike | None = None,
    timing_csv: str | os.PathLike | None = None,
    tolerance: float = NSD_TOLERANCE,
    nsd_min_dsc: float | None = NSD_MIN_DSC,
    spacing_order: str = "array",
) -> tuple[list[CaseScore], dict]:
    """Score every ``gt_dir/*.npz`` against ``seg_dir/<case>.npz``; one row per case, and a summary.

    A case whose inference failed (``timing.csv`` says why), whose segmentation is missing, or
    whose files are wrong gets ``status = "failed"`` and the reason in ``error``; it is left out
    of the DSC/NSD statistics and counted in ``failed``. Cases that only ``timing.csv`` knows
    (inference failed and there is no reference) are listed too.

    Args:
        seg_dir: the ``segs`` folder.
        gt_dir: the ``gts`` folder.
        output_csv: where to write the rows (``case, DSC, NSD, seconds, status, error``); None: not written.
        timing_csv: inference's ``timing.csv``; default ``seg_dir/timing.csv`` if it exists.
        tolerance, nsd_min_dsc, spacing_order: see :func:`dsc_nsd` and :func:`score_case`.

    Returns:
        ``(rows, summary)`` (see :func:`summarize`).

    Raises:
        InputError: ``gt_dir`` is not a folder.
    """
    gt_folder, seg_folder = Path(gt_dir), Path(seg_dir)
    if not gt_folder.is_dir():
        raise InputError(f"gt_dir {os.fspath(gt_dir)!r} is not a folder; give the challenge's gts/ folder.")
    if spacing_order not in SPACING_ORDERS:
        raise InputError(f"spacing_order must be one of {SPACING_ORDERS}, got {spacing_order!r}.")
    timing = _read_timing(Path(timing_csv) if timing_csv is not None else seg_folder / TIMING_FILE)
    cases = sorted({_case_name(p) for p in gt_folder.glob("*.npz")} | set(timing))
    scores = []
    for case in cases:
        run = timing.get(case, {})
        seconds = float(run["seconds"]) if run.get("seconds") else None
        gt_path, seg_path = gt_folder / f"{case}.npz", seg_folder / f"{case}.npz"
        if run.get("status") == "failed":
            scores.append(CaseScore(case, None, None, seconds, "failed", f"inference: {run.get('error', '')}"))
        elif not gt_path.is_file():
            scores.append(CaseScore(case, None, None, seconds, "failed", f"no reference {gt_path.name} in gt_dir"))
        elif not seg_path.is_file():
            scores.append(CaseScore(case, None, None, seconds, "failed", f"no segmentation {seg_path.name} in seg_dir"))
        else:
            try:
                dsc, nsd = score_case(seg_path, gt_path, tolerance, nsd_min_dsc, spacing_order)
                scores.append(CaseScore(case, round(dsc, 4), round(nsd, 4), seconds, "ok"))
            except InputError as e:
                scores.append(CaseScore(case, None, None, seconds, "failed", f"evaluation: {e}"))
    if output_csv is not None:
        _write_csv(output_csv, (asdict(s) for s in scores), ("case", "DSC", "NSD", "seconds", "status", "error"))
    return scores, summarize(scores)


def write_summary(summary: dict, path: str | os.PathLike) -> None:
    """Write a :func:`summarize` result as JSON (atomically)."""
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
