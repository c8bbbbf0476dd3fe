"""Automatic lesion proposals: SAM2's automatic mask generator over the slices of a volume, merged into 3D.

sam2 ships :class:`sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator` for 2D images
(a grid of point prompts, filtered by predicted IoU, stability and box NMS). It is used
here unchanged, with the project's network (:class:`~model_core.modeling.network.InContextSAM2`
is a ``SAM2Base``) on every slice of the volume as the bundle's preprocessing makes
them. What sam2 lacks, and what this module adds:

1. **3D merging** (:func:`link_slice_masks`). SAM's masks overlap and nest (a lesion
   inside the brain inside the head), so stacking them and taking 3D connected
   components would fuse a lesion with everything around it. Instead masks on adjacent
   slices are linked when their IoU is at least ``link_iou``, or when they are each
   other's best match (by IoU) and the smaller lies mostly (``link_containment``) inside
   the larger: the second rule keeps a sphere's small end caps with it, the mutual-best
   condition keeps a lesion apart from the organ around it (the organ's best match is
   the organ on the next slice). A candidate is one connected group of linked masks
   (union-find), its voxels the union of its masks.
2. **Scores and filters** (:func:`select_candidates`): per candidate the mean predicted
   IoU and mean stability score of its masks, ``score`` = their product (the ranking);
   size limits in mm³ (grid independent), a minimum number of slices, and overlap
   resolution: candidates are taken best first, one that shares more than
   ``max_overlap`` of its voxels with a better one is dropped, smaller overlaps stay
   with the better one, so the label map holds each voxel once.
3. **Back to the image's grid** (:func:`~model_core.workflows.proposals.labels_to_original`): the model-grid label map
   goes through MONAI's ``Invertd`` over the bundle's own preprocessing (as the bundle's
   and the service's postprocessing do), with nearest interpolation so candidate values
   are never blended; :func:`~model_core.workflows.proposals.finalize_candidates` then measures each candidate there
   (voxels, mm³, bounding box, slices) and renumbers them ``1..N`` best first.

This module works on the model's slices (:func:`propose_slices`). Volume files and front
ends are :mod:`model_core.workflows.proposals`: ``ProposalInferer`` (a MONAI ``Inferer``, for
the bundle's ``proposals.json``), ``ProposalsToOriginald`` and ``ProposalSaver`` (the
bundle's postprocessing and its JSON of scores), and ``propose_image`` (the service's
``propose``, for the MONAI Label app's ``lesion_proposals`` model).

With random weights the generator finds no lesions, only arbitrary masks; the tests
check the machinery (merging, scores, filters, back-mapping), not the findings.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

from model_core.proposal_regions import Candidate, Region, SliceMask

__all__ = [
    "ProposalSettings",
    "build_candidates",
    "generate_slice_masks",
    "link_slice_masks",
    "mask_generator",
    "paint_candidates",
    "propose_slices",
    "select_candidates",
]

#: arguments of SAM2AutomaticMaskGenerator set here, never by a caller
_FIXED_GENERATOR_ARGS = ("model", "output_mode", "point_grids", "kwargs")


def _generator_arguments() -> list[str]:

    names = inspect.signature(SAM2AutomaticMaskGenerator.__init__).parameters
    return [n for n in names if n != "self" and n not in _FIXED_GENERATOR_ARGS]


@dataclass
class ProposalSettings:
    """What a lesion-proposal run is given (bundle config keys and app request params alike).

    Generator (sam2's ``SAM2AutomaticMaskGenerator``, passed through unchanged):

    Args:
        points_per_side: point prompts per side of each slice (``points_per_side²`` per slice);
            cost grows with its square. Small lesions need a dense grid.
        points_per_batch: prompts run by the mask decoder at once.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0..1).
        stability_score_thresh: keep masks whose stability score is at least this (0..1).
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which duplicate masks of a slice are suppressed.
        min_mask_region_area: holes and specks up to this area (pixels) are cleaned by sam2's
            predictor; needs sam2's compiled extension (``sam2._C``), without it sam2 warns and skips.
        crop_n_layers: sam2's extra crop layers (0: the whole slice only).
        use_m2m: sam2's one-step mask refinement.
        generator_kwargs: any other ``SAM2AutomaticMaskGenerator`` argument.

    Merging and filters:

    Args:
        max_slice_fraction: per-slice masks covering more than this fraction of the slice are
            dropped before linking (the body, the background: never a lesion).
        link_iou: masks on adjacent slices with at least this IoU belong to the same candidate.
        link_containment: mutual best matches on adjacent slices are linked when this fraction of
            the smaller lies inside the larger (0 turns the rule off).
        min_volume_mm3, max_volume_mm3: size limits of a candidate (None: no upper limit).
        min_slices: a candidate must span at least this many slices.
        max_overlap: a candidate sharing more than this fraction of its voxels with a better one is dropped.
        max_candidates: at most this many candidates (the best by score).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    crop_n_layers: int = 0
    use_m2m: bool = False
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    max_slice_fraction: float = 0.25
    link_iou: float = 0.3
    link_containment: float = 0.7
    min_volume_mm3: float = 0.0
    max_volume_mm3: float | None = None
    min_slices: int = 1
    max_overlap: float = 0.5
    max_candidates: int = 255

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ProposalSettings:
        """Settings from a dict; an unknown key is an error that lists the accepted ones."""
        values = dict(values or {})
        known = [f.name for f in cls.__dataclass_fields__.values()]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown proposal setting(s) {unknown}; accepted: {known}.")
        return cls(**values)

    def validate(self) -> None:
        """Raises ValueError naming the field and what it accepts."""

        def check(name: str, ok: bool, accepts: str) -> None:
            if not ok:
                raise ValueError(f"Proposal setting {name} must be {accepts}, got {getattr(self, name)!r}.")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)

        check("points_per_side", is_int(self.points_per_side) and 1 <= self.points_per_side <= 256, "an integer 1..256")
        check("points_per_batch", is_int(self.points_per_batch) and self.points_per_batch >= 1, "a positive integer")
        for name in (
            "pred_iou_thresh",
            "stability_score_thresh",
            "box_nms_thresh",
            "max_slice_fraction",
            "link_iou",
            "link_containment",
            "max_overlap",
        ):
            check(name, is_num(getattr(self, name)) and 0 <= getattr(self, name) <= 1, "a number in [0, 1]")
        check(
            "stability_score_offset",
            is_num(self.stability_score_offset) and self.stability_score_offset > 0,
            "a positive number",
        )
        check(
            "min_mask_region_area",
            is_int(self.min_mask_region_area) and self.min_mask_region_area >= 0,
            "an integer >= 0",
        )
        check("crop_n_layers", is_int(self.crop_n_layers) and 0 <= self.crop_n_layers <= 3, "an integer 0..3")
        check("use_m2m", isinstance(self.use_m2m, bool), "true or false")
        check("min_volume_mm3", is_num(self.min_volume_mm3) and self.min_volume_mm3 >= 0, "a number >= 0")
        check(
            "max_volume_mm3",
            self.max_volume_mm3 is None or (is_num(self.max_volume_mm3) and self.max_volume_mm3 > self.min_volume_mm3),
            "null or a number above min_volume_mm3",
        )
        check("min_slices", is_int(self.min_slices) and self.min_slices >= 1, "an integer >= 1")
        check(
            "max_candidates", is_int(self.max_candidates) and 1 <= self.max_candidates <= 32767, "an integer 1..32767"
        )
        check(
            "generator_kwargs",
            isinstance(self.generator_kwargs, dict),
            "a dict of SAM2AutomaticMaskGenerator arguments",
        )
        named = {f for f in self.__dataclass_fields__ if f in _generator_arguments()}
        bad = sorted(k for k in self.generator_kwargs if k not in _generator_arguments() or k in named)
        if bad:
            raise ValueError(
                f"generator_kwargs {bad} are not SAM2AutomaticMaskGenerator arguments left to set here; "
                f"accepted: {sorted(set(_generator_arguments()) - named)} (the others are settings of their own)."
            )

    def generator_args(self) -> dict[str, Any]:
        """The ``SAM2AutomaticMaskGenerator`` arguments of these settings."""
        names = _generator_arguments()
        return {**{k: v for k, v in asdict(self).items() if k in names}, **self.generator_kwargs}


