"""In-context episodes as MONAI data for Ignite's ``SupervisedTrainer``: the dataset and the prepare-batch.

MONAI loads and preprocesses volumes (LoadImaged, Orientationd, intensity
scaling, Resized) and Ignite's ``SupervisedTrainer`` runs the loop; what they
lack for in-context training is an episode dataset (paired support and query
slices of the same classes, :class:`~model_core.training.episodes.EpisodeSampler`)
and a ``PrepareBatch`` that hands an episode to the network's four inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.engines.utils import PrepareBatch

from model_core.io.files import atomic_path
from model_core.io.transforms import describe_transform, load_case, merge_labels
from model_core.modeling.inputs import as_slices
from model_core.training.episodes import EpisodeSampler
from model_core.training.prompts import PromptSampler

__all__ = ["EpisodeDataset", "EpisodePrepareBatch"]


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
        channel_mode: ``replicate`` or ``2.5d`` (see :func:`~model_core.modeling.inputs.slice_channels`).
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
            self.sampler = EpisodeSampler(
                volumes, list(classes), num_support, num_query, image_size, objects_per_episode, seed, channel_mode
            )
        except ValueError as e:  # the sampler sees arrays; the files are named here
            raise ValueError(f"{e} {self.class_files(data, volumes, classes)}") from e
        self.episodes_per_epoch = int(episodes_per_epoch)

    @staticmethod
    def class_files(data: Sequence[dict[str, Any]], volumes: Sequence[tuple[Any, Any]], classes: Sequence[int]) -> str:
        """Which label files hold each class (after ``label_merge``), so a user can see which file to fix or add."""
        parts = []
        for c in classes:
            files = [
                str(item.get("label")) for item, (_, label) in zip(data, volumes) if np.any(np.asarray(label) == c)
            ]
            parts.append(f"class {c}: {files}")
        return f"Label files holding each class ({len(data)} training volumes): " + "; ".join(parts) + "."

    def _preprocess(self, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        out = load_case(item, self.transform)
        image, label = as_slices(out["image"]).float(), as_slices(out["label"]).round().long()
        if image.shape != label.shape:
            raise ValueError(
                f"Case {item.get('image')!r}: image {tuple(image.shape)} and label {tuple(label.shape)} "
                "differ after preprocessing."
            )
        return image.clamp(0, 1).numpy(), merge_labels(label, self.label_merge).numpy().astype(np.int16)

    def _volume(self, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if not self.cache_dir:
            return self._preprocess(item)
        stamp = {k: [item[k], os.path.getmtime(item[k])] for k in ("image", "label") if isinstance(item.get(k), str)}
        description = json.dumps(
            [
                stamp,
                item.get("channel"),
                describe_transform(self.transform),
                {str(k): list(v) for k, v in (self.label_merge or {}).items()},
            ],
            default=str,
        )
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

    def set_random_state(self, seed: int | None = None, state: np.random.Generator | None = None) -> EpisodeDataset:
        """Reseed the episodes (``monai.data.DataLoader`` does, per worker; see
        :meth:`EpisodeSampler.set_random_state`).
        """
        self.sampler.set_random_state(seed, state)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The episode random stream, so a resumed run draws new episodes rather than repeating the first ones."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class EpisodePrepareBatch(PrepareBatch):
    """Hands a collated episode batch to :meth:`InContextSAM2Train.forward
    <model_core.training.network.InContextSAM2Train.forward>` inside ``SupervisedTrainer``.

    Returns ``(support_images, query_masks, (support_masks, query_images, prompts), keys)``:
    the trainer calls ``network(support_images, support_masks, query_images, prompts, **keys)``
    and ``loss(pred, query_masks)``. Prompts on query slices are drawn here.

    Args:
        click_probability, box_probability, box_jitter: see :class:`PromptSampler`.
        seed: random seed of the prompts.
    """

    def __init__(
        self, click_probability: float = 0.0, box_probability: float = 0.0, box_jitter: int = 20, seed: int = 0
    ):
        self.prompts = PromptSampler(
            click_probability, box_probability, box_jitter, torch.Generator().manual_seed(seed)
        )

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
