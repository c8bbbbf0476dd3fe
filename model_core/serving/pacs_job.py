"""The in-context job on a PACS: each unlabelled series of a study list segmented in context of the PACS's SEGs.

    icl-sam2 segment-studies --dicomweb http://127.0.0.1:8042/dicom-web --studies 1.2.3 --checkpoint model.pt

The loop it serves: a radiologist labels a series in a viewer (OHIF 3.13's brush, stored as
a SEG), this job segments every other series in context of it and stores each result as a
SEG identified as the model's; the radiologist opens a result, corrects it, stores it, and
the next run uses the correction as support. MONAI Label answers one image per request and
has no batch job over a PACS; this is that job, on the same model path as the app
(:class:`~model_core.serving.service.SegmentationService`: the bundle's preprocessing,
:func:`~model_core.workflows.inferers.build_support` and
:class:`~model_core.workflows.inferers.InContextInferer`, the bundle's postprocessing).

Which SEG is what (:mod:`model_core.io.dicomweb`):

1. **Support**: the newest SEG of every image series of the PACS, if a person drew or
   corrected it (no ``AUTOMATIC`` segment), newest first, at most ``max_support_volumes``.
   A model's unreviewed result is never support: the model does not learn from itself.
2. **Labels**: ``labels`` if given, else every segment name of the support SEGs (values
   1..N in name order): a structure is what a person named it.
3. **Queries**: every image series of ``studies`` that no SEG labels yet. A series whose
   newest SEG is the model's is waiting for review and is not segmented again.
4. **Results**: stored as SEGs whose segments are ``AUTOMATIC`` with the algorithm name
   of :meth:`~model_core.io.seg_metadata.SegIdentity.for_model` (the model, its weights file and
   digest; preset and size in the content description); an empty result is
   reported and not stored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pydicom

from model_core.io.dicom import label_to_dicom_seg, read_series
from model_core.io.dicomweb import ImageSeries, Pacs, SegInstance, newest_by_series, seg_to_label
from model_core.io.seg_metadata import SegIdentity
from model_core.io.validation import InputError
from model_core.modeling.checkpoint import checkpoint_record
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

__all__ = ["JobPlan", "JobSettings", "SeriesResult", "plan_job", "segment_studies"]


@dataclass
class JobSettings:
    """The model the job runs (as ``icl-sam2 serve``'s ``--conf``); ``None`` takes the checkpoint's own record.

    Args:
        bundle_dir: the MONAI bundle whose configs define pre- and postprocessing.
        checkpoint: weights (``None`` or a missing file: the preset's initial weights, reported as untrained).
        preset, image_size, modality, window, percentiles, channel_mode: given values win; else the
            checkpoint's record (what it was trained with); else :class:`ServiceConfig`'s defaults.
        device, precision: where and how the network runs.
        max_support_volumes: support SEGs used, newest first.
        num_support_slices: support slices per structure.
    """

    bundle_dir: str
    checkpoint: str | None = None
    preset: str | None = None
    image_size: int | None = None
    modality: str | None = None
    window: Sequence[float] | None = None
    percentiles: Sequence[float] | None = None
    channel_mode: str | None = None
    device: str = "cpu"
    precision: str = "fp32"
    max_support_volumes: int = 4
    num_support_slices: int = 3

    def service_config(self, labels: dict[str, int]) -> ServiceConfig:
        """The :class:`ServiceConfig` for ``labels``, the checkpoint's record filling what is not given."""
        record = checkpoint_record(self.checkpoint) if self.checkpoint and os.path.isfile(self.checkpoint) else {}
        chosen = {}
        for key in ("preset", "image_size", "modality", "window", "percentiles", "channel_mode"):
            given = getattr(self, key)
            value = given if given is not None else record.get(key)
            if value is not None:
                chosen[key] = int(value) if key == "image_size" else value
        return ServiceConfig(
            bundle_dir=self.bundle_dir,
            labels=labels,
            checkpoint=self.checkpoint,
            device=self.device,
            precision=self.precision,
            max_support_volumes=int(self.max_support_volumes),
            num_support_slices=int(self.num_support_slices),
            **chosen,
        )


@dataclass
class SeriesResult:
    """What the job did with one query series.

    Attributes:
        status: ``stored`` (a SEG is in the PACS), ``empty`` (nothing found, nothing stored) or ``failed``.
        seg_series_uid: the stored SEG's SeriesInstanceUID.
        segments: ``{name: voxels}`` of the result.
        confidence: ``{name: confidence in [0, 1]}``.
    """

    study_uid: str
    series_uid: str
    status: str
    seg_series_uid: str | None = None
    segments: dict[str, int] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def _identity(service: SegmentationService) -> SegIdentity:
    """Who made the job's SEGs: the in-context model and its weights, as the app's SEGs say it."""
    return SegIdentity.for_model("icl_sam2", service.model_info())


def _support_labels(supports: Sequence[SegInstance]) -> dict[str, int]:
    names = sorted({name for seg in supports for name in seg.segments.values() if name})
    if not names:
        raise InputError("The support SEGs name no segments; name the structures (SegmentLabel) in the viewer.")
    return {name: value for value, name in enumerate(names, start=1)}


def _check_labels(labels: Any) -> dict[str, int]:
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and k.strip() and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535
        for k, v in labels.items()
    ):
        raise InputError(f"labels must be {{name: value}} with values 1..65535, e.g. {{'liver': 1}}; got {labels!r}.")
    if len(set(labels.values())) != len(labels):
        raise InputError(f"Two labels share a value in {labels}; give each structure its own value.")
    return {str(k): int(v) for k, v in labels.items()}


def _as_uids(studies: str | Sequence[str] | None) -> list[str] | None:
    if studies is None or studies == "":
        return None
    if isinstance(studies, (str, int, float)):
        studies = [s for s in str(studies).replace(",", " ").split() if s]
    uids = [str(s).strip() for s in studies]
    for uid in uids:
        if not uid or len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid):
            raise ValueError(f"{uid!r} is no StudyInstanceUID (digits and dots, at most 64 characters).")
    return uids


