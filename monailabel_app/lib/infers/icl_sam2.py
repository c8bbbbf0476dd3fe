"""Infer tasks: in-context segmentation of a whole volume, and interactive clicks and boxes.

Both are thin: requests are mapped onto :class:`model_core.serving.service.SegmentationService`
(the bundle's preprocessing, the support cache, the interactive sessions), and the
result is written in the image's original space for Slicer and OHIF.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.datastore import labelled_volumes
from lib.messages import no_support_message
from lib.requests import InContextParams, InteractiveParams, http_error, parse_params
from model_core.io.block_gzip import save_nifti_gz, save_nrrd_gz
from model_core.io.validation import InputError, image_header_problem, image_problem
from model_core.serving.service import Segmentation, SegmentationService

logger = logging.getLogger(__name__)


def write_label(segmentation: Segmentation, extension: str = ".nii.gz", dtype: str = "uint16") -> str:
    """Write a label map (original grid and affine) to a new temporary file (MONAI Label deletes it after sending).

    NIfTI (Slicer's default) gets its header from nibabel, NRRD (OHIF asks for ``.nrrd``) from pynrrd; both
    are gzipped by :mod:`model_core.io.block_gzip`. MONAI's image writers are not used: with
    ``resample=False`` they still resample, and fail on volumes stored with the slice axis first.
    """
    extension = extension if extension.startswith(".") else f".{extension}"
    # a folder of the server's own: a client on the same machine saves results under their base name in /tmp
    folder = os.path.join(tempfile.gettempdir(), "icl_sam2_results")
    os.makedirs(folder, exist_ok=True)
    array = np.asarray(segmentation.label)[0]  # (i, j, k)
    target = np.dtype(dtype)
    # only the bounds the result's type is narrower at are looked up: from the label values the map was made with
    # where its maker gave them, else by a pass over every voxel
    has, holds = (np.iinfo if array.dtype.kind in "iu" else np.finfo)(array.dtype), np.iinfo(target)
    known = None if segmentation.values is None else np.array([0, *segmentation.values])
    for bound, outside in ((np.max, has.max > holds.max), (np.min, has.min < holds.min)):
        value = int(bound(array if known is None else known)) if outside and array.size else 0
        if not holds.min <= value <= holds.max:
            wider = "uint16" if value > 0 else "int16 or int32"
            raise InputError(f"params.result_dtype {dtype!r} cannot hold label value {value}; use {wider}.", status=422)
    if array.dtype.kind in "iu" and array.dtype.itemsize == target.itemsize:
        array = array.view(target)  # the same bytes for the values both types hold (the service's int16)
    else:
        array = array.astype(target)  # in the label's own layout: the service lays it out as the files do
    affine = np.asarray(segmentation.label.affine, dtype=np.float64)  # RAS, as nibabel and MONAI use
    fd, path = tempfile.mkstemp(suffix=extension, prefix="label_", dir=folder)
    os.close(fd)
    try:
        _write(array, affine, path, extension)
    except BaseException:
        os.remove(path)  # no empty or half-written result is left behind
        raise
    return path


def _write(array: np.ndarray, affine: np.ndarray, path: str, extension: str) -> None:
    if extension in (".nii", ".nii.gz"):
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        if extension == ".nii":
            nib.save(image, path)
            return
    # gzip on every core, each background block once (model_core.io.block_gzip): nibabel's and pynrrd's one
    # stream took 0.11 and 0.15 s of a 512 x 512 x 160 uint16 label, 0.03 s this way (2-core Intel Xeon)
    with open(path, "wb") as file:
        if extension == ".nii.gz":
            save_nifti_gz(image, file)
            return
        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]  # NRRD's space here is LPS, as Slicer and ITK write it
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:, :3].T,  # row n: the step of axis n in mm
            "space origin": lps[:, 3],
            "kinds": ["domain", "domain", "domain"],
        }
        save_nrrd_gz(file, array, header)  # the file's fastest axis is i, as ITK writes it


def client_error(fn: Callable[[], Any]) -> Any:
    """Run ``fn``: the caller's mistake (``InputError``) is a 4xx with its message; anything else is a server
    fault, answered by the app's one exception handler (``lib/errors.py``: a 500 quoting an incident id, the
    cause in the log)."""
    try:
        return fn()
    except InputError as e:
        raise http_error(e) from e


class ServiceInfer(InferTask):
    #: the pydantic schema of this model's params (lib/requests.py)
    params_schema: type = InContextParams
    #: the service reads the image with ``preprocess_checked_image``, which refuses bad voxels (a 400)
    service_checks_voxels: bool = True

    def __init__(
        self,
        service: Callable[[], SegmentationService],
        datastore: Callable[[], Any],
        type,
        labels,
        description,
        describe: Callable[[], str] = lambda: "",
        config=None,
    ):
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=config)
        self._service, self._datastore, self._describe = service, datastore, describe

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        """MONAI Label's info, with the weights served in the description (what Slicer and OHIF show)."""
        info = super().info()
        info["description"] = f"{self.description}. {self._describe()}"
        return info

    def _params(self, request: dict[str, Any]):
        """The request's params, checked again here (batch inference and direct calls skip the route's check)."""
        fields = {
            k: request[k] for k in self.params_schema.model_fields if k in request and k not in ("model", "image")
        }
        return client_error(lambda: parse_params(self.params_schema, fields))

    def _image(self, request: dict[str, Any]) -> str:
        """The image file (the app resolved the id), checked to be a volume the model can segment.

        Only its header when the service checks the voxels as it reads them (:attr:`service_checks_voxels`), so
        that a new image is read once; in full otherwise.
        """
        image = request.get("image")
        if not isinstance(image, str) or not image or not os.path.isfile(image):
            raise HTTPException(
                status_code=404, detail=f"No image {request.get('image')!r}: pass a datastore image id."
            )
        problem = image_header_problem(image) if self.service_checks_voxels else image_problem(image)
        if problem:
            raise HTTPException(status_code=400, detail=f"This image cannot be segmented: {problem}")
        return image

    def _support(self, image: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        return client_error(lambda: labelled_volumes(self._datastore(), self._service().labels.values(), exclude=image))

    def _no_support(self, image: str, skipped: list[dict[str, str]]) -> HTTPException:
        """A 400 saying why there is no support set and what to do (the query never supports itself)."""
        try:
            entries = self._datastore().final_labels()
        except Exception:  # the listing just worked; if it fails now, say the general case
            entries = []
        own = any(e.get("image") and os.path.realpath(e["image"]) == os.path.realpath(image) for e in entries)
        return http_error(InputError(no_support_message(own, skipped)))

    def weights_info(self) -> dict[str, Any]:
        """The served weights (``SegmentationService.model_info`` and the seed of untrained ones), for SEGs that
        name the model that made them."""
        service = self._service()
        return {**service.model_info(), "seed": service.config.seed}

    def _reply(self, params, seg: Segmentation, skipped: list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        try:
            path = client_error(lambda: write_label(seg, params.result_extension, params.result_dtype))
        finally:
            seg.release()  # the file holds the answer now: the session may write the next one into its memory
        info = {"label_names": self._service().labels, "confidence": seg.confidence, **seg.info}
        if skipped:
            info["skipped_support"] = skipped  # which stored labels were left out of the support set, and why
        return path, info


class InContextInfer(ServiceInfer):
    """Segment every configured structure of a volume, in context of the datastore's labelled volumes."""

    params_schema = InContextParams

    def __init__(self, service, datastore, labels: dict[str, int], describe: Callable[[], str] = lambda: ""):
        super().__init__(
            service,
            datastore,
            InferType.SEGMENTATION,
            labels,
            "In-context SAM2: segments the structures of the labelled series in another series (it needs a "
            "labelled series other than the one it segments)",
            describe,
        )

    def __call__(self, request: dict[str, Any]):
        params = self._params(request)
        image = self._image(request)
        labelled, skipped = self._support(image)
        if not labelled:
            raise self._no_support(image, skipped)
        seg = client_error(lambda: self._service().segment(image, labelled))
        logger.info(f"in-context {os.path.basename(image)}: {seg.info}")
        return self._reply(params, seg, skipped)


class InteractiveInfer(ServiceInfer):
    """Clicks (``foreground``/``background`` [i, j, k]) and an ROI box, propagated through the volume.

    Request keys (as the Slicer and OHIF plugins send them): ``foreground``, ``background``,
    ``roi`` ``[i0, i1, j0, j1, k0, k1]``, ``label`` (structure name), ``client_id``;
    ``from_in_context`` starts from the in-context result and corrects it. Types and
    ranges: ``lib.requests.InteractiveParams``.
    """

    params_schema = InteractiveParams

    def __init__(self, service, datastore, labels: dict[str, int], describe: Callable[[], str] = lambda: ""):
        super().__init__(
            service,
            datastore,
            InferType.DEEPGROW,
            labels,
            "Interactive SAM2: clicks and boxes on any slice, propagated through the volume",
            describe,
            config={"from_in_context": False},
        )

    def __call__(self, request: dict[str, Any]):
        params = self._params(request)
        image = self._image(request)
        labelled, skipped = self._support(image) if params.from_in_context else ([], [])
        client = params.client_id or str(request.get("session_id") or "anonymous")
        seg = client_error(
            lambda: self._service().interact(
                client,
                image,
                label=params.label,
                foreground=params.foreground,
                background=params.background,
                roi=params.roi,
                from_in_context=params.from_in_context,
                labelled=labelled,
            )
        )
        logger.info(f"interactive {os.path.basename(image)} for {client}: {seg.info}")
        return self._reply(params, seg, skipped)
