"""A DICOMweb PACS (Orthanc, a hospital PACS) as the app's datastore: images are series, final labels DICOM SEG.

MONAI Label's ``DICOMWebDatastore`` is the base (download and NIfTI conversion of
series, SEG upload through STOW-RS, its local cache). What it lacks for this app:

- **The support set.** Its labelled-image list drops the SEG's own UID, and its SEG
  conversion caches the label under the image's id, so a replaced SEG is never seen
  again. Here :meth:`final_labels` links each SEG to the series it references, decodes
  it once per SEG UID, maps its segments to label values by name (``--conf labels``)
  and resamples it onto its image's grid (dcmqi writes only the slices that hold a
  segment), so the result passes the same checks as a local label.
- **Fresh lists.** Its series lists are cached for two hours (a label saved from a
  viewer would not be support for two hours); here for ``list_ttl`` seconds (default 5)
  and emptied on every save.
- **Modalities.** Its search filter is one QIDO query (CT only by default); here one
  query per modality of ``modalities`` (default CT and MR), merged.
- **Checks.** Ids are series UIDs that the PACS lists (anything else is "not in the
  datastore"), a label must pass ``model_core.io.validation`` before anything is written
  to the PACS, and SEG segments are named after the configured labels. An unreachable
  PACS is an error at start-up naming the URL.
- **SEGs viewers show well.** Its SEGs say "AIName", "Reader1" and ``AUTOMATIC`` and are drawn
  in one colour; here they carry the project's names, colours and identity (:meth:`store_seg`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable

import pydicom
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import itk_image_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.requests import check_id, check_tag, http_error
from model_core.io.dicomweb import SegInstance, newest_by_series, seg_to_label
from model_core.io.files import atomic_path
from model_core.io.seg_metadata import SegIdentity, seg_metainfo
from model_core.io.validation import InputError, check_label_volume

logger = logging.getLogger(__name__)

__all__ = ["CheckedDICOMwebDatastore", "dcmqi_seg", "seg_to_label"]


def dcmqi_seg(label_file: str, series_dir: str, metainfo: dict[str, Any]) -> str:
    """A label map as a DICOM SEG of the series in ``series_dir``, by dcmqi (MONAI Label's ``itk_image_to_dicom_seg``).

    Args:
        label_file: the label map (NIfTI) on the series' grid; segments by label value.
        series_dir: the series' DICOM files.
        metainfo: :func:`model_core.io.seg_metadata.seg_metainfo` with ``labelID`` = label value.

    Returns:
        A new temporary ``.dcm`` file (the caller removes it). dcmqi writes "DCMQI" as content label and
        description whatever its metadata says; they are set from ``metainfo`` here.

    Raises:
        RuntimeError: dcmqi wrote no SEG (its output is in the log).
    """
    seg_file = itk_image_to_dicom_seg(label_file, series_dir, metainfo)
    if not os.path.isfile(seg_file) or not os.path.getsize(seg_file):
        if os.path.exists(seg_file):
            os.unlink(seg_file)
        raise RuntimeError(f"dcmqi's itkimage2segimage wrote no SEG of {series_dir} (see its output above).")
    seg = pydicom.dcmread(seg_file)
    seg.ContentLabel, seg.ContentDescription = metainfo["ContentLabel"], metainfo["ContentDescription"]
    seg.save_as(seg_file)
    return seg_file


class CheckedDICOMwebDatastore(DICOMWebDatastore):
    """MONAI Label's ``DICOMWebDatastore`` with a fresh, multi-modality series list, SEG labels as support and checks.

    Args:
        client: a ``DICOMwebClient`` of the PACS's DICOMweb root.
        labels: ``{name: label value}`` (``--conf labels``): SEG segment names.
        modalities: series modalities listed as images.
        cache_path: local cache of downloaded series (MONAI Label's).
        list_ttl: seconds a series list is reused.
        seg_identity: who made a label saved as final, from its ``label_info`` (default: ``MANUAL``).
    """

    def __init__(
        self,
        client,
        labels: dict[str, int],
        modalities: Iterable[str] = ("CT", "MR"),
        cache_path: str | None = None,
        list_ttl: float = 5.0,
        seg_identity: Callable[[dict[str, Any]], SegIdentity] | None = None,
    ):
        self.labels = dict(labels)
        self.seg_identity = seg_identity or (lambda label_info: SegIdentity())
        self.modalities = [str(m) for m in modalities]
        self.list_ttl = float(list_ttl)
        self._lists: dict[str, tuple[float, Any]] = {}
        self._download_lock = threading.RLock()
        try:
            client.search_for_series(search_filters={"Modality": self.modalities[0]}, limit=1)
        except Exception as e:
            raise ValueError(
                f"The DICOMweb server {client.base_url!r} (--studies) is not reachable or not DICOMweb: "
                f"{type(e).__name__}: {e}. Start the PACS (icl-sam2 orthanc) or fix the URL."
            ) from e
        super().__init__(
            client,
            search_filter={"Modality": self.modalities[0]},
            cache_path=cache_path,
            fetch_by_frame=False,
            convert_to_nifti=True,
        )

    # ------------------------------------------------------------------ lists
    def _cached(self, key: str, compute: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = self._lists.get(key)
        if hit is None or now - hit[0] > self.list_ttl:
            hit = (now, compute())
            self._lists[key] = hit
        return hit[1]

    def _series(self, filters: dict[str, Any]) -> list[Dataset]:
        try:
            return [Dataset.from_json(ds) for ds in self._client.search_for_series(search_filters=filters)]
        except Exception as e:
            raise http_error(self._pacs_error(e, "Listing series")) from e

    def status(self) -> dict[str, Any]:
        """MONAI Label's counts for /info; while the PACS does not answer, /info still does, and says why."""
        from fastapi import HTTPException

        try:
            return super().status()
        except HTTPException as e:
            return {"total": 0, "completed": 0, "label_tags": {}, "error": str(e.detail)}

    def list_images(self) -> list[str]:
        def compute():
            uids = []
            for modality in self.modalities:
                uids += [str(ds.SeriesInstanceUID) for ds in self._series({"Modality": modality})]
            return sorted(set(uids))

        return self._cached("images", compute)

    def seg_links(self) -> dict[str, str]:
        """``{image series UID: SEG series UID}`` of the SEGs that reference a listed image.

        Which SEG labels a series is :func:`model_core.io.dicomweb.newest_by_series`'s rule (a person's before
        a model's, then the newest), as for ``icl-sam2 segment-studies``.
        """

        def compute():
            images, segs = set(self.list_images()), []
            for seg in self._series({"Modality": "SEG"}):
                meta = Dataset.from_json(
                    self._client.retrieve_series_metadata(str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID))[0]
                )
                try:
                    instance = SegInstance.from_metadata(meta)
                except (AttributeError, TypeError, ValueError) as e:  # one malformed SEG never hides the others
                    logger.warning(f"SEG {seg.SeriesInstanceUID} has unreadable metadata ({e}); ignored.")
                    continue
                if instance.referenced_series_uid not in images:
                    logger.warning(
                        f"SEG {seg.SeriesInstanceUID} references no listed image series "
                        f"({instance.referenced_series_uid}); ignored."
                    )
                    continue
                segs.append(instance)
            return {image: instance.series_uid for image, instance in newest_by_series(segs).items()}

        return self._cached("segs", compute)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(self.seg_links())

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.seg_links()))

    def refresh(self) -> None:
        self._lists.clear()
        super().refresh()

    # ------------------------------------------------------------------ files
    def get_image_uri(self, image_id: str) -> str:
        """The series as NIfTI (downloaded once), or "" when it is no listed image series.

        Raises:
            HTTPException: 422 the series is no volume (e.g. slices of mixed sizes), 502 the PACS did not answer.
        """
        try:
            check_id(image_id, "image")
        except InputError:
            return ""
        if image_id not in self.list_images():
            return ""
        with self._download_lock:
            try:
                return super().get_image_uri(image_id)
            except Exception as e:
                raise http_error(self._pacs_error(e, f"Series {image_id}")) from e

    def _pacs_error(self, error: Exception, what: str) -> InputError:
        import requests

        if isinstance(error, (requests.RequestException, ConnectionError)):
            return InputError(
                f"{what}: the PACS at {self._client.base_url} did not answer ({type(error).__name__}: {error}).",
                status=502,
            )
        return InputError(f"{what} cannot be read as a volume ({type(error).__name__}: {error}).", status=422)

    def _label_of(self, image_id: str, seg_id: str, image: str) -> str:
        """The SEG as a NIfTI label map on its image's grid, decoded once per SEG UID."""
        folder = self._datastore.label_path(DefaultLabelTag.FINAL.value)
        label = os.path.join(folder, f"{seg_id}.nii.gz")
        if not os.path.exists(label):
            seg_dir = os.path.join(folder, seg_id)
            if not os.path.isdir(seg_dir) or not os.listdir(seg_dir):
                dicom_web_download_series(None, seg_id, seg_dir, self._client, False)
            with atomic_path(label, suffix=".nii.gz") as tmp:
                info = seg_to_label(seg_dir, image, self.labels, tmp)
            if info["ignored"]:
                logger.warning(
                    f"SEG {seg_id} of {image_id}: segments {info['ignored']} are not configured labels; left out."
                )
        return label

    def final_labels(self) -> list[dict[str, str]]:
        """``[{"id", "image", "label"}]``: every image series with a SEG, both as NIfTI on the image's grid.

        A SEG that cannot be used (undecodable, frames off its image's grid) comes back
        with ``"problem"`` instead of a label, so it is skipped, not fatal.
        """
        out = []
        for image_id, seg_id in self.seg_links().items():
            with self._download_lock:
                try:
                    image = self.get_image_uri(image_id)
                    out.append({"id": image_id, "image": image, "label": self._label_of(image_id, seg_id, image)})
                except Exception as e:
                    problem = getattr(e, "detail", None) or str(self._pacs_error(e, f"SEG {seg_id}"))
                    out.append({"id": image_id, "image": "", "label": "", "problem": str(problem)})
        return out

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Training pairs: the usable final labels, decoded onto their images' grids (MONAI Label's own
        ``datalist`` decodes SEGs without resampling, off-grid for dcmqi's SEGs, and unmapped to label values)."""
        from lib.datastore import labelled_volumes

        usable, _ = labelled_volumes(self, self.labels.values())
        return [{"image": d["image"], "label": d["label"]} for d in usable]

    # ------------------------------------------------------------------ writes
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise http_error(
            InputError(
                "This server's images are the PACS's series: store new images in the PACS "
                "(DICOM STOW-RS or C-STORE), not through MONAI Label.",
                status=405,
            )
        )

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """A final label becomes a DICOM SEG in the PACS (:meth:`store_seg`); other tags stay local (MONAI Label's)."""
        try:
            check_id(image_id, "image")
            check_tag(label_tag, "tag")
            image = self.get_image_uri(image_id)
            if not image:
                raise InputError(f"Image {image_id!r} is not a series of the PACS.", status=404)
            values = check_label_volume(label_filename, image, self.labels.values())
        except InputError as e:
            logger.info(f"Rejected label for {image_id!r} ({label_tag!r}): {e}")
            raise http_error(e) from e
        label_info = dict(label_info or {})
        if label_tag != DefaultLabelTag.FINAL.value:
            with self._download_lock:
                return super().save_label(image_id, label_filename, label_tag, label_info)
        with self._download_lock:
            label_info.update(self.store_seg(image_id, label_filename, values, label_info))
            # the local record of the label, as MONAI Label's own save does after its upload
            saved = LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        self._lists.clear()  # the new SEG is support for the next request
        return saved

    def store_seg(
        self, image_id: str, label_filename: str, values: Iterable[int], label_info: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the label as a DICOM SEG of its series with dcmqi and store it in the PACS.

        MONAI Label's ``nifti_to_dicom_seg`` builds dcmqi's metadata itself, with a fixed top level
        (series "AIName", creator "Reader1", every segment ``AUTOMATIC`` by "MONAILABEL", one
        colour for names outside its anatomy table); here its dcmqi step (``itk_image_to_dicom_seg``)
        and its upload (``dicom_web_upload_dcm``) get the project's metadata
        (:func:`model_core.io.seg_metadata.seg_metainfo`, the same as :func:`model_core.io.dicom.label_to_dicom_seg`
        writes): segments named after ``--conf labels`` with their own colours, the series description
        naming the source and the structures, content creator ICL-SAM2, and who made it
        (``seg_identity(label_info)``: ``MANUAL``, or a served model's result when ``label_info`` names it).

        Returns:
            The SEG's ``SeriesInstanceUID`` with the series' ``Modality``, ``PatientID``, ``StudyInstanceUID``.

        Raises:
            HTTPException: 502 the PACS did not take it (naming the PACS).
            RuntimeError: dcmqi wrote no SEG (:func:`dcmqi_seg`).
        """
        names = {v: k for k, v in self.labels.items()}
        identity = self.seg_identity(label_info)
        metainfo = seg_metainfo([(int(v), names[int(v)]) for v in values], self.labels, identity)
        series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))  # downloaded above
        seg_file = dcmqi_seg(label_filename, series_dir, metainfo)
        try:
            seg_uid = dicom_web_upload_dcm(seg_file, self._client)
        except Exception as e:
            raise http_error(self._pacs_error(e, f"Storing the SEG of {image_id}")) from e
        finally:
            os.unlink(seg_file)
        info = self.get_image_info(image_id)
        logger.info(f"Stored SEG {seg_uid} of {image_id}: {metainfo['SeriesDescription']!r} ({identity})")
        return {
            "SeriesInstanceUID": seg_uid,
            **{k: info.get(k) for k in ("Modality", "PatientID", "StudyInstanceUID")},
        }
