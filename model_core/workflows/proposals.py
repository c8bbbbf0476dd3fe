"""Automatic proposals on volume files: the algorithm of :mod:`model_core.proposals` mapped to the image's grid,
and the MONAI inferer, transform and saver that ``bundle/configs/proposals.json`` instantiates.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Events
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import Invertd, MapTransform
from scipy import ndimage

from model_core.io.files import atomic_path
from model_core.modeling.inputs import as_slices, volume_to_slices
from model_core.proposal_regions import Candidate, Proposals
from model_core.proposals import ProposalSettings, propose_slices

__all__ = [
    "ProposalInferer",
    "ProposalSaver",
    "ProposalsToOriginald",
    "finalize_candidates",
    "labels_to_original",
    "propose_image",
    "slice_axis",
    "voxel_volume",
]


# ---------------------------------------------------------------------------- original space
def voxel_volume(image: MetaTensor) -> float:
    """mm³ of one voxel of a (preprocessed) image, from its affine."""
    affine = np.asarray(image.affine, dtype=np.float64)
    return float(abs(np.linalg.det(affine[:3, :3] if affine.ndim == 2 else affine[0, :3, :3])))


def labels_to_original(label: torch.Tensor, image: MetaTensor, preprocessing: Callable) -> MetaTensor:
    """A model-grid label map ``(H, W, D)`` to the image's original grid, through MONAI's ``Invertd``
    over ``preprocessing`` (the transforms recorded in ``image``), nearest interpolation.

    Returns:
        ``(1, *original spatial shape)`` int16 ``MetaTensor`` with the original affine.
    """
    pred = MetaTensor(
        label[None].float(), meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations)
    )
    inverted = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True)(
        {"image": image, "pred": pred}
    )["pred"]
    return MetaTensor(torch.as_tensor(inverted).round().to(torch.int16), meta=inverted.meta)


def slice_axis(image: MetaTensor) -> int:
    """The axis of the image file along which the model's slices lie (the original axis closest to the
    preprocessed third axis; RAS reorientation may have moved it)."""
    original = np.asarray(image.meta["original_affine"], dtype=np.float64)[:3, :3]
    current = np.asarray(image.affine, dtype=np.float64)[:3, 2]
    cosines = np.abs(original.T @ current) / (np.linalg.norm(original, axis=0) * np.linalg.norm(current) + 1e-12)
    return int(np.argmax(cosines))


def finalize_candidates(
    label: MetaTensor, candidates: Sequence[Candidate], axis: int = 2
) -> tuple[MetaTensor, list[dict[str, Any]]]:
    """Measure the candidates in the image's original space and renumber them ``1..N``.

    A candidate too small to survive the mapping to a coarser original grid is dropped.

    Args:
        label: ``(1, i, j, k)`` label map in the original space (:func:`labels_to_original`).
        candidates: the model-grid candidates, value ``n`` = ``candidates[n - 1]``.
        axis: the image axis of the model's slices (:func:`slice_axis`).

    Returns:
        ``(label with values 1..N, [dict per candidate])``; each dict has ``label`` (its value),
        ``voxels`` and ``volume_mm3`` in the original image, ``bbox`` ``[[i0, j0, k0], [i1, j1, k1]]``
        (inclusive voxel indices of the image file), ``slice_axis`` and ``slices`` (indices along it
        that hold the candidate), ``predicted_iou``, ``stability_score``, ``score``, and the
        model-grid summary (``model_voxels``, ``model_slices``, ``model_bbox``, ``masks``).
    """

    array = np.asarray(label)[0].astype(np.int32)
    affine = np.asarray(label.affine, dtype=np.float64)
    mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    counts = np.bincount(array.reshape(-1), minlength=len(candidates) + 1)
    boxes = ndimage.find_objects(array, max_label=len(candidates))
    lut = np.zeros(len(candidates) + 1, dtype=np.int16)
    out = []
    for n, (candidate, box) in enumerate(zip(candidates, boxes), start=1):
        if box is None or counts[n] == 0:
            continue
        value = len(out) + 1
        lut[n] = value
        inside = array[box] == n
        other = tuple(a for a in range(3) if a != axis)
        along = np.nonzero(inside.any(axis=other))[0] + box[axis].start
        out.append(
            {
                "label": value,
                "voxels": int(counts[n]),
                "volume_mm3": round(float(counts[n]) * mm3, 3),
                "bbox": [[int(s.start) for s in box], [int(s.stop) - 1 for s in box]],
                "slice_axis": int(axis),
                "slices": [int(k) for k in along],
                **candidate.summary(),
            }
        )
    relabelled = MetaTensor(torch.from_numpy(lut[array][None]), meta=label.meta)
    return relabelled, out


def propose_image(
    network, image: MetaTensor, preprocessing: Callable, settings: ProposalSettings, channel_mode: str = "replicate"
) -> Proposals:
    """Proposals of one preprocessed volume, in its original space.

    Args:
        network: the network.
        image: ``(1, H, W, D)`` the volume through ``preprocessing`` (its meta maps back to the file).
        preprocessing: the bundle's preprocessing that made ``image``.
        settings: see :class:`ProposalSettings`.
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained.
    """
    slices = volume_to_slices(as_slices(image).float().clamp(0, 1), network.image_size, channel_mode)
    label, kept, counts = propose_slices(network, slices, settings, voxel_volume(image))
    original = labels_to_original(label, image, preprocessing)
    final, candidates = finalize_candidates(original, kept, slice_axis(image))
    return Proposals(final, candidates, {**counts, "candidates": len(candidates)}, label, kept)


# ---------------------------------------------------------------------------- bundle wiring
def _settings(settings: ProposalSettings | dict[str, Any] | None) -> ProposalSettings:
    return settings if isinstance(settings, ProposalSettings) else ProposalSettings.from_dict(settings)


class ProposalInferer(Inferer):
    """Candidate label maps of whole volumes (a MONAI ``Inferer``, for the bundle's ``proposals.json``).

    Args:
        settings: :class:`ProposalSettings` or a dict of its fields.
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained.

    The candidates of each volume are kept in :attr:`last_candidates` under the volume's
    ``filename_or_obj``, for :class:`ProposalsToOriginald`.
    """

    def __init__(self, settings: ProposalSettings | dict[str, Any] | None = None, channel_mode: str = "replicate"):
        super().__init__()
        self.settings = _settings(settings)
        self.channel_mode = channel_mode
        #: ``{filename_or_obj: (candidates best first, counts)}`` of the last batch
        self.last_candidates: dict[str, tuple[list[Candidate], dict[str, int]]] = {}

    def __call__(self, inputs: torch.Tensor, network, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Args:
            inputs: ``(B, 1, H, W, D)`` preprocessed volumes in [0, 1] (in-plane at the model size).

        Returns:
            ``(B, 1, H, W, D)`` float label maps on the model grid (candidate ``n`` = value ``n``).
        """
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"ProposalInferer takes (B, 1, H, W, D) volumes, got {tuple(inputs.shape)}.")
        was_training = network.training
        network.eval()
        names = inputs.meta.get("filename_or_obj") if isinstance(inputs, MetaTensor) else None
        affines = np.asarray(inputs.affine) if isinstance(inputs, MetaTensor) else None
        self.last_candidates, outs = {}, []
        for b in range(inputs.shape[0]):
            volume = inputs[b].as_tensor() if isinstance(inputs, MetaTensor) else inputs[b]
            slices = volume_to_slices(as_slices(volume).float().clamp(0, 1), network.image_size, self.channel_mode)
            mm3 = 1.0
            if affines is not None:
                affine = affines[b] if affines.ndim == 3 else affines
                mm3 = float(abs(np.linalg.det(affine[:3, :3])))
            label, kept, counts = propose_slices(network, slices, self.settings, mm3)
            name = names[b] if isinstance(names, (list, tuple)) else names
            self.last_candidates[str(name if name is not None else b)] = (kept, counts)
            outs.append(label[None].float())
        network.train(was_training)
        out = torch.stack(outs).to(inputs.device)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return out


