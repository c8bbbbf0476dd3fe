"""The bundle's LiteMedSAM inference (``bundle/configs/medsam_lite.json``): images and boxes in, label maps (and Dice)
out.

``monai.bundle run`` needs one object whose method does the work; MONAI's ``Evaluator``
and ``SaveImaged`` assume a network that maps a whole (resampled) image to logits, whereas
LiteMedSAM runs per slice and per box on the file's own grid
(:mod:`model_core.medsam_lite.volume`), so the loop over images is written here. Metrics
are MONAI's ``DiceMetric``.

Boxes per image and structure come from a JSON/CSV file (:func:`~model_core.medsam_lite.volume.read_box_file`)
or, for evaluation, from each structure's 3D bounding box in a reference label (the
challenge's rule); with a label, Dice per structure is reported.

Outputs in ``output_dir``: ``<image stem>_seg.nii.gz`` (label values of the structures,
the image's affine), ``cases.csv`` (one row per image and structure: voxels, predicted IoU,
Dice, or the error that stopped the image) and ``summary.json`` (mean and median Dice per
structure). A bad image or box is reported in ``cases.csv`` and the next image goes on.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.metrics import DiceMetric

from model_core.io.files import atomic_path, volume_stem
from model_core.io.validation import InputError, as_3d, load_volume
from model_core.medsam_lite.model import STOP_IOU, LiteMedSAM, check_slice_step
from model_core.medsam_lite.volume import (
    CT_WINDOW,
    MRI_PERCENTILES,
    Structure,
    boxes_from_label,
    read_box_file,
    segment_structures,
)

__all__ = ["CASE_COLUMNS", "BoxInference"]

logger = logging.getLogger(__name__)

CASE_COLUMNS = ("image", "structure", "value", "voxels", "predicted_iou", "dice", "slices", "error")


class BoxInference:
    """LiteMedSAM over a list of images, one box per structure.

    Args:
        model: the LiteMedSAM to run.
        output_dir: where label maps, ``cases.csv`` and ``summary.json`` go.
        boxes_file: JSON or CSV of boxes (format: :func:`~model_core.medsam_lite.volume.read_box_file`);
            None: boxes from the labels.
        structures: ``{name: label value}`` to take from the labels (default: every value in each label,
            named by its value).
        modality, window, percentiles: MedSAM's intensity rule
        (:func:`~model_core.medsam_lite.volume.normalize_intensity`).
        min_iou: stopping rule of a box without slice range (none in files or labels: kept for completeness).
        slice_step: propagation's step where masks agree, the slices between filled by interpolation (1: every
            slice; see :meth:`~model_core.medsam_lite.model.LiteMedSAM.segment_volume`).
    """

    def __init__(
        self,
        model: LiteMedSAM,
        output_dir: str,
        boxes_file: str | None = None,
        structures: dict[str, int] | None = None,
        modality: str = "MRI",
        window: Sequence[float] = CT_WINDOW,
        percentiles: Sequence[float] = MRI_PERCENTILES,
        min_iou: float = STOP_IOU,
        slice_step: int = 1,
    ):
        self.model, self.output_dir = model, Path(output_dir)
        self.boxes = read_box_file(boxes_file) if boxes_file else None
        self.structures = None if structures is None else {str(k): int(v) for k, v in dict(structures).items()}
        self.modality, self.window, self.percentiles, self.min_iou = modality, window, percentiles, min_iou
        self.slice_step = check_slice_step(slice_step)

    def _structures(self, image: str, label: np.ndarray | None) -> list[Structure]:
        if self.boxes is not None:
            for key in (image, os.path.abspath(image), os.path.basename(image)):
                if key in self.boxes:
                    return self.boxes[key]
            raise InputError(
                f"boxes_file has no entry for image {os.path.basename(image)!r} (keys are file names or "
                f"paths; it has {sorted(self.boxes)[:5]})."
            )
        if label is None:
            raise InputError("No boxes: give boxes_file, or labels to take each structure's bounding box from.")
        names = self.structures or {str(int(v)): int(v) for v in np.unique(label) if v > 0}
        found = boxes_from_label(label, names)
        if not found:
            raise InputError(f"The label has none of the structures {names}.")
        return found

    def run(self, images: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, Any]:
        """Segment every image; with ``labels`` (same order), score Dice per structure.

        Returns:
            The summary (also written to ``summary.json``).
        """
        images = [str(p) for p in images]
        labels = [str(p) for p in labels] if labels else []
        if not images:
            raise InputError("images is empty: give the image files to segment (--images '[\"a.nii.gz\"]').")
        if labels and len(labels) != len(images):
            raise InputError(
                f"labels has {len(labels)} files for {len(images)} images; give one label per image or none."
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        for n, image in enumerate(images):
            try:
                rows += self._case(image, labels[n] if labels else None)
            except InputError as e:
                logger.error(f"{os.path.basename(image)}: {e}")
                rows.append({"image": os.path.basename(image), "error": str(e)})
        with atomic_path(self.output_dir / "cases.csv", ".csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CASE_COLUMNS)
            writer.writeheader()
            writer.writerows([{c: row.get(c, "") for c in CASE_COLUMNS} for row in rows])
        summary = self._summary(rows, len(images))
        with atomic_path(self.output_dir / "summary.json", ".json") as tmp, open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        logger.info(f"LiteMedSAM: {summary}")
        return summary

    def _case(self, image: str, label_path: str | None) -> list[dict[str, Any]]:
        volume, affine = load_volume(image, "image")
        volume = as_3d(volume, "image", min_size=1)
        reference = None
        if label_path is not None:
            reference = as_3d(load_volume(label_path, "label")[0], "label", min_size=1).astype(np.int32)
            if reference.shape != volume.shape:
                raise InputError(
                    f"The label {os.path.basename(label_path)} has shape {reference.shape}, the image "
                    f"{volume.shape}; they must be on the same grid."
                )
        structures = self._structures(image, reference)
        label, info = segment_structures(
            self.model,
            volume,
            structures,
            self.modality,
            self.window,
            self.percentiles,
            self.min_iou,
            dtype=np.int16,
            slice_step=self.slice_step,
        )
        out = self.output_dir / f"{volume_stem(image)}_seg.nii.gz"
        with atomic_path(out, ".nii.gz") as tmp:
            nib.save(nib.Nifti1Image(label, affine), tmp)
        rows = []
        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        for s in structures:
            run = info["structures"][s.name]
            row = {
                "image": os.path.basename(image),
                "structure": s.name,
                "value": s.value,
                "voxels": run["voxels"],
                "predicted_iou": run["iou"],
                "slices": len(run["slices"]),
            }
            if reference is not None:
                pred = torch.from_numpy(label == s.value)[None, None].float()
                ref = torch.from_numpy(reference == s.value)[None, None].float()
                row["dice"] = round(float(metric(pred, ref).reshape(-1)[0]), 4)
            rows.append(row)
        return rows

    @staticmethod
    def _summary(rows: list[dict[str, Any]], images: int) -> dict[str, Any]:
        per: dict[str, list[float]] = {}
        for row in rows:
            if row.get("dice") not in (None, ""):
                per.setdefault(row["structure"], []).append(float(row["dice"]))
        stats = lambda v: {"n": len(v), "mean": float(np.mean(v)), "median": float(np.median(v))}  # noqa: E731
        return {
            "images": images,
            "failed": sorted({r["image"] for r in rows if r.get("error")}),
            "dice": {name: stats(v) for name, v in per.items()},
            "dice_all": stats([d for v in per.values() for d in v]) if per else None,
        }
