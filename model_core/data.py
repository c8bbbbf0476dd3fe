"""Glue between MONAI's data/engine stack and in-context episodes.

MONAI loads and preprocesses volumes (LoadImaged, Orientationd, intensity
scaling, Resized) and Ignite's ``SupervisedTrainer`` runs the loop; what they
lack for in-context training is an episode dataset (paired support and query
slices of the same classes), a ``PrepareBatch`` that hands an episode to the
network's four inputs, and gradient clipping inside ``SupervisedTrainer``'s
iteration (Ignite's and MONAI's trainers have no clipping option).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import Dataset
from monai.engines.utils import IterationEvents, PrepareBatch

from model_core.episodes import EpisodeSampler
from model_core.prompts import PromptSampler

__all__ = ["intensity_scaling", "load_datalist", "EpisodeDataset", "EpisodePrepareBatch", "GradientClipHandler", "as_slices", "merge_labels"]


def intensity_scaling(
    modality: str = "CT",
    window: Sequence[float] = (-200.0, 300.0),
    percentiles: Sequence[float] = (0.5, 99.5),
    keys: str | Sequence[str] = "image",
):
    """The MONAI transform that scales intensities to [0, 1] for a modality (never a raw cast).

    CT has calibrated units, so a fixed Hounsfield window is clipped and scaled
    (``ScaleIntensityRanged``); MRI has none, so each volume is scaled between its own
    intensity percentiles (``ScaleIntensityRangePercentilesd``).

    Args:
        modality: ``CT``, or ``MR``/``MRI``.
        window: CT ``(min, max)`` in HU mapped to 0 and 1 (default soft-tissue window).
        percentiles: MRI ``(lower, upper)`` percentiles mapped to 0 and 1.
        keys: keys of the images to scale.
    """
    from monai.transforms import ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    kind = str(modality).upper()
    if kind == "CT":
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"The CT window must be (min, max) with max > min, got {list(window)}.")
        return ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if kind in ("MR", "MRI"):
        lo, hi = (float(v) for v in percentiles)
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"MRI percentiles must satisfy 0 <= lower < upper <= 100, got {list(percentiles)}.")
        return ScaleIntensityRangePercentilesd(keys, lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"modality must be 'CT' or 'MRI', got {modality!r}.")


def load_datalist(path: str, key: str = "training", base_dir: str | None = None) -> list[dict[str, Any]]:
    """Read an MSD-style datalist; ``seg`` is accepted for ``label`` and paths are made absolute.

    Raises:
        ValueError: missing or unreadable file, missing key, empty list, entries without image.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Datalist {path!r} does not exist; write one with scripts/prepare_datalist.py.")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Datalist {path!r} is not valid JSON: {e}") from e
    if key not in content:
        raise ValueError(f"Datalist {path!r} has no {key!r} list (it has {sorted(content)}).")
    entries = content[key]
    if not entries:
        raise ValueError(f"The {key!r} list of datalist {path!r} is empty.")
    base = base_dir or os.path.dirname(os.path.abspath(path))
    out = []
    for i, item in enumerate(entries):
        item = {"image": item} if isinstance(item, str) else dict(item)
        if "seg" in item and "label" not in item:
            item["label"] = item.pop("seg")
        if "image" not in item:
            raise ValueError(f"Entry {i} of {key!r} in {path!r} has no 'image'.")
        for k in ("image", "label"):
            if isinstance(item.get(k), str) and not os.path.isabs(item[k]):
                item[k] = os.path.normpath(os.path.join(base, item[k]))
        out.append(item)
    return out


def as_slices(volume: torch.Tensor) -> torch.Tensor:
    """MONAI's channel-first ``(1, H, W, D)`` (RAS: axial slices last) to ``(D, H, W)``."""
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"Expected a single-channel volume (1, H, W, D), got {tuple(volume.shape)}.")
    return torch.as_tensor(volume)[0].permute(2, 0, 1).contiguous()