# ---------------------------------------------------------------------------- generator
def mask_generator(network, settings: ProposalSettings):
    """sam2's ``SAM2AutomaticMaskGenerator`` on ``network`` (any ``SAM2Base``, at any image size).

    sam2's ``SAM2ImagePredictor`` hard-codes the backbone feature sizes of a 1024-pixel
    model (256, 128, 64); they are set here from the network's image size (strides 4, 8, 16),
    the one thing it needs to run at the sizes this project uses.
    """

    generator = SAM2AutomaticMaskGenerator(network, output_mode="binary_mask", **settings.generator_args())
    s = int(network.image_size)
    generator.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return generator


@torch.inference_mode()
def generate_slice_masks(network, slices: torch.Tensor, settings: ProposalSettings) -> list[list[SliceMask]]:
    """Run sam2's automatic mask generator on every slice.

    Args:
        network: an :class:`~model_core.modeling.network.InContextSAM2`.
        slices: ``(D, 3, S, S)`` float in [0, 1] at the model size (the network's input contract).
        settings: generator settings.

    Returns:
        Per slice, its masks (those above ``max_slice_fraction`` of the slice dropped).
    """
    slices = network.check_images(slices, "slices")
    slices = slices.float() / 255.0 if slices.dtype == torch.uint8 else slices.float()
    generator = mask_generator(network, settings)
    limit = float(settings.max_slice_fraction) * slices.shape[-1] * slices.shape[-2]
    out: list[list[SliceMask]] = []
    for z in range(slices.shape[0]):
        # HWC float in [0, 1]: sam2's transforms (ToTensor, Resize, ImageNet Normalize) take it unscaled
        image = slices[z].permute(1, 2, 0).cpu().numpy()
        with network._autocast():
            records = generator.generate(image)
        out.append(
            [
                SliceMask.from_mask(z, r["segmentation"], r["predicted_iou"], r["stability_score"])
                for r in records
                if 0 < int(r["area"]) <= limit
            ]
        )
    return out


