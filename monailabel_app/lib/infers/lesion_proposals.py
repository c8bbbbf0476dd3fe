"""Infer task ``lesion_proposals``: automatic 3D lesion candidates for a viewer user to accept or reject.

A request without ``accept`` runs sam2's automatic mask generator over the volume's
slices (:mod:`model_core.proposals`, through :meth:`model_core.serving.service.SegmentationService.propose`)
and answers a label map with one value per candidate (``1..N``, best score first) and,
in the reply's params, ``candidates`` (value, voxels, mm³, bounding box, slices,
predicted IoU, stability, score) and ``label_names`` (``candidate_<n>: n``).

Accepting: the user sends the same request again with ``accept: [values]``; the reply
is then a label map in which those candidates carry the value of the configured
``--conf proposal_label`` structure and everything else is 0: a label the datastore
accepts, to save as ``final`` (Slicer's "Submit Label", OHIF's save, or
``MONAILabelClient.save_label(image, file, tag="final")``). The candidates are kept
per image and settings, so the accept request does not run the generator again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, replace
from typing import Annotated, Any, Callable

import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from pydantic import Field, StrictFloat, StrictInt, model_validator

from lib.infers.icl_sam2 import ServiceInfer, client_error, write_label
from lib.requests import BaseParams, http_error
from model_core.io.validation import InputError
from model_core.proposal_regions import Proposals
from model_core.proposals import ProposalSettings
from model_core.serving.service import Segmentation

logger = logging.getLogger(__name__)

_Fraction = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1, allow_inf_nan=False)]
_NonNegative = Annotated[StrictFloat | StrictInt, Field(ge=0, allow_inf_nan=False)]

#: settings a request may change (each None: the server's ``--conf proposal_settings``)
REQUEST_SETTINGS = (
    "points_per_side",
    "pred_iou_thresh",
    "stability_score_thresh",
    "box_nms_thresh",
    "min_mask_region_area",
    "max_slice_fraction",
    "link_iou",
    "link_containment",
    "min_volume_mm3",
    "max_volume_mm3",
    "min_slices",
    "max_overlap",
    "max_candidates",
)


class ProposalParams(BaseParams):
    """``lesion_proposals``: the generator and merge settings (see ``model_core.proposals.ProposalSettings``) and
    ``accept``.
    """

    points_per_side: Annotated[StrictInt, Field(ge=1, le=64)] | None = Field(
        None, description="point prompts per side of each slice (cost grows with its square)"
    )
    pred_iou_thresh: _Fraction | None = Field(None, description="keep generator masks with predicted IoU above this")
    stability_score_thresh: _Fraction | None = Field(None, description="keep generator masks at least this stable")
    box_nms_thresh: _Fraction | None = Field(None, description="box IoU of duplicate masks on a slice")
    min_mask_region_area: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="holes/specks cleaned (pixels)"
    )
    max_slice_fraction: _Fraction | None = Field(None, description="drop slice masks covering more of the slice")
    link_iou: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1, allow_inf_nan=False)] | None = Field(
        None, description="IoU linking masks on adjacent slices"
    )
    link_containment: _Fraction | None = Field(None, description="containment linking mutual best matches")
    min_volume_mm3: _NonNegative | None = Field(None, description="smallest candidate (mm³)")
    max_volume_mm3: _NonNegative | None = Field(None, description="largest candidate (mm³)")
    min_slices: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description="fewest slices of a candidate")
    max_overlap: _Fraction | None = Field(None, description="overlap with a better candidate at which one is dropped")
    max_candidates: Annotated[StrictInt, Field(ge=1, le=1000)] | None = Field(
        None, description="at most this many candidates"
    )
    accept: Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(max_length=1000)] | None = Field(
        None,
        description="candidate values to keep: the reply is then those candidates as the proposal label, to "
        "save as final",
    )

    @model_validator(mode="after")
    def _save_only_accepted(self) -> ProposalParams:
        if self.save_label and self.accept is None:
            raise ValueError(
                "save_label stores a label of the configured structures: give accept (the candidate values "
                "to keep) with it; the candidate map itself is not a label of this datastore"
            )
        return self

    def settings(self, defaults: ProposalSettings) -> ProposalSettings:
        """``defaults`` with this request's settings; an inconsistent combination is a 422."""
        given = {k: getattr(self, k) for k in REQUEST_SETTINGS if getattr(self, k) is not None}
        try:
            return replace(defaults, **given)
        except ValueError as e:
            raise InputError(f"Invalid request: {e}", status=422) from e


