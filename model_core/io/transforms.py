"""MONAI transforms that are not plain MONAI: intensity scaling per modality, a case's channel, label merges,
an argmax over channels that does not stall on whole volumes, a postprocessing that maps back only the slices
where a structure can be.

The bundle's preprocessing, the app's service and the COCO export all read volumes through
these, so an intensity rule or a label merge has one definition. ``load_case`` runs a
preprocessing chain on one datalist entry and names the case when it fails;
``describe_transform`` turns a chain's settings into a cache key.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscrete,
    AsDiscreted,
    Compose,
    MapTransform,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Transform,
)
from monai.utils import TraceKeys, convert_to_dst_type

__all__ = [
    "ChannelArgmaxd",
    "SelectChanneld",
    "channel_argmax",
    "describe_transform",
    "intensity_scaling",
    "load_case",
    "merge_labels",
    "postprocess_slices",
    "root_cause",
    "slices_objects_can_win",
]


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


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=0, keepdim=True)`` for ``(C, ...)`` volumes, as one pass per channel.

    Why not torch's: on a CPU its reduction over the first dimension of a contiguous tensor with
    few channels runs about 25 times slower than elementwise work on the same voxels (2 channels
    of 256 x 256 x 64: 320 ms against 12 ms on a 2-core AMD EPYC), and that argmax was most of an
    interactive follow-up click. Same answer, ties included (the first channel wins) and NaN as
    torch treats it (the first NaN wins). The first channel's wins are one type conversion, not a
    fill of an int64 volume: 3.9 ms instead of 20 ms for the 2 x 512 x 512 x 10 slab of a
    CT-sized follow-up (2-core Intel Xeon).

    Returns:
        ``(1, ...)`` int64 channel indices; a MetaTensor keeps ``x``'s meta.
    """
    data = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    channels = data.shape[0]
    best = data[0]  # never written: each step makes a new one
    best_is_nan = best.isnan()
    index = None
    for k in range(1, channels):
        value = data[k]
        value_is_nan = value.isnan()
        better = (value > best) | (value_is_nan & ~best_is_nan)
        # the first channel's wins made as a type conversion: a masked fill of int64 is 5 times slower
        index = better.long() if index is None else index.masked_fill_(better, k)
        if k < channels - 1:  # the last channel's best is never read
            best = torch.where(better, value, best)
            best_is_nan |= value_is_nan
    if index is None:
        index = torch.zeros(data.shape[1:], dtype=torch.long, device=data.device)
    return convert_to_dst_type(index[None], x, dtype=torch.long)[0]


class _ChannelArgmax(AsDiscrete):
    """MONAI's ``AsDiscrete`` with :func:`channel_argmax` for its argmax over channels; the rest is MONAI's."""

    def __call__(self, img, argmax=None, to_onehot=None, threshold=None, rounding=None):
        argmax = self.argmax if argmax is None else argmax
        if argmax and self.kwargs.get("dim", 0) == 0 and self.kwargs.get("keepdim", True):
            img, argmax = channel_argmax(img), False  # MONAI's call below converts an array to a tensor
        return super().__call__(img, argmax, to_onehot, threshold, rounding)


class ChannelArgmaxd(AsDiscreted):
    """MONAI's ``AsDiscreted`` (same arguments) whose argmax over channels is :func:`channel_argmax`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        converter = _ChannelArgmax()
        converter.kwargs = self.converter.kwargs
        self.converter = converter


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


def root_cause(error: BaseException) -> BaseException:
    """The bottom of an exception's ``__cause__`` chain: the reader's own message under MONAI's wrappers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def load_case(item: dict[str, Any], transform: Callable) -> dict[str, Any]:
    """Run the preprocessing on one datalist entry; a failure names the case and the cause."""
    try:
        return transform(dict(item))
    except Exception as e:
        cause = root_cause(e)
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


#: a slice is left out of :func:`postprocess_slices` when the background beats every object by more than this on all
#: of its voxels: interpolating such voxels cannot make an object win (float rounding is about 1e-7)
_OBJECT_CANNOT_WIN = 1e-4


def slices_objects_can_win(probabilities: torch.Tensor) -> tuple[int, int] | None:
    """``[start, stop)`` of the slices of ``(K + 1, H, W, D)`` probabilities (channel 0: background) on which an
    object may win the argmax, or None where none can (NaN counts as a possible win, as the argmax treats it)."""
    data = probabilities.as_tensor() if hasattr(probabilities, "as_tensor") else torch.as_tensor(probabilities)
    possible = ~(data[:1] - data[1:] > _OBJECT_CANNOT_WIN)  # (K, H, W, D)
    slices = possible.reshape(-1, possible.shape[-1]).any(0).nonzero()[:, 0]
    return None if len(slices) == 0 else (int(slices[0]), int(slices[-1]) + 1)