def merge_labels(label: torch.Tensor, label_merge: dict[int, Sequence[int]] | None) -> torch.Tensor:
    """Apply ``{new_value: [old values]}`` (e.g. KiTS23 kidney + tumour -> 1); other values become 0.

    Returns ``label`` unchanged when ``label_merge`` is empty.
    """
    if not label_merge:
        return label
    merged = torch.zeros_like(label)
    for new, olds in label_merge.items():
        merged[torch.isin(label, torch.tensor([int(o) for o in olds]))] = int(new)
    return merged


class EpisodeDataset(torch.utils.data.Dataset):
    """In-context episodes from volumes loaded by MONAI transforms.

    Volumes are loaded once, through ``transform`` (which must produce ``image`` in
    [0, 1] and an integer ``label``, both ``(1, H, W, D)`` at the model's in-plane
    size), and episodes are drawn from them at random. ``len`` is the number of
    episodes an epoch sees.

    Args:
        data: datalist entries (``image`` and ``label`` paths).
        transform: MONAI preprocessing.
        classes: label values to train on.
        num_support, num_query, objects_per_episode: see :class:`EpisodeSampler`.
        image_size: model input size.
        episodes_per_epoch: dataset length.
        seed: random seed.
        label_merge: optional ``{new_value: [old values]}`` applied to labels (e.g.
            KiTS23 kidney + tumour as one class); other values become background.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Callable,
        classes: Sequence[int],
        num_support: int,
        num_query: int,
        image_size: int,
        episodes_per_epoch: int = 100,
        objects_per_episode: int = 1,
        seed: int = 0,
        label_merge: dict[int, Sequence[int]] | None = None,
    ):
        volumes = []
        for i, item in enumerate(Dataset(list(data), transform)):
            image, label = as_slices(item["image"]).float(), as_slices(item["label"]).round().long()
            if image.shape != label.shape:
                raise ValueError(f"Case {data[i].get('image')}: image {tuple(image.shape)} and label {tuple(label.shape)} differ.")
            label = merge_labels(label, label_merge)
            volumes.append((image.clamp(0, 1).numpy(), label.numpy().astype(np.int16)))
        self.sampler = EpisodeSampler(volumes, list(classes), num_support, num_query, image_size, objects_per_episode, seed)
        self.episodes_per_epoch = int(episodes_per_epoch)

    def __len__(self) -> int:
        return self.episodes_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.sampler.sample(1).items()}


class EpisodePrepareBatch(PrepareBatch):
    """Hands a collated episode batch to :meth:`InContextSAM2.forward` inside ``SupervisedTrainer``.

    Returns ``(support_images, query_masks, (support_masks, query_images, prompts), {})``:
    the trainer calls ``network(support_images, support_masks, query_images, prompts)``
    and ``loss(pred, query_masks)``. Prompts on query slices are drawn here.

    Args:
        click_probability, box_probability, box_jitter: see :class:`PromptSampler`.
        seed: random seed of the prompts.
    """

    def __init__(self, click_probability: float = 0.0, box_probability: float = 0.0, box_jitter: int = 20, seed: int = 0):
        self.prompts = PromptSampler(click_probability, box_probability, box_jitter, torch.Generator().manual_seed(seed))

    def __call__(self, batchdata: dict[str, torch.Tensor], device=None, non_blocking: bool = False, **kwargs: Any):
        b = {k: v.to(device=device, non_blocking=non_blocking) for k, v in batchdata.items()}
        query_masks = b["query_masks"]
        prompts = [self.prompts(query_masks[:, q].flatten(0, 1)) for q in range(query_masks.shape[1])]
        return b["support_images"], query_masks, (b["support_masks"], b["query_images"], prompts), {}


class GradientClipHandler:
    """Clip the gradient norm between backward and the optimizer step of a MONAI trainer.

    Args:
        max_norm: maximum total norm (SAM2 fine-tuning uses 0.1).
        norm_type: the p of the p-norm.
    """

    def __init__(self, max_norm: float = 0.1, norm_type: float = 2.0):
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine) -> None:
        params = [p for p in engine.network.parameters() if p.grad is not None]
        engine.state.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type))