class ProposalInfer(ServiceInfer):
    """Automatic lesion candidates of a volume (one label value each), and the accepted ones as a label."""

    params_schema = ProposalParams

    def __init__(
        self,
        service,
        datastore,
        labels: dict[str, int],
        describe: Callable[[], str],
        defaults: ProposalSettings,
        proposal_label: str,
        cache_size: int = 4,
    ):
        super().__init__(
            service,
            datastore,
            InferType.SEGMENTATION,
            {proposal_label: labels[proposal_label]},
            "Lesion proposals: SAM2's automatic mask generator on every slice, merged into 3D candidates "
            "to accept or reject",
            describe,
            config={"accept": []},
        )
        self.defaults, self.proposal_label = defaults, proposal_label
        self.proposal_value = int(labels[proposal_label])
        self._cache: OrderedDict[tuple, Proposals] = OrderedDict()
        self._cache_size = int(cache_size)
        self._cache_lock = threading.Lock()

    def _key(self, image: str, settings: ProposalSettings) -> tuple:
        st = os.stat(image)
        checkpoint = self._service().config.checkpoint
        weights = (
            (os.stat(checkpoint).st_mtime_ns, os.stat(checkpoint).st_size)
            if checkpoint and os.path.isfile(checkpoint)
            else None
        )
        return (
            os.path.realpath(image),
            st.st_mtime_ns,
            st.st_size,
            json.dumps(asdict(settings), sort_keys=True),
            weights,
        )

    def _proposals(self, image: str, settings: ProposalSettings) -> tuple[Proposals, bool]:
        key = self._key(image, settings)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], True
        result = client_error(lambda: self._service().propose(image, settings))
        with self._cache_lock:
            self._cache[key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result, False

    def __call__(self, request: dict[str, Any]):
        params = self._params(request)
        image = self._image(request)
        settings = client_error(lambda: params.settings(self.defaults))
        result, cached = self._proposals(image, settings)
        candidates = result.candidates
        info: dict[str, Any] = {
            **result.info,
            "cached": cached,
            "settings": asdict(settings),
            "candidates": candidates,
            "proposal_label": {self.proposal_label: self.proposal_value},
        }
        if params.accept is None:
            seg = Segmentation(result.label, {}, info)
            info["label_names"] = {f"candidate_{c['label']}": c["label"] for c in candidates}
        else:
            unknown = sorted(set(params.accept) - {c["label"] for c in candidates})
            if unknown:
                raise http_error(
                    InputError(
                        f"params.accept: {unknown} are not candidates of this image (it has "
                        f"1..{len(candidates)} with these "
                        "settings); send the settings of the proposal request with accept.",
                        status=422,
                    )
                )
            array = torch.as_tensor(result.label)
            kept = torch.isin(array, torch.tensor(sorted(set(params.accept)), dtype=array.dtype))
            label = MetaTensor(torch.where(kept, self.proposal_value, 0).to(torch.int16), meta=result.label.meta)
            seg = Segmentation(label, {}, info)
            info["accepted"] = sorted(set(params.accept))
            info["label_names"] = {self.proposal_label: self.proposal_value}
        path = client_error(lambda: write_label(seg, params.result_extension, params.result_dtype))
        accepted = "" if params.accept is None else f", accepted {info['accepted']}"
        took = "cached" if cached else f"{result.info.get('seconds')} s"
        logger.info(f"lesion proposals {os.path.basename(image)}: {len(candidates)} candidates{accepted} ({took})")
        return path, info