@dataclass
class JobPlan:
    """What a run would do (:func:`plan_job`).

    Attributes:
        series: ``{SeriesInstanceUID: ImageSeries}`` of every image series of the PACS.
        supports: the reviewed SEGs to learn from, newest first.
        queries: the series of the study list to segment (no SEG yet).
        skipped: ``{SeriesInstanceUID: why}`` for the study list's series that have a SEG.
    """

    series: dict[str, ImageSeries]
    supports: list[SegInstance]
    queries: list[ImageSeries]
    skipped: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "support": [
                {"series_uid": s.referenced_series_uid, "seg_sop_uid": s.sop_uid, "segments": s.segments}
                for s in self.supports
            ],
            "queries": [q.series_uid for q in self.queries],
            "skipped": self.skipped,
        }


def plan_job(pacs: Pacs, studies: str | Sequence[str] | None = None, max_support_volumes: int = 4) -> JobPlan:
    """Which SEGs are support and which series of ``studies`` (default: all) are segmented (the module's rules 1, 3).

    Raises:
        InputError: no series of the PACS has a reviewed SEG (naming what to do).
    """
    uids = _as_uids(studies)
    everything = pacs.image_series()
    by_uid = {s.series_uid: s for s in everything}
    newest = newest_by_series(s for s in pacs.seg_instances() if s.referenced_series_uid in by_uid)
    supports = sorted((s for s in newest.values() if s.reviewed), key=lambda s: s.stamp, reverse=True)
    wanted = pacs.image_series(uids) if uids else everything
    skipped = {
        s.series_uid: ("labelled (support)" if newest[s.series_uid].reviewed else "the model's result, awaiting review")
        for s in wanted
        if s.series_uid in newest
    }
    if not supports:
        raise InputError(
            "No series of the PACS has a SEG drawn or corrected by a person, so there is no support set: label one "
            "series in the viewer (OHIF: Segmentation mode, brush, store as DICOM SEG) and run the job again."
        )
    return JobPlan(
        series=by_uid,
        supports=supports[: max(int(max_support_volumes), 1)],
        queries=[s for s in wanted if s.series_uid not in newest],
        skipped=skipped,
    )


