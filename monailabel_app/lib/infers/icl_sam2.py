"""Infer tasks: in-context segmentation of a whole volume, and interactive clicks and boxes.

Both are thin: requests are mapped onto :class:`model_core.service.SegmentationService`
(the bundle's preprocessing, the support cache, the interactive sessions), and the
result is written in the image's original space for Slicer and OHIF.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable

import numpy as np
from fastapi import HTTPException
import nibabel as nib
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.datastore import labelled_volumes
from model_core.service import Segmentation, SegmentationService

logger = logging.getLogger(__name__)


def write_label(segmentation: Segmentation, extension: str = ".nii.gz", dtype: str = "uint16") -> str:
    """Write a label map (original grid and affine) to a new temporary file (MONAI Label deletes it after sending).

    NIfTI (Slicer's default) goes through nibabel, other formats (OHIF asks for ``.nrrd``)
    through ITK. MONAI's image writers are not used: with ``resample=False`` they still
    resample, and fail on volumes stored with the slice axis first.
    """
    extension = extension if extension.startswith(".") else f".{extension}"
    # a folder of the server's own: a client on the same machine saves results under their base name in /tmp
    folder = os.path.join(tempfile.gettempdir(), "icl_sam2_results")
    os.makedirs(folder, exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=extension, prefix="label_", dir=folder)
    os.close(fd)
    array = np.asarray(segmentation.label)[0].astype(np.dtype(dtype))  # (i, j, k)
    affine = np.asarray(segmentation.label.affine, dtype=np.float64)  # RAS, as nibabel and MONAI use
    if extension in (".nii", ".nii.gz"):
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, path)
        return path
    import itk

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]  # ITK's physical space is LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))  # ITK arrays are (k, j, i)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:, 3].tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:, :3] / spacing)))
    itk.imwrite(image, path, compression=True)
    return path


def _client_error(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a ValueError (bad input, no labelled volume) becomes a 400 with its message."""
    try:
        return fn()
    except ValueError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e


class _ServiceInfer(InferTask):
    def __init__(self, service: Callable[[], SegmentationService], datastore: Callable[[], Any], type, labels, description,
                 config=None):
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=config)
        self._service, self._datastore = service, datastore

    def is_valid(self) -> bool:
        return True

    def _image(self, request: dict[str, Any]) -> str:
        image = request.get("image")
        if not image or not os.path.exists(image):
            raise HTTPException(status_code=404, detail=f"No image {request.get('image')!r}: pass a datastore image id.")
        return image

    def _reply(self, request: dict[str, Any], seg: Segmentation) -> tuple[str, dict[str, Any]]:
        path = write_label(seg, request.get("result_extension", ".nii.gz"), request.get("result_dtype", "uint16"))
        return path, {"label_names": self._service().labels, "confidence": seg.confidence, **seg.info}


class InContextInfer(_ServiceInfer):
    """Segment every configured structure of a volume, in context of the datastore's labelled volumes."""

    def __init__(self, service, datastore, labels: dict[str, int]):
        super().__init__(service, datastore, InferType.SEGMENTATION, labels,
                         "In-context SAM2: segments the structures of the labelled volumes in a new volume")

    def __call__(self, request: dict[str, Any]):
        image = self._image(request)
        labelled = [d for d in labelled_volumes(self._datastore()) if os.path.realpath(d["image"]) != os.path.realpath(image)]
        seg = _client_error(lambda: self._service().segment(image, labelled))
        logger.info(f"in-context {os.path.basename(image)}: {seg.info}")
        return self._reply(request, seg)


class InteractiveInfer(_ServiceInfer):
    """Clicks (``foreground``/``background`` [i, j, k]) and an ROI box, propagated through the volume.

    Request keys (as the Slicer and OHIF plugins send them): ``foreground``, ``background``,
    ``roi`` ``[i0, i1, j0, j1, k0, k1]``, ``label`` (structure name), ``client_id``;
    ``from_in_context`` starts from the in-context result and corrects it.
    """

    def __init__(self, service, datastore, labels: dict[str, int]):
        super().__init__(service, datastore, InferType.DEEPGROW, labels,
                         "Interactive SAM2: clicks and boxes on any slice, propagated through the volume",
                         config={"from_in_context": False})

    def __call__(self, request: dict[str, Any]):
        image = self._image(request)
        from_in_context = str(request.get("from_in_context", False)).lower() in ("true", "1")
        labelled = [d for d in labelled_volumes(self._datastore()) if os.path.realpath(d["image"]) != os.path.realpath(image)] \
            if from_in_context else []
        client = str(request.get("client_id") or request.get("session_id") or "anonymous")
        seg = _client_error(lambda: self._service().interact(
            client, image, label=request.get("label") or None, foreground=request.get("foreground") or [],
            background=request.get("background") or [], roi=request.get("roi") or None,
            from_in_context=from_in_context, labelled=labelled))
        logger.info(f"interactive {os.path.basename(image)} for {client}: {seg.info}")
        return self._reply(request, seg)