# ---------------------------------------------------------------------------- 3D merging
def _overlaps(a: Sequence[SliceMask], b: Sequence[SliceMask]) -> tuple[np.ndarray, np.ndarray]:
    """``(len(a), len(b))`` IoU, and intersection over the smaller area, of two slices' masks."""
    iou, contained = np.zeros((len(a), len(b))), np.zeros((len(a), len(b)))
    if not a or not b:
        return iou, contained
    boxes_a = np.array([[m.region.top, m.region.left, m.region.bottom, m.region.right] for m in a])
    boxes_b = np.array([[m.region.top, m.region.left, m.region.bottom, m.region.right] for m in b])
    touch = (
        np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0]) < np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    ) & (np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1]) < np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3]))
    for i, j in zip(*np.nonzero(touch)):  # only masks whose boxes meet can overlap
        inter = a[i].region.intersection(b[j].region)
        if inter:
            area_a, area_b = a[i].area, b[j].area
            iou[i, j] = inter / (area_a + area_b - inter)
            contained[i, j] = inter / min(area_a, area_b)
    return iou, contained


def link_slice_masks(
    per_slice: Sequence[Sequence[SliceMask]], link_iou: float, link_containment: float = 0.0
) -> list[list[tuple[int, int]]]:
    """Group slice masks into 3D candidates by linking masks on adjacent slices.

    Two masks on adjacent slices are linked when their IoU is at least ``link_iou``, or
    when they are each other's best match by IoU and at least ``link_containment`` of the
    smaller lies inside the larger (a sphere's end cap and the disk next to it; a lesion
    and the organ around it are not mutual best matches while the organ goes on).

    Args:
        per_slice: per slice (in order, adjacent slices adjacent), its masks.
        link_iou: IoU at which two masks are one structure (0 < link_iou <= 1).
        link_containment: containment of mutual best matches at which they are linked (0: off).

    Returns:
        Groups of ``(slice position, mask index)``, each sorted, ordered by their first member.
    """
    if not 0 < float(link_iou) <= 1:
        raise ValueError(f"link_iou must be in (0, 1], got {link_iou!r}.")
    if not 0 <= float(link_containment) <= 1:
        raise ValueError(f"link_containment must be in [0, 1], got {link_containment!r}.")
    nodes = [(z, i) for z, masks in enumerate(per_slice) for i in range(len(masks))]
    parent = {n: n for n in nodes}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for z in range(len(per_slice) - 1):
        iou, contained = _overlaps(per_slice[z], per_slice[z + 1])
        if iou.size == 0:
            continue
        links = iou >= float(link_iou)
        if link_containment > 0:
            best_b, best_a = iou.argmax(1), iou.argmax(0)
            for i, j in enumerate(best_b):
                if best_a[j] == i and iou[i, j] > 0 and contained[i, j] >= float(link_containment):
                    links[i, j] = True
        for i, j in zip(*np.nonzero(links)):
            ra, rb = find((z, int(i))), find((z + 1, int(j)))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    return [sorted(g) for _, g in sorted(groups.items())]


