"""Glue between MONAI's data/engine stack and in-context episodes.

MONAI loads and preprocesses volumes (LoadImaged, Orientationd, intensity
scaling, Resized) and Ignite's ``SupervisedTrainer`` runs the loop; what they
lack for in-context training is an episode dataset (paired support and query
slices of the same classes), a ``PrepareBatch`` that hands an episode to the
network's four inputs, and gradient clipping inside ``SupervisedTrainer``'s
iteration (Ignite's and MONAI's trainers have no clipping option).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.transforms import MapTransform

from model_core.datalist import normalise_entry
from model_core.episodes import EpisodeSampler
from model_core.files import atomic_path
from model_core.prompts import PromptSampler

__all__ = ["intensity_scaling", "load_datalist", "check_case", "SelectChanneld", "EpisodeDataset", "EpisodePrepareBatch", "GradientClipHandler", "as_slices", "merge_labels"]


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


def load_datalist(path: str, key: str = "training", base_dir: str | None = None, check: bool = True) -> list[dict[str, Any]]:
    """Read an MSD-style datalist; ``seg`` is accepted for ``label`` and paths are made absolute.

    With ``check`` (default), every case is checked by :func:`check_case` before
    anything runs, so a bad file stops a run at start-up rather than hours into it.

    Raises:
        ValueError: missing or unreadable file, missing key, empty list, entries without
            image, and the case problems of :func:`check_case`.
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
        item = normalise_entry(item, f"Entry {i} of {key!r} in {path!r}")
        for k in ("image", "label"):
            if isinstance(item.get(k), str) and not os.path.isabs(item[k]):
                item[k] = os.path.normpath(os.path.join(base, item[k]))
        if check:
            check_case(item, where=f"Entry {i} of {key!r} in {path!r}")
        out.append(item)
    return out