def postprocess_slices(
    postprocessing: Callable,
    image: Any,
    probabilities: torch.Tensor | Callable[[int, int], torch.Tensor],
    changed: tuple[int, int] | None = None,
    previous: Any = None,
    reuse_previous: bool = False,
) -> Any:
    """``postprocessing({"image": image, "pred": probabilities})["pred"]``, computed where an object can win, or
    where the probabilities changed since a previous answer.

    Why: the bundle's postprocessing (``Invertd`` back to the image's grid, the argmax, label values) costs what the
    image's voxels cost: 1.0 s for a 512 x 512 x 160 volume on a 2-core Intel Xeon, where a follow-up click's model
    work took 0.05 s, though the structure fills a few dozen slices and the click changed eight. When the
    preprocessing was MONAI's ``Orientation`` and a ``Resize`` that kept the slice count (the bundle's default, no
    ``pixdim``), each slice of the model grid maps back on its own (the resize's weight across slices is exactly
    0), so the bundle's own chain runs on a slab (its traced resize told the slab's size): the slices of
    :func:`slices_objects_can_win`, placed into a background volume, or the ``changed`` slices, placed into a copy
    of ``previous``. Same labels, ties included. Other preprocessing (a ``Spacing``, a resize across slices), a
    slab of every slice, or a slab that does not land on the image's voxel axes runs the whole volume.

    Args:
        postprocessing: the bundle's postprocessing, ``Invertd`` of ``image``'s transforms first.
        image: the preprocessed ``(C, H, W, D)`` MetaTensor whose transforms are inverted.
        probabilities: ``(K + 1, H, W, D)`` on ``image``'s grid, channel 0 the background; or a function giving
            the slices ``[start, stop)`` of it, called only for the slices used (a follow-up's changed slices need
            no probabilities for the rest of the volume).
        changed, previous: ``[start, stop)``, the slices whose probabilities differ from those ``previous`` (this
            function's answer for the same image and postprocessing) was made from; both or neither.
        reuse_previous: write the changed slices into ``previous`` itself, which nobody reads any more, instead of
            into a copy of it (a copy of a 512 x 512 x 160 answer took 18-23 ms of a 0.17 s follow-up).

    Returns:
        The postprocessed ``pred``: ``(1, ...)`` in the image file's grid, with its meta; from a slab, its voxels
        are laid out in the file's order (first axis fastest). A new ``MetaTensor``; its voxels are those of
        ``previous``, updated, only with ``reuse_previous`` and a slab (``previous`` is otherwise not changed).
    """

    def run(source, pred) -> Any:
        ops = copy.deepcopy(source.applied_operations)
        pred = MetaTensor(pred, meta=copy.deepcopy(source.meta), applied_operations=ops)
        return postprocessing({"image": source, "pred": pred})["pred"]

    if (changed is None) != (previous is None):
        raise ValueError("postprocess_slices: give both changed and previous, or neither.")
    depth = int(image.shape[-1])
    every_slice: torch.Tensor | None = None  # from a function: all of the probabilities, once asked for

    def slices(start: int, stop: int) -> torch.Tensor:
        nonlocal every_slice
        if not callable(probabilities):
            return probabilities[..., start:stop]
        if every_slice is None and (start, stop) == (0, depth):
            every_slice = probabilities(0, depth)
        return every_slice[..., start:stop] if every_slice is not None else probabilities(start, stop)

    ops = image.applied_operations
    # nothing wins: one slice gives the meta, all background
    slab = changed if changed is not None else slices_objects_can_win(slices(0, depth)) or (0, 1)
    slab_only = (
        [op[TraceKeys.CLASS_NAME] for op in ops] == ["Orientation", "Resize"]
        and int(ops[-1][TraceKeys.ORIG_SIZE][-1]) == depth
        and 0 <= slab[0] < slab[1] <= depth
        and (slab[1] - slab[0] < depth or previous is not None)
    )
    if not slab_only:
        return run(image, slices(0, depth))
    start, stop = slab
    ops = copy.deepcopy(ops)
    ops[-1][TraceKeys.ORIG_SIZE] = (*ops[-1][TraceKeys.ORIG_SIZE][:-1], stop - start)
    affine = torch.as_tensor(image.affine, dtype=torch.float64).clone()
    affine[:3, 3] += affine[:3, 2] * start  # the slab's first slice is its voxel (0, 0, 0)
    meta = {**copy.deepcopy(image.meta), "affine": affine}
    source = MetaTensor(image.as_tensor()[..., start:stop], meta=meta, applied_operations=ops)
    part = run(source, slices(start, stop))
    # where the slab lies in the image file: an offset along the file's voxel axes, or run the whole volume
    file_affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
    to_file = np.linalg.inv(file_affine) @ np.asarray(part.affine, dtype=np.float64)
    shape = [int(v) for v in image.meta["spatial_shape"]]
    offset = [int(round(v)) for v in to_file[:3, 3]]
    if (
        not np.allclose(to_file[:3, :3], np.eye(3), atol=1e-4)
        or not np.allclose(to_file[:3, 3], offset, atol=1e-3)
        or any(o < 0 or o + n > s for o, n, s in zip(offset, part.shape[1:], shape))
        or (previous is not None and (tuple(previous.shape) != (part.shape[0], *shape) or previous.dtype != part.dtype))
    ):
        return run(image, slices(0, depth))
    if previous is not None:
        whole = previous.as_tensor() if isinstance(previous, MetaTensor) else torch.as_tensor(previous)
        whole = whole if reuse_previous else whole.clone()  # its layout kept
    else:
        # laid out first axis fastest, as NIfTI and NRRD store voxels: the writers then copy bytes instead of
        # transposing the whole volume (0.3 s for 512 x 512 x 160 on a 2-core Intel Xeon); only the slab is
        whole = torch.zeros((*shape[::-1], part.shape[0]), dtype=part.dtype).permute(3, 2, 1, 0)
    whole[(slice(None), *(slice(o, o + n) for o, n in zip(offset, part.shape[1:])))] = part.as_tensor()
    meta = {**part.meta, "affine": torch.as_tensor(file_affine, dtype=part.affine.dtype)}
    meta["spatial_shape"] = np.asarray(shape)
    return MetaTensor(whole, meta=meta)