def segment_studies(
    dicomweb: str,
    settings: JobSettings,
    studies: str | Sequence[str] | None = None,
    labels: dict[str, int] | None = None,
    work_dir: str | os.PathLike | None = None,
    store: bool = True,
    on_result: Callable[[SeriesResult], None] | None = None,
) -> dict[str, Any]:
    """Segment every image series of ``studies`` that has no SEG, in context of the PACS's reviewed SEGs.

    Args:
        dicomweb: the PACS's DICOMweb root (QIDO-RS, WADO-RS, STOW-RS).
        settings: the model (:class:`JobSettings`).
        studies: StudyInstanceUIDs whose series to segment (a list, or one string separated by commas or
            spaces); ``None``: every study of the PACS. Support comes from every study either way.
        labels: ``{segment name: label value}`` to segment; ``None``: the support SEGs' segment names.
        work_dir: keeps the downloaded series, label maps and SEGs (a temporary folder, removed, by default).
        store: store each result in the PACS (``False``: only write it under ``work_dir``).
        on_result: called with each :class:`SeriesResult` as soon as it is done.

    Returns:
        ``{"dicomweb", "labels", "model", "support": [{"series_uid", "seg_sop_uid", "segments"}], "queries",
        "skipped": {series UID: why}, "results": [SeriesResult as dict]}`` (``model`` is ``None`` when there
        was nothing to segment).

    Raises:
        ValueError: the PACS does not answer, a StudyInstanceUID is malformed, or there is no reviewed SEG to
            learn from (:class:`InputError`, naming what to do).
    """
    pacs = Pacs(dicomweb)
    plan = plan_job(pacs, studies, settings.max_support_volumes)
    by_uid, supports, queries = plan.series, plan.supports, plan.queries
    labels = _check_labels(labels) if labels else _support_labels(supports)
    if not queries:
        return {"dicomweb": pacs.url, "labels": labels, "model": None, **plan.as_dict(), "results": []}
    own_work = work_dir is None
    work = tempfile.mkdtemp(prefix="icl_sam2_job_") if own_work else os.fspath(work_dir)
    try:
        labelled, support_info = _support_set(pacs, supports, by_uid, labels, os.path.join(work, "support"))
        service = SegmentationService(settings.service_config(labels))
        results = []
        for series in queries:
            result = _segment_one(pacs, service, series, labelled, labels, os.path.join(work, "queries"), store)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return {
            "dicomweb": pacs.url,
            "labels": labels,
            "model": {**service.model_info(), "algorithm_name": _identity(service).algorithm_name},
            **plan.as_dict(),
            "support": support_info,
            "results": [r.__dict__ for r in results],
        }
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _support_set(
    pacs: Pacs, supports: Sequence[SegInstance], by_uid: dict[str, ImageSeries], labels: dict[str, int], work: str
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """The support SEGs as ``[{"image", "label"}]`` NIfTI pairs on their images' grids, and what each held.

    A SEG that cannot be used (undecodable, off its image's grid) is reported with its ``problem`` and left out.

    Raises:
        InputError: no SEG is usable, or a label is in none of them (naming it).
    """
    labelled, info = [], []
    for seg in supports:
        folder = os.path.join(work, seg.referenced_series_uid)
        entry: dict[str, Any] = {"series_uid": seg.referenced_series_uid, "seg_sop_uid": seg.sop_uid}
        try:
            image = _series_nifti(pacs, by_uid[seg.referenced_series_uid], folder)[0]
            label = os.path.join(folder, "label.nii.gz")
            decoded = seg_to_label(pacs.download_seg(seg, os.path.join(folder, "seg.dcm")), image, labels, label)
            entry["segments"] = decoded["segments"]
            if decoded["segments"]:
                labelled.append({"image": image, "label": label})
        except InputError as e:
            entry["problem"] = str(e)
        info.append(entry)
    found = {name for entry in info for name in entry.get("segments", {})}
    absent = sorted(set(labels) - found)
    if not labelled or absent:
        raise InputError(
            f"No reviewed SEG of the PACS holds {absent or sorted(labels)} (support: {info}); label it in a series "
            "(a segment of that name) or leave it out of labels."
        )
    return labelled, info


def _series_nifti(pacs: Pacs, series: ImageSeries, folder: str) -> tuple[str, list[str]]:
    """The series downloaded to ``folder/dicom`` and read as ``folder/image.nii.gz`` (ITK, as MONAI Label reads it)."""
    files = pacs.download_series(series, os.path.join(folder, "dicom"))
    image = os.path.join(folder, "image.nii.gz")
    nib.save(read_series(os.path.join(folder, "dicom")), image)
    return image, files


def _segment_one(
    pacs: Pacs,
    service: SegmentationService,
    series: ImageSeries,
    labelled: list[dict[str, str]],
    labels: dict[str, int],
    work: str,
    store: bool,
) -> SeriesResult:
    start = time.perf_counter()
    result = SeriesResult(series.study_uid, series.series_uid, "failed")
    try:
        folder = os.path.join(work, series.series_uid)
        image, files = _series_nifti(pacs, series, folder)
        segmentation = service.segment(image, labelled, wait_s=float("inf"))
        array = np.asarray(segmentation.label)[0].astype(np.uint16)  # (I, J, K) on the image's grid
        names = {v: k for k, v in labels.items()}
        result.segments = {names[int(v)]: int((array == v).sum()) for v in np.unique(array) if v in names}
        result.confidence = dict(segmentation.confidence)
        if not result.segments:
            result.status = "empty"
            return result
        affine = np.asarray(segmentation.label.affine, dtype=np.float64)
        label = nib.Nifti1Image(array, affine)
        nib.save(label, os.path.join(folder, "label.nii.gz"))
        seg_file = label_to_dicom_seg(
            label,
            files,
            labels,
            os.path.join(folder, "seg.dcm"),
            identity=_identity(service),
        )
        if store:
            pacs.store([seg_file])
        result.seg_series_uid = str(pydicom.dcmread(seg_file, stop_before_pixels=True).SeriesInstanceUID)
        result.status = "stored" if store else "written"
    except Exception as e:  # one series' problem is reported; the others still run
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.seconds = round(time.perf_counter() - start, 3)
    return result
