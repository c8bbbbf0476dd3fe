"""In-context episodes from labelled volumes: what one training step sees.

An episode is what one training step sees: for a class, S support slices with
their ground truth from one volume and Q consecutive query slices from another.
MONAI has samplers of patches and slices but none of paired support/query sets,
so the sampling lives here; the bundle wraps it in a MONAI dataset
(:class:`~model_core.workflows.episodes.EpisodeDataset`). Slices and masks follow the
network's input contract (:mod:`model_core.modeling.inputs`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from model_core.modeling.inputs import CHANNEL_MODES, class_masks, slice_channels

__all__ = ["EpisodeSampler"]


class EpisodeSampler:
    """Random in-context episodes from labelled volumes.

    An episode's K classes share its support slices and query window; support and
    query come from different volumes.

    Args:
        volumes: ``[(image (D, H, W) float in [0, 1], label (D, H, W) int)]``; at least two.
        classes: label values to draw episodes for.
        num_support: S support slices (containing the class) per episode.
        num_query: Q consecutive query slices per episode, a window overlapping the
            class (edge slices may lack it, which trains the object score).
        image_size: model input size.
        objects_per_episode: K classes per episode (at most ``len(classes)``).
        seed: random seed; :meth:`set_random_state` mixes it into the seeds it is given,
            so it keeps distributed ranks apart when every rank's loader seeds alike.
        channel_mode: how slices become 3 channels (see :func:`slice_channels`).

    Images are kept as given (e.g. memory-mapped) and only sampled slices are read.

    Reseeding follows MONAI's ``Randomizable``: ``monai.data.DataLoader`` calls
    :meth:`set_random_state` (through ``monai.data.utils.set_rnd``) in every worker
    with that worker's seed, so workers draw different episodes, and with
    ``num_workers=0`` once with a seed from torch's generator, so
    ``monai.utils.set_determinism`` makes a run repeatable.
    """

    def __init__(
        self,
        volumes: Sequence[tuple[Any, Any]],
        classes: Sequence[int],
        num_support: int,
        num_query: int,
        image_size: int,
        objects_per_episode: int = 1,
        seed: int = 0,
        channel_mode: str = "replicate",
    ):
        if len(volumes) < 2:
            raise ValueError("Episodes need at least two volumes (support and query come from different ones).")
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}.")
        self.channel_mode = channel_mode
        self.images = [img for img, _ in volumes]
        self.labels = [lab if isinstance(lab, np.ndarray) else np.asarray(torch.as_tensor(lab)) for _, lab in volumes]
        self.classes = list(classes)
        self.num_support, self.num_query, self.image_size = num_support, num_query, image_size
        if not 1 <= objects_per_episode <= len(self.classes):
            raise ValueError(
                f"objects_per_episode must be between 1 and {len(self.classes)}, got {objects_per_episode}."
            )
        self.objects_per_episode = objects_per_episode
        self.seed = int(seed)
        self.salt: list[int] = []  # set by load_state_dict: a resumed run's workers draw new episodes
        self.rng = np.random.default_rng(self.seed)
        # slices containing each class, per volume
        self.present = {
            c: [np.nonzero((lab == c).reshape(lab.shape[0], -1).any(1))[0] for lab in self.labels] for c in self.classes
        }
        for c in self.classes:
            if sum(len(p) > 0 for p in self.present[c]) < 2:
                raise ValueError(f"Class {c} appears in fewer than two volumes; it cannot make episodes.")

    def set_random_state(self, seed: int | None = None, state: np.random.Generator | None = None) -> EpisodeSampler:
        """Reseed the episode stream (MONAI's ``Randomizable.set_random_state`` contract).

        Args:
            seed: combined with the sampler's own ``seed`` (and, after a resume, with the
                restored stream) into a new stream.
            state: a ``numpy.random.Generator`` to draw from instead.
        """
        if state is not None:
            if not isinstance(state, np.random.Generator):
                raise TypeError(f"state must be a numpy.random.Generator, got {type(state).__name__}.")
            self.rng = state
        elif seed is not None:
            self.rng = np.random.default_rng([self.seed, int(seed) % 2**32, *self.salt])
        else:
            self.rng = np.random.default_rng()
        return self

    def state_dict(self) -> dict[str, Any]:
        """The episode random stream, so a resumed run draws new episodes rather than repeating the first ones."""
        return {"rng": self.rng.bit_generator.state, "salt": list(self.salt)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved stream (``num_workers=0``); loader workers, which reseed every
        epoch, get seeds salted by it, so they do not repeat the first run's episodes."""
        self.rng.bit_generator.state = state["rng"]
        self.salt = [*state.get("salt", []), int(self.rng.integers(2**32))]

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A batch of episodes, each with ``objects_per_episode`` classes on the same slices.

        Several classes share one episode's support slices and query window, so the
        tracks differ only by their support masks: a model that ignores the support
        set cannot fit them all (with one class per episode it can drift to
        segmenting "the salient structure" regardless of the support).

        Returns:
            ``support_images (B, S, 3, H, W)``, ``support_masks (B, S, K, H, W)``,
            ``query_images (B, Q, 3, H, W)``, ``query_masks (B, Q, K, H, W)``, and
            ``support_keys (B, S)``, ``query_keys (B, Q)``: int64 ids of the slices
            (``volume * 2**32 + slice``), for caching their image features.
        """
        keys = ("support_images", "support_masks", "query_images", "query_masks", "support_keys", "query_keys")
        out: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for _ in range(batch_size):
            k = min(self.objects_per_episode, len(self.classes))
            classes = [self.classes[i] for i in self.rng.choice(len(self.classes), size=k, replace=False)]
            having = [i for i in range(len(self.labels)) if all(len(self.present[c][i]) for c in classes)]
            if len(having) < 2:  # these classes never meet twice: fall back to one class
                classes = classes[:1]
                having = [i for i, p in enumerate(self.present[classes[0]]) if len(p)]
            vs, vq = self.rng.choice(having, size=2, replace=False)
            # support slices: round-robin over the classes, each slice containing its class
            chosen: list[int] = []
            for j in range(self.num_support):
                pool = [z for z in self.present[classes[j % len(classes)]][vs] if z not in chosen]
                pool = pool or list(self.present[classes[j % len(classes)]][vs])
                chosen.append(int(self.rng.choice(pool)))
            sup = np.sort(np.array(chosen))
            # a window of Q consecutive slices overlapping a class (edge slices may lack it)
            D = self.labels[vq].shape[0]
            anchor = int(self.rng.choice(self.present[classes[self.rng.integers(len(classes))]][vq]))
            start = int(np.clip(anchor - self.rng.integers(self.num_query), 0, max(D - self.num_query, 0)))
            qry = np.arange(start, start + self.num_query).clip(max=D - 1)
            masks_s = class_masks(self.labels[vs][sup], classes, self.image_size)
            masks_q = class_masks(self.labels[vq][qry], classes, self.image_size)
            pad = self.objects_per_episode - len(classes)
            if pad:  # keep K fixed across the batch: repeat the first class
                masks_s = torch.cat([masks_s] + [masks_s[:, :1]] * pad, dim=1)
                masks_q = torch.cat([masks_q] + [masks_q[:, :1]] * pad, dim=1)
            out["support_images"].append(slice_channels(self.images[vs], sup, self.image_size, self.channel_mode))
            out["support_masks"].append(masks_s)
            out["query_images"].append(slice_channels(self.images[vq], qry, self.image_size, self.channel_mode))
            out["query_masks"].append(masks_q)
            out["support_keys"].append(torch.as_tensor(int(vs) * 2**32 + sup, dtype=torch.int64))
            out["query_keys"].append(torch.as_tensor(int(vq) * 2**32 + qry, dtype=torch.int64))
        return {k: torch.stack(v) for k, v in out.items()}