def build_candidates(
    per_slice: Sequence[Sequence[SliceMask]], groups: Sequence[Sequence[tuple[int, int]]]
) -> list[Candidate]:
    """One :class:`Candidate` per group: the union of its masks per slice and its mean scores."""
    out = []
    for group in groups:
        regions: dict[int, Region] = {}
        members = [per_slice[z][i] for z, i in group]
        for m in members:
            regions[m.slice] = regions[m.slice].union(m.region) if m.slice in regions else m.region
        out.append(
            Candidate(
                list(group),
                members,
                regions,
                float(np.mean([m.predicted_iou for m in members])),
                float(np.mean([m.stability_score for m in members])),
            )
        )
    return out


def select_candidates(
    candidates: Sequence[Candidate], settings: ProposalSettings, voxel_mm3: float = 1.0
) -> list[Candidate]:
    """Filter by size and slices, rank by score, resolve overlaps; the kept ones best first.

    Args:
        candidates: from :func:`build_candidates`.
        settings: ``min_volume_mm3``, ``max_volume_mm3``, ``min_slices``, ``max_overlap``, ``max_candidates``.
        voxel_mm3: volume of one model-grid voxel in mm³.

    Returns:
        New candidates (the inputs are not changed) whose masks are disjoint.
    """

    def fits(c: Candidate) -> bool:
        volume = c.voxels * voxel_mm3
        return (
            volume >= settings.min_volume_mm3
            and (settings.max_volume_mm3 is None or volume <= settings.max_volume_mm3)
            and len(c.slices) >= settings.min_slices
            and c.voxels > 0
        )

    ranked = sorted((c for c in candidates if fits(c)), key=lambda c: (-c.score, -c.voxels, c.members[0]))
    claimed: dict[int, np.ndarray] = {}  # (H, W) bool per slice: the voxels of the kept candidates
    kept: list[Candidate] = []
    for c in ranked:
        if len(kept) >= settings.max_candidates:
            break
        shared = sum(int((r.crop & r.window(claimed[z])).sum()) for z, r in c.regions.items() if z in claimed)
        if shared > settings.max_overlap * c.voxels:
            continue
        own = Candidate(
            c.members,
            c.sources,
            {
                z: Region(r.top, r.left, r.crop & ~r.window(claimed[z]), r.shape) if z in claimed else r
                for z, r in c.regions.items()
            },
            c.predicted_iou,
            c.stability_score,
        )
        if not fits(own):
            continue
        for z, r in own.regions.items():
            r.window(claimed.setdefault(z, np.zeros(r.shape, bool)))[...] |= r.crop
        kept.append(own)
    return kept


def paint_candidates(candidates: Sequence[Candidate], shape: tuple[int, int, int]) -> torch.Tensor:
    """``(H, W, D)`` int32 label map of disjoint candidates: candidate ``n`` (0-based) gets value ``n + 1``."""
    label = torch.zeros(shape, dtype=torch.int32)
    for n, c in enumerate(candidates, start=1):
        for z, r in c.regions.items():
            label[r.top : r.bottom, r.left : r.right, z][torch.from_numpy(r.crop)] = n
    return label


def propose_slices(
    network, slices: torch.Tensor, settings: ProposalSettings, voxel_mm3: float = 1.0
) -> tuple[torch.Tensor, list[Candidate], dict[str, int]]:
    """Candidates of one volume on the model grid.

    Args:
        network: the network.
        slices: ``(D, 3, S, S)`` the volume's slices (input contract).
        settings: see :class:`ProposalSettings`.
        voxel_mm3: volume of one model-grid voxel in mm³ (for the size limits).

    Returns:
        ``(label (S, S, D) int32, candidates best first, counts)``, the label map in MONAI's
        ``(H, W, D)`` layout of the preprocessed volume, candidate ``n`` as value ``n``.
    """
    per_slice = generate_slice_masks(network, slices, settings)
    groups = link_slice_masks(per_slice, settings.link_iou, settings.link_containment)
    candidates = build_candidates(per_slice, groups)
    kept = select_candidates(candidates, settings, voxel_mm3)
    S = int(slices.shape[-1])
    counts = {
        "slices": int(slices.shape[0]),
        "generator_masks": sum(len(m) for m in per_slice),
        "linked_components": len(candidates),
        "candidates_model_grid": len(kept),
    }
    return paint_candidates(kept, (S, S, int(slices.shape[0]))), kept, counts