def _header(path: str, where: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and RAS affine of a volume, reading only the header where the format allows."""
    if not os.path.exists(path):
        raise ValueError(f"{where}: {path!r} does not exist.")
    try:
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            return tuple(int(v) for v in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
        # other formats (DICOM series folders, NRRD, MHA): MONAI's readers, affine in RAS as well
        from monai.transforms import LoadImage

        vol = LoadImage(image_only=True, ensure_channel_first=False)(path)
        return tuple(int(v) for v in vol.shape[:3]), np.asarray(vol.affine, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise ValueError(f"{where}: cannot read {path!r} as an image volume ({type(e).__name__}: {e}).") from e


def check_case(item: dict[str, Any], where: str = "Case", affine_tolerance: float = 1e-3) -> None:
    """Check that a case's files exist and can be read, and that image and label share a grid.

    Reads headers only for NIfTI; other formats are loaded once. The label must have
    the image's spatial shape (a 4D image's channels aside) and the same affine
    (within ``affine_tolerance`` mm), since labels are never resampled to the image.

    Raises:
        ValueError: naming the case and the problem.
    """
    image_shape, image_affine = _header(str(item["image"]), f"{where}, image")
    if item.get("label") is None:
        return
    label_shape, label_affine = _header(str(item["label"]), f"{where}, label")
    if image_shape != label_shape:
        raise ValueError(f"{where}: image {item['image']!r} has shape {image_shape} but its label "
                         f"{item['label']!r} has {label_shape}; they must be on the same grid.")
    if not np.allclose(image_affine, label_affine, atol=affine_tolerance):
        raise ValueError(f"{where}: image {item['image']!r} and label {item['label']!r} have different affines "
                         f"(orientation, spacing or origin):\n{np.round(image_affine, 4)}\nvs\n{np.round(label_affine, 4)}; "
                         "resample the label onto the image grid.")


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
                    raise ValueError(f"{source}: channel {channel} asked for, but the image has {image.shape[0]} channel(s).")
                d[key] = image[channel:channel + 1]
            elif image.shape[0] != 1:
                raise ValueError(f"{source} has {image.shape[0]} channels (modalities); name one with \"channel\": N in its "
                                 "datalist entry (scripts/prepare_datalist.py --channel N).")
        return d


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


def load_case(item: dict[str, Any], transform: Callable) -> dict[str, Any]:
    """Run the preprocessing on one datalist entry; a failure names the case and the cause."""
    try:
        return transform(dict(item))
    except Exception as e:  # noqa: BLE001 - MONAI wraps reader errors in long transform chains
        cause = e
        while cause.__cause__ is not None:  # the reader's own message is at the bottom of the chain
            cause = cause.__cause__
        raise ValueError(f"Case {item.get('image')!r} (label {item.get('label')!r}) could not be loaded and "
                         f"preprocessed: {type(cause).__name__}: {cause}") from e


def describe_transform(transform: Any) -> Any:
    """A JSON-able description of a (composed) MONAI transform's settings, for cache keys.

    Nested transforms (``ScaleIntensityRanged.scaler``, ``Resized.resizer``) are
    described too, so changing a window or a size changes the description.
    """
    from monai.transforms import Compose, Transform

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


class EpisodeDataset(torch.utils.data.Dataset):
    """In-context episodes from volumes loaded by MONAI transforms.

    Each volume goes once through ``transform`` (which must produce ``image`` in
    [0, 1] and an integer ``label``, both ``(1, H, W, D)`` at the model's in-plane
    size), and episodes are drawn from them at random. ``len`` is the number of
    episodes an epoch sees. Failures while loading name the case and happen here,
    before training starts.

    By default the preprocessed volumes are held in memory (float32). With
    ``cache_dir`` each is written there once (float16 image, int16 label, ``.npy``)
    and memory-mapped, so a dataset larger than memory trains: only the slices an
    episode uses are read, and the operating system keeps the hot ones cached. The
    files are keyed by the case's paths and modification times, the preprocessing
    settings and the label merge, and reused by later runs (MONAI's
    ``PersistentDataset`` caches whole volumes, which must be loaded whole to
    sample a few slices).

    Args:
        data: datalist entries (``image`` and ``label`` paths).
        transform: MONAI preprocessing.
        classes: label values to train on.
        num_support, num_query, objects_per_episode: see :class:`EpisodeSampler`.
        image_size: model input size.
        episodes_per_epoch: dataset length.
        seed: random seed (give each distributed rank its own); mixed into the seeds that
            ``monai.data.DataLoader`` gives every worker (see :meth:`set_random_state`).
        label_merge: optional ``{new_value: [old values]}`` applied to labels (e.g.
            KiTS23 kidney + tumour as one class); other values become background.
        cache_dir: optional folder for memory-mapped preprocessed volumes.
        channel_mode: ``replicate`` or ``2.5d`` (see :func:`~model_core.episodes.slice_channels`).
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
        cache_dir: str | None = None,
        channel_mode: str = "replicate",
    ):
        self.transform, self.label_merge, self.cache_dir = transform, label_merge, cache_dir
        volumes = [self._volume(item) for item in data]
        try:
            self.sampler = EpisodeSampler(volumes, list(classes), num_support, num_query, image_size,
                                          objects_per_episode, seed, channel_mode)
        except ValueError as e:  # the sampler sees arrays; the files are named here
            raise ValueError(f"{e} {self.class_files(data, volumes, classes)}") from e
        self.episodes_per_epoch = int(episodes_per_epoch)

    @staticmethod
    def class_files(data: Sequence[dict[str, Any]], volumes: Sequence[tuple[Any, Any]], classes: Sequence[int]) -> str:
        """Which label files hold each class (after ``label_merge``), so a user can see which file to fix or add."""
        parts = []
        for c in classes:
            files = [str(item.get("label")) for item, (_, label) in zip(data, volumes)
                     if np.any(np.asarray(label) == c)]
            parts.append(f"class {c}: {files}")
        return f"Label files holding each class ({len(data)} training volumes): " + "; ".join(parts) + "."

    def _preprocess(self, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        out = load_case(item, self.transform)
        image, label = as_slices(out["image"]).float(), as_slices(out["label"]).round().long()
        if image.shape != label.shape:
            raise ValueError(f"Case {item.get('image')!r}: image {tuple(image.shape)} and label {tuple(label.shape)} "
                             "differ after preprocessing.")
        return image.clamp(0, 1).numpy(), merge_labels(label, self.label_merge).numpy().astype(np.int16)

    def _volume(self, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if not self.cache_dir:
            return self._preprocess(item)
        stamp = {k: [item[k], os.path.getmtime(item[k])] for k in ("image", "label") if isinstance(item.get(k), str)}
        description = json.dumps([stamp, item.get("channel"), describe_transform(self.transform),
                                  {str(k): list(v) for k, v in (self.label_merge or {}).items()}], default=str)
        key = hashlib.sha1(description.encode()).hexdigest()[:20]
        paths = [os.path.join(self.cache_dir, f"{key}_{part}.npy") for part in ("image", "label")]
        if not all(os.path.isfile(p) for p in paths):
            os.makedirs(self.cache_dir, exist_ok=True)
            image, label = self._preprocess(item)
            for path, array in zip(paths, (image.astype(np.float16), label)):
                with atomic_path(path, suffix=".npy") as tmp:  # an interrupted write never looks complete
                    np.save(tmp, array)
            del image, label
        return np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r")

    def __len__(self) -> int:
        return self.episodes_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.sampler.sample(1).items()}

    def set_random_state(self, seed: int | None = None, state: np.random.Generator | None = None) -> "EpisodeDataset":
        """Reseed the episodes (``monai.data.DataLoader`` does, per worker; see :meth:`EpisodeSampler.set_random_state`)."""
        self.sampler.set_random_state(seed, state)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The episode random stream, so a resumed run draws new episodes rather than repeating the first ones."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class EpisodePrepareBatch(PrepareBatch):
    """Hands a collated episode batch to :meth:`InContextSAM2Train.forward <model_core.training.InContextSAM2Train.forward>` inside ``SupervisedTrainer``.

    Returns ``(support_images, query_masks, (support_masks, query_images, prompts), keys)``:
    the trainer calls ``network(support_images, support_masks, query_images, prompts, **keys)``
    and ``loss(pred, query_masks)``. Prompts on query slices are drawn here.

    Args:
        click_probability, box_probability, box_jitter: see :class:`PromptSampler`.
        seed: random seed of the prompts.
    """

    def __init__(self, click_probability: float = 0.0, box_probability: float = 0.0, box_jitter: int = 20, seed: int = 0):
        self.prompts = PromptSampler(click_probability, box_probability, box_jitter, torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict[str, Any]:
        """The prompt random stream (for resuming)."""
        return {"generator": self.prompts.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.generator.set_state(state["generator"])

    def __call__(self, batchdata: dict[str, torch.Tensor], device=None, non_blocking: bool = False, **kwargs: Any):
        b = {k: v.to(device=device, non_blocking=non_blocking) for k, v in batchdata.items()}
        query_masks = b["query_masks"]
        prompts = [self.prompts(query_masks[:, q].flatten(0, 1)) for q in range(query_masks.shape[1])]
        # slice ids let a network with a feature cache skip slices it has encoded before
        keys = {k: batchdata[k] for k in ("support_keys", "query_keys") if k in batchdata}
        return b["support_images"], query_masks, (b["support_masks"], b["query_images"], prompts), keys


class GradientClipHandler:
    """Clip the gradient norm between backward and the optimizer step of a MONAI trainer.

    Under mixed precision ``SupervisedTrainer`` backpropagates the loss multiplied by
    its ``GradScaler``'s scale (2**16 at start) and unscales only inside
    ``scaler.step``; the gradients are unscaled here first (``scaler.unscale_``, as
    sam2's own trainer does before clipping), so ``max_norm`` bounds the true gradient
    and ``scaler.step`` does not unscale them again. ``engine.state.grad_norm`` is the
    unscaled norm before clipping (inf or nan when the scaler found an overflow; that
    step is then skipped by the scaler).

    Args:
        max_norm: maximum total norm (SAM2 fine-tuning uses 0.1).
        norm_type: the p of the p-norm.
    """

    def __init__(self, max_norm: float = 0.1, norm_type: float = 2.0):
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    @staticmethod
    def _check(engine) -> None:
        if int(getattr(engine, "accumulation_steps", 1)) > 1:
            raise ValueError("GradientClipHandler clips after every backward pass; with accumulation_steps > 1 it would "
                             "clip (and unscale) partial sums. Use accumulation_steps 1 or clip elsewhere.")

    def __call__(self, engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None and scaler.is_enabled():
            scaler.unscale_(engine.optimizer)
        params = [p for p in engine.network.parameters() if p.grad is not None]
        engine.state.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type))
