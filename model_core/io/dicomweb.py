"""A DICOMweb PACS seen as labelled volumes: image series, the SEGs that label them, downloads, stores.

dicomweb-client speaks QIDO-RS, WADO-RS and STOW-RS. What in-context work needs on top,
and what this module adds (the app's DICOMweb datastore and the ``icl-sam2 segment-studies``
job both use it):

- **Which SEG labels which series.** A SEG names its image series in
  ``ReferencedSeriesSequence``; :meth:`Pacs.seg_instances` reads that from each SEG
  instance's metadata, with its segments, algorithm types and content date/time, so the
  SEG that labels a series can be chosen (:func:`newest_by_series`). Instances, not series:
  a viewer may store a corrected SEG as another instance of the series it loaded (OHIF's
  "predecessor"; OHIF 3.13 in fact writes a new series, "Research Derived series").
- **Whose SEG it is.** A SEG with any ``AUTOMATIC`` segment is a model's unreviewed result
  (:attr:`SegInstance.reviewed` is false); one a person drew or corrected in a viewer is
  ``MANUAL`` or ``SEMIAUTOMATIC`` (OHIF writes ``MANUAL`` for every segment it stores).
- **A SEG on its image's grid.** :func:`seg_to_label` decodes a SEG (:func:`~model_core.io.dicom.decode_seg`),
  gives its segments label values by name, checks that its frames lie on the image's voxel grid
  and resamples it onto the whole grid (dcmqi and OHIF write only the slices that hold a segment).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from model_core.io.dicom import decode_seg
from model_core.io.validation import InputError

__all__ = [
    "IMAGE_MODALITIES",
    "ImageSeries",
    "Pacs",
    "SegInstance",
    "check_on_grid",
    "newest_by_series",
    "seg_to_label",
]

IMAGE_MODALITIES = ("CT", "MR")
SEG_MODALITY = "SEG"


def seg_to_label(seg_dir: str, reference: str, values_by_name: dict[str, int], out_path: str) -> dict[str, Any]:
    """Decode a DICOM SEG into a label map on its image's grid.

    Args:
        seg_dir: the SEG instance file, or a folder holding it (its first file by name).
        reference: the image (NIfTI) whose grid the label must be on.
        values_by_name: ``{segment label: label value}``; segments with other names are left out (returned).
        out_path: the label map to write (NIfTI), ``(I, J, K)`` uint16 on the reference's grid.

    Returns:
        ``{"segments": {name: value}, "ignored": [names]}``.

    Raises:
        InputError: no readable SEG (400), or its frames are not on the image's grid (422).
    """
    if os.path.isdir(seg_dir):
        files = sorted(os.path.join(seg_dir, f) for f in os.listdir(seg_dir))
    else:
        files = [seg_dir] if os.path.isfile(seg_dir) else []
    if not files:
        raise InputError(f"The SEG series in {seg_dir!r} has no instance.")
    try:
        segments_image, names = decode_seg(pydicom.dcmread(files[0]))
    except Exception as e:
        raise InputError(
            f"The DICOM SEG {os.path.basename(files[0])!r} cannot be decoded ({type(e).__name__}: {e})."
        ) from e
    lut = np.zeros(max(names, default=0) + 1, dtype=np.uint16)
    used, ignored = {}, []
    for number, name in names.items():
        if name in values_by_name:
            lut[number] = values_by_name[name]
            used[name] = values_by_name[name]
        else:
            ignored.append(name)
    grid = sitk.ReadImage(reference)
    check_on_grid(segments_image, grid, os.path.basename(files[0]))
    segments = sitk.GetArrayFromImage(segments_image)
    mapped = sitk.GetImageFromArray(lut[np.clip(segments, 0, len(lut) - 1)])
    mapped.CopyInformation(segments_image)
    # dcmqi and OHIF store only the slices that hold a segment: put the label back on the full image grid
    on_grid = sitk.Resample(mapped, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    sitk.WriteImage(on_grid, out_path, True)
    return {"segments": used, "ignored": ignored}


def check_on_grid(seg, image, name: str, tolerance: float = 1e-3) -> None:
    """A SEG's frames (a SimpleITK image) must lie on its image's voxel grid: same direction and spacing, origin on a
    voxel, inside it.

    Raises:
        InputError: 422, naming what differs.
    """
    if not np.allclose(seg.GetDirection(), image.GetDirection(), atol=tolerance):
        raise InputError(f"The DICOM SEG {name!r} has another orientation than its image series.", status=422)
    if not np.allclose(seg.GetSpacing(), image.GetSpacing(), rtol=tolerance, atol=tolerance):
        raise InputError(
            f"The DICOM SEG {name!r} has spacing {np.round(seg.GetSpacing(), 4).tolist()} but its image series "
            f"{np.round(image.GetSpacing(), 4).tolist()}.",
            status=422,
        )
    start = np.asarray(image.TransformPhysicalPointToContinuousIndex(seg.GetOrigin()))
    end = start + np.asarray(seg.GetSize()) - 1
    if (
        not np.allclose(start, np.round(start), atol=1e-2)
        or np.any(np.round(start) < 0)
        or np.any(np.round(end) > np.asarray(image.GetSize()) - 1)
    ):
        raise InputError(
            f"The DICOM SEG {name!r} frames are not on its image series' grid (they start at voxel "
            f"{np.round(start, 2).tolist()} of an image of size {list(image.GetSize())}).",
            status=422,
        )


@dataclass(frozen=True)
class ImageSeries:
    """An image series of the PACS."""

    study_uid: str
    series_uid: str
    modality: str
    description: str = ""


@dataclass(frozen=True)
class SegInstance:
    """One SEG instance of the PACS and the image series it labels.

    Attributes:
        stamp: ``(ContentDate, ContentTime as seconds, SeriesNumber, InstanceNumber)``; the larger, the newer.
        segments: ``{segment number: SegmentLabel}``.
        algorithm_types: the segments' ``SegmentAlgorithmType`` values.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    referenced_series_uid: str | None
    stamp: tuple
    segments: dict[int, str] = field(default_factory=dict)
    algorithm_types: frozenset[str] = frozenset()
    algorithm_names: frozenset[str] = frozenset()
    description: str = ""

    @property
    def reviewed(self) -> bool:
        """Drawn or corrected by a person: no segment is ``AUTOMATIC`` (a model's result awaiting review)."""
        return "AUTOMATIC" not in self.algorithm_types

    @classmethod
    def from_metadata(cls, meta: Dataset) -> SegInstance:
        """From a SEG instance's DICOM JSON metadata (WADO-RS ``.../metadata``) as a pydicom Dataset."""
        referenced = meta.get("ReferencedSeriesSequence")
        time_of_day = str(meta.get("ContentTime", "") or "")
        seconds = 0.0
        if len(time_of_day) >= 2:
            digits = time_of_day.split(".")[0].ljust(6, "0")
            fraction = float("0." + time_of_day.split(".")[1]) if "." in time_of_day else 0.0
            seconds = int(digits[:2]) * 3600 + int(digits[2:4]) * 60 + int(digits[4:6]) + fraction
        segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in meta.get("SegmentSequence", [])}
        return cls(
            study_uid=str(meta.StudyInstanceUID),
            series_uid=str(meta.SeriesInstanceUID),
            sop_uid=str(meta.SOPInstanceUID),
            referenced_series_uid=str(referenced[0].SeriesInstanceUID) if referenced else None,
            stamp=(
                str(meta.get("ContentDate", "") or ""),
                seconds,
                int(meta.get("SeriesNumber", 0) or 0),
                int(meta.get("InstanceNumber", 0) or 0),
            ),
            segments=segments,
            algorithm_types=frozenset(str(s.get("SegmentAlgorithmType", "")) for s in meta.get("SegmentSequence", [])),
            algorithm_names=frozenset(
                str(s.SegmentAlgorithmName) for s in meta.get("SegmentSequence", []) if s.get("SegmentAlgorithmName")
            ),
            description=str(meta.get("SeriesDescription", "") or ""),
        )


