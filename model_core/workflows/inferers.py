"""Whole-volume in-context inference for MONAI workflows.

MONAI's inferers (SimpleInferer, SlidingWindowInferer) run a network on the input
alone; in-context segmentation also needs the support set, encoded once and
reused for every query volume. :func:`build_support` turns support volumes
(loaded by the same MONAI preprocessing as the queries) into a
:class:`SupportMemory`, and :class:`InContextInferer` segments each query volume
with it, returning per-class probabilities in MONAI's channel-first layout so that
MONAI's post-transforms, metrics and writers work unchanged. :class:`InContextSliceNet`
exposes the same for MONAI Label's per-slice callers.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from model_core.io.files import atomic_path
from model_core.io.transforms import load_case, merge_labels
from model_core.io.validation import InputError
from model_core.modeling.inputs import as_slices, class_masks, volume_to_slices
from model_core.modeling.memory import MemoryPolicy, SupportMemory
from model_core.predictor import VolumePredictor

__all__ = ["InContextInferer", "InContextSliceNet", "build_support", "support_slice_choice"]


def support_slice_choice(labels: Sequence[np.ndarray], classes: Sequence[int], per_class: int) -> list[tuple[int, int]]:
    """Deterministic support slices: per class, ``per_class`` slices evenly spread over the
    slices that contain it, across all support volumes.

    Returns:
        Sorted unique ``(volume, slice)`` pairs.

    Raises:
        InputError: a class absent from every support volume (the labels' owner can fix it).
    """
    chosen: set[tuple[int, int]] = set()
    for c in classes:
        having = [
            (v, int(z))
            for v, lab in enumerate(labels)
            for z in np.nonzero((lab == c).reshape(lab.shape[0], -1).any(1))[0]
        ]
        if not having:
            raise InputError(f"Class {c} is absent from the support set; label it on at least one support slice.")
        n = len(having)
        # evenly spread and distinct: the i-th of per_class equal parts of the extent
        picks = [(i + 1) * n // (per_class + 1) for i in range(per_class)] if per_class < n else range(n)
        chosen.update(having[p] for p in picks)
    return sorted(chosen)


@torch.inference_mode()
def build_support(
    network,
    data: Sequence[dict[str, Any]],
    transform: Callable,
    classes: Sequence[int],
    num_support: int,
    label_merge: dict[int, Sequence[int]] | None = None,
    cache_file: str | None = None,
    channel_mode: str = "replicate",
) -> SupportMemory:
    """Encode a support set from labelled volumes, one object per class.

    With ``cache_file``, a memory saved there earlier is loaded instead of rebuilt
    (the network checks on use that it was built by the same weights), and a newly
    built one is saved there, so a support set is encoded once across runs.

    Args:
        network: an :class:`~model_core.modeling.network.InContextSAM2`.
        data: support datalist entries (``image`` and ``label``).
        transform: the preprocessing of the queries (so support and query match).
        classes: label values to segment (object ids of the memory, in order).
        num_support: support slices per class.
        label_merge: optional ``{new_value: [old values]}`` (see EpisodeDataset).
        cache_file: optional path of a saved :class:`SupportMemory`.
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained (see
            :func:`~model_core.modeling.inputs.slice_channels`).
    """
    if cache_file and os.path.isfile(cache_file):
        memory = SupportMemory.load(cache_file)
        if memory.object_ids != list(classes) or memory.architecture != network.architecture:
            raise ValueError(
                f"The support memory in {cache_file!r} was built for objects {memory.object_ids} by another model "
                f"or checkpoint; delete it to rebuild it for {list(classes)} with this one."
            )
        return memory
    if not data:
        raise ValueError("The support set is empty; name at least one labelled support volume.")
    images, labels = [], []
    for entry in data:
        if entry.get("label") is None:
            raise ValueError(f"Support case {entry.get('image')!r} has no label.")
        item = load_case(entry, transform)
        image, label = as_slices(item["image"]).float(), as_slices(item["label"]).round().long()
        label = merge_labels(label, label_merge)
        images.append(volume_to_slices(image.clamp(0, 1), network.image_size, channel_mode))
        labels.append(label.numpy())
    picks = support_slice_choice(labels, classes, num_support)
    sup_images = torch.stack([images[v][z] for v, z in picks])
    masks = torch.cat([class_masks(labels[v][z : z + 1], classes, network.image_size) for v, z in picks])
    memory = network.build_support_memory(sup_images, masks, object_ids=list(classes))
    if cache_file:
        with atomic_path(cache_file) as tmp:
            memory.save(tmp)
    return memory


class InContextInferer(Inferer):
    """Segment whole query volumes with a support memory (a MONAI :class:`~monai.inferers.Inferer`).

    Args:
        support: the support memory, or a zero-argument callable that builds it. A built
            memory is reused for every query volume and rebuilt only when the network's
            weights change (e.g. validation during training, a newly published model).
        policy: memory selection policy name or :class:`MemoryPolicy` (default ``recent``).
        direction: propagation direction (``forward`` from the first slice by default).
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained.
    """

    def __init__(
        self,
        support: SupportMemory | Callable[[], SupportMemory],
        policy: str | MemoryPolicy = "recent",
        direction: str = "forward",
        channel_mode: str = "replicate",
    ):
        super().__init__()
        self._builder = support if callable(support) else None
        self._memory = None if callable(support) else support
        self.policy = MemoryPolicy(policy) if isinstance(policy, str) else policy
        self.direction = direction
        self.channel_mode = channel_mode
        #: per-class confidence of the last volumes, ``[(K,) tensor per batch item]``
        self.last_confidence: list[torch.Tensor] = []

    @property
    def support(self) -> SupportMemory | None:
        """The support memory last used (None before the first volume when built lazily)."""
        return self._memory

    def support_for(self, network) -> SupportMemory:
        """The support memory for ``network``'s current weights, (re)built when needed."""
        if self._builder is not None and (self._memory is None or self._memory.architecture != network.architecture):
            self._memory = self._builder()
        return self._memory

    def __call__(
        self, inputs: torch.Tensor, network, *args: Any, on_slice: Callable[[int], Any] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Args:
            inputs: ``(B, 1, H, W, D)`` query volumes in [0, 1] (axial slices last, in-plane at the model size).
            network: the :class:`InContextSAM2`.
            on_slice: called with each slice's index once it is segmented (a progress bar per volume).

        Returns:
            ``(B, K + 1, H, W, D)`` probabilities: background, then one channel per class.
        """
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"InContextInferer takes (B, 1, H, W, D) volumes, got {tuple(inputs.shape)}.")
        was_training = network.training
        network.eval()
        support = self.support_for(network)
        outs, self.last_confidence = [], []
        for b in range(inputs.shape[0]):
            slices = volume_to_slices(
                as_slices(inputs[b].as_tensor() if isinstance(inputs, MetaTensor) else inputs[b]).clamp(0, 1),
                network.image_size,
                self.channel_mode,
            )
            pred = VolumePredictor(network).segment_volume(
                slices,
                support,
                policy=self.policy,
                direction=self.direction,
                output_size=tuple(inputs.shape[2:4]),
                return_logits=True,
                on_slice=on_slice,
            )
            probs = pred.logits.float().sigmoid().permute(0, 2, 3, 1)  # (K, H, W, D)
            background = 1 - probs.max(0, keepdim=True).values
            outs.append(torch.cat([background, probs]))
            self.last_confidence.append(pred.confidence())
        network.train(was_training)
        out = torch.stack(outs).to(inputs.device)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return out


class InContextSliceNet(torch.nn.Module):
    """The network as a plain ``image -> logits`` module, with its support set bound in.

    The training network's ``forward`` takes whole episodes (support images, support
    masks, query images, prompts) and the inference network has none, so tools that call ``net(image)`` (MONAI's
    ``verify_net_in_out``, exporters, generic inferers) get this view: the slices of a
    batch are segmented in order as one short volume, with the support memory.

    Args:
        network: an :class:`~model_core.modeling.network.InContextSAM2`.
        support: a support memory or a zero-argument callable that builds it (built on first use).
        policy: memory selection policy name.
    """

    def __init__(self, network, support: SupportMemory | Callable[[], SupportMemory], policy: str = "recent"):
        super().__init__()
        self.network = network
        self._support = support
        self.policy = MemoryPolicy(policy)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args:
            images: ``(N, 3, H, W)`` consecutive slices in [0, 1] at the model size.

        Returns:
            ``(N, K, H, W)`` float32 mask logits, one channel per support object.
        """
        if callable(self._support) and not isinstance(self._support, SupportMemory):
            self._support = self._support()
        pred = VolumePredictor(self.network).segment_volume(
            images, self._support, policy=self.policy, return_logits=True
        )
        return pred.logits.float().transpose(0, 1).to(images.device)