class ProposalsToOriginald(MapTransform):
    """Renumber and measure the candidates of an item whose ``pred`` is already back in the original space
    (after ``Invertd`` with ``nearest_interp``); the measurements go to ``data[candidates_key]``.

    Args:
        keys: the label map key (``pred``).
        inferer: the :class:`ProposalInferer` that made it.
        image_key: the preprocessed image (its meta gives the slice axis and the file name).
        candidates_key: where the list of candidate dicts goes.
    """

    def __init__(
        self,
        keys: KeysCollection,
        inferer: ProposalInferer,
        image_key: str = "image",
        candidates_key: str = "candidates",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.inferer, self.image_key, self.candidates_key = inferer, image_key, candidates_key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        image = d[self.image_key]
        name = str(image.meta.get("filename_or_obj"))
        if name not in self.inferer.last_candidates:
            raise KeyError(f"No proposals for {name!r}: the inferer ran on {sorted(self.inferer.last_candidates)}.")
        kept, counts = self.inferer.last_candidates[name]
        for key in self.key_iterator(d):
            pred = d[key]
            label = MetaTensor(torch.as_tensor(pred).round().to(torch.int16), meta=pred.meta)
            d[key], d[self.candidates_key] = finalize_candidates(label, kept, slice_axis(image))
        d[f"{self.candidates_key}_counts"] = {**counts, "candidates": len(d[self.candidates_key])}
        return d


class ProposalSaver:
    """Write each volume's candidates to ``<name>_proposals.json`` beside its label map (an Ignite handler).

    The file holds ``{"image", "label_file", "settings", "counts", "candidates": [...]}``, the
    candidates as :func:`finalize_candidates` describes them, value ``n`` of the label map = ``candidates[n - 1]``.

    Args:
        output_dir: where the label maps are written.
        settings: the settings used (recorded in the file).
        output_postfix: the label maps' postfix (as given to ``SaveImaged``).
    """

    def __init__(
        self,
        output_dir: str,
        settings: ProposalSettings | dict[str, Any] | None = None,
        output_postfix: str = "proposals",
        candidates_key: str = "candidates",
    ):
        self.output_dir, self.postfix, self.key = output_dir, output_postfix, candidates_key
        self.settings = asdict(_settings(settings))

    def attach(self, engine) -> None:

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        os.makedirs(self.output_dir, exist_ok=True)
        for item in outputs:
            source = str(item["pred"].meta.get("filename_or_obj", "volume"))
            name = os.path.basename(os.path.normpath(source))
            stem = name[:-7] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
            path = os.path.join(self.output_dir, f"{stem}_proposals.json")
            record = {
                "image": source,
                "label_file": f"{stem}_{self.postfix}.nii.gz",
                "settings": self.settings,
                "counts": item.get(f"{self.key}_counts", {}),
                "candidates": item[self.key],
            }
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump(record, f, indent=2)