def newest_by_series(segs: Iterable[SegInstance]) -> dict[str, SegInstance]:
    """``{image series UID: the SEG that labels it}``: its newest reviewed SEG, else its newest SEG (SEGs that name no
    series are left out).

    Reviewed first, then by :attr:`SegInstance.stamp`: a model's result is made only for a series without a SEG, so a
    person's SEG of the same series is a later correction, whatever the clocks of the viewer and the job say
    (a browser writes its own local time into ``ContentTime``).
    """
    newest: dict[str, SegInstance] = {}
    for seg in segs:
        target = seg.referenced_series_uid
        if target and (
            target not in newest or (seg.reviewed, seg.stamp) >= (newest[target].reviewed, newest[target].stamp)
        ):
            newest[target] = seg
    return newest


class Pacs:
    """A DICOMweb PACS (Orthanc, a hospital PACS) through dicomweb-client.

    Args:
        url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.

    Raises:
        ValueError: the URL does not answer QIDO-RS (naming it and what to do).
    """

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is no DICOMweb root URL; give e.g. http://127.0.0.1:8042/dicom-web.")
        self.client = DICOMwebClient(url=self.url)
        try:
            self.client.search_for_studies(limit=1)
        except Exception as e:
            raise ValueError(
                f"The PACS at {self.url} does not answer QIDO-RS ({type(e).__name__}: {e}); start it "
                "(icl-sam2 orthanc) or fix the DICOMweb root URL."
            ) from e

    def _series(self, study_uid: str | None, modality: str) -> list[Dataset]:
        found = self.client.search_for_series(
            study_instance_uid=study_uid, search_filters={"Modality": modality}, get_remaining=True
        )
        return [Dataset.from_json(item) for item in found]

    def image_series(
        self, studies: Sequence[str] | None = None, modalities: Sequence[str] = IMAGE_MODALITIES
    ) -> list[ImageSeries]:
        """The image series of ``studies`` (every study when ``None``), sorted by study, then series UID."""
        out = set()
        for study in list(studies) if studies else [None]:
            for modality in modalities:
                for ds in self._series(study, modality):
                    out.add(
                        ImageSeries(
                            str(ds.StudyInstanceUID),
                            str(ds.SeriesInstanceUID),
                            str(ds.get("Modality", modality)),
                            str(ds.get("SeriesDescription", "") or ""),
                        )
                    )
        return sorted(out, key=lambda s: (s.study_uid, s.series_uid))

    def seg_instances(self, studies: Sequence[str] | None = None) -> list[SegInstance]:
        """Every SEG instance of ``studies`` (every study when ``None``), from its series' metadata."""
        out = []
        for study in list(studies) if studies else [None]:
            for ds in self._series(study, SEG_MODALITY):
                metadata = self.client.retrieve_series_metadata(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                out += [SegInstance.from_metadata(Dataset.from_json(item)) for item in metadata]
        return out

    def download_series(self, series: ImageSeries, folder: str | os.PathLike) -> list[str]:
        """The series' instances as DICOM files ``IM0001.dcm``... in ``folder`` (created); returns their paths."""
        os.makedirs(folder, exist_ok=True)
        files = []
        for number, ds in enumerate(self.client.retrieve_series(series.study_uid, series.series_uid), start=1):
            path = os.path.join(folder, f"IM{number:04d}.dcm")
            ds.save_as(path, write_like_original=False)
            files.append(path)
        if not files:
            raise InputError(f"Series {series.series_uid} of the PACS at {self.url} has no instances.", status=422)
        return files

    def download_seg(self, seg: SegInstance, path: str | os.PathLike) -> str:
        """The SEG instance as a DICOM file at ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.client.retrieve_instance(seg.study_uid, seg.series_uid, seg.sop_uid).save_as(
            str(path), write_like_original=False
        )
        return str(path)

    def store(self, files: Sequence[str | os.PathLike]) -> None:
        """Store DICOM files through STOW-RS.

        Raises:
            ValueError: the PACS refused one (its FailedSOPSequence) or did not answer.
        """
        datasets = [pydicom.dcmread(str(f)) for f in files]
        try:
            reply = self.client.store_instances(datasets)
        except Exception as e:
            raise ValueError(f"STOW-RS to {self.url} failed ({type(e).__name__}: {e}).") from e
        failed = reply.get("FailedSOPSequence") if reply is not None else None
        if failed:
            raise ValueError(f"The PACS at {self.url} refused {len(failed)} instance(s): {failed}")
