"""MONAI transforms that are not plain MONAI: intensity scaling per modality, a case's channel, label merges.

The bundle's preprocessing, the app's service and the COCO export all read volumes through
these, so an intensity rule or a label merge has one definition. ``load_case`` runs a
preprocessing chain on one datalist entry and names the case when it fails;
``describe_transform`` turns a chain's settings into a cache key.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from monai.transforms import (
    Compose,
    MapTransform,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Transform,
)

__all__ = ["SelectChanneld", "describe_transform", "intensity_scaling", "load_case", "merge_labels"]


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


class SelectChanneld(MapTransform):
    """Keep the channel a case names (``"channel": N`` in its datalist entry) of a multi-channel image.

    MSD tasks such as BraTS store modalities in a 4th dimension; the model segments
    one grey-level volume. MONAI's ``SplitDimd`` splits every channel out and its
    indexing transforms take one fixed index, not one per case from the datalist.

    Args:
        keys: images to reduce (after ``EnsureChannelFirstd``: ``(C, H, W, D)``).
        channel_key: the entry giving the channel index.
    """

    def __init__(self, keys: str | Sequence[str] = "image", channel_key: str = "channel"):
        super().__init__(keys)
        self.channel_key = channel_key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image, source = d[key], getattr(d[key], "meta", {}).get("filename_or_obj", key)
            if d.get(self.channel_key) is not None:
                channel = int(d[self.channel_key])
                if not 0 <= channel < image.shape[0]:
                    raise ValueError(
                        f"{source}: channel {channel} asked for, but the image has {image.shape[0]} channel(s)."
                    )
                d[key] = image[channel : channel + 1]
            elif image.shape[0] != 1:
                raise ValueError(
                    f'{source} has {image.shape[0]} channels (modalities); name one with "channel": N in its '
                    "datalist entry (icl-sam2 datalist --channel N)."
                )
        return d


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


def load_case(item: dict[str, Any], transform: Callable) -> dict[str, Any]:
    """Run the preprocessing on one datalist entry; a failure names the case and the cause."""
    try:
        return transform(dict(item))
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:  # the reader's own message is at the bottom of the chain
            cause = cause.__cause__
        raise ValueError(
            f"Case {item.get('image')!r} (label {item.get('label')!r}) could not be loaded and "
            f"preprocessed: {type(cause).__name__}: {cause}"
        ) from e


def describe_transform(transform: Any) -> Any:
    """A JSON-able description of a (composed) MONAI transform's settings, for cache keys.

    Nested transforms (``ScaleIntensityRanged.scaler``, ``Resized.resizer``) are
    described too, so changing a window or a size changes the description.
    """

    if isinstance(transform, Compose):
        return [describe_transform(t) for t in transform.transforms]
    fields: dict[str, Any] = {}
    for name, value in sorted(vars(transform).items()):
        if isinstance(value, Transform):
            fields[name] = describe_transform(value)
        elif isinstance(value, (int, float, str, bool, type(None))) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bool, type(None))) for v in value)
        ):
            fields[name] = value
    return [type(transform).__name__, fields]
