"""In-context learning data from one real brain: Colin27 T1 with five label sets (Debian mricron-data).

    icl-sam2 brain-atlas --output_dir runs/brain     # writes this data, trains, evaluates (icl_sam2.brain_atlas)

``/usr/share/mricron/templates`` holds one real T1 MRI (Colin27, ``ch2.nii.gz``, 181 x 217 x 181,
1 mm) and several label sets in its (MNI) space: AAL (116 regions, drawn on Colin27 itself),
Brodmann areas (41, on the same grid), AICHA (192, 2 mm), Harvard-Oxford cortical (48, FSL's
1 mm MNI grid) and the JHU white-matter labels (48, the same FSL grid). :func:`load_label_set`
brings each onto the T1's grid by world coordinates (nearest voxel, nibabel's resampling); the
MNI152-based sets (Harvard-Oxford, JHU, AICHA) fit Colin27's anatomy only approximately.

What is written (:func:`write_brain_study`):

- **Training** (``datalist.json`` key ``training``): every label set on three views of the T1
  (``full``: the whole axial plane; ``zoom``: a central crop, so structures appear larger; ``mirror``:
  left and right exchanged, each label moved to its mirror partner, so the same class lies on the
  same side, drawn from the other hemisphere's anatomy). Label values are ``offset + value``
  (:data:`LABEL_SETS`), int16. Held-out structures are zero everywhere, and so is every training
  structure that overlaps them (:func:`training_classes`): the model never sees them labelled.
- **Held out** (``heldout`` key, one entry per structure): the structure's ``num_support`` support
  slices (evenly spread over its axial extent, as :func:`~model_core.workflows.inferers.support_slice_choice`
  picks them) stacked into a ``support_<name>`` volume, and its other slices, from ``margin`` slices
  below it to ``margin`` above, in a ``query_<name>`` volume; labels are the structure alone
  (value :data:`HELDOUT_VALUE`). Support and query never share a slice.

Why here: MONAI reads volumes and resamples them, but nothing upstream knows these atlases, their
name files or a held-out split of structures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from model_core.io.datalist import write_datalist
from model_core.io.mricron import T1, TEMPLATES
from model_core.io.validation import InputError

__all__ = [
    "HELDOUT",
    "HELDOUT_VALUE",
    "LABEL_SETS",
    "LabelSet",
    "heldout_split",
    "load_label_set",
    "mirror_partners",
    "training_classes",
    "write_brain_study",
]


@dataclass(frozen=True)
class LabelSet:
    """One atlas of mricron-data: its file, its names file (``value name ...`` per line) and its label offset."""

    file: str
    names: str | None
    offset: int


#: label sets, their files and the offset added to their values in the training labels (int16)
LABEL_SETS = {
    "aal": LabelSet("aal.nii.gz", "aal.nii.txt", 0),
    "jhu": LabelSet("JHU-WhiteMatter-labels-1mm.nii.gz", "JHU-WhiteMatter-labels-1mm.nii.txt", 200),
    "brodmann": LabelSet("brodmann.nii.gz", None, 300),
    "harvard_oxford": LabelSet("HarvardOxford-cort-maxprob-thr0-1mm.nii.gz", None, 400),
    "aicha": LabelSet("AICHAmc.nii.gz", "AICHAmc.nii.txt", 500),
}

#: held-out AAL structures (both hemispheres of each: no side of them is seen in training): four deep grey
#: nuclei with visible edges on T1 and one cortical gyrus whose borders are partly drawn, not seen
HELDOUT = (
    "Caudate_L",
    "Caudate_R",
    "Putamen_L",
    "Putamen_R",
    "Thalamus_L",
    "Thalamus_R",
    "Hippocampus_L",
    "Hippocampus_R",
    "Precentral_L",
    "Precentral_R",
)

#: the label value of a held-out structure in its support and query files
HELDOUT_VALUE = 1

# the zoom view's in-plane crop of the 181 x 217 plane (voxels), about the brain's extent
ZOOM = ((18, 163), (22, 197))


def names_of(name: str) -> dict[str, int]:
    """``{region name: value}`` of a label set (``<set>_<value>`` where it ships no names file)."""
    spec = _spec(name)
    if spec.names is None:
        return {}
    out = {}
    for line in (TEMPLATES / spec.names).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) > 0:
            out[parts[1]] = int(parts[0])
    return out


def _spec(name: str) -> LabelSet:
    if name not in LABEL_SETS:
        raise InputError(f"Unknown label set {name!r}; choose from {sorted(LABEL_SETS)}.")
    return LABEL_SETS[name]


def _require_files(label_sets: Sequence[str]) -> None:
    missing = [str(T1)] if not T1.is_file() else []
    missing += [str(TEMPLATES / _spec(s).file) for s in label_sets if not (TEMPLATES / _spec(s).file).is_file()]
    if missing:
        raise InputError(f"{missing} missing: install Debian's mricron-data (`apt-get install mricron-data`).")


def load_t1() -> nib.Nifti1Image:
    """The Colin27 T1 (``ch2.nii.gz``)."""
    _require_files([])
    return nib.load(str(T1))


def load_label_set(name: str, reference: nib.Nifti1Image | None = None) -> np.ndarray:
    """A label set on the T1's grid: ``(181, 217, 181)`` int16 of its own values (0 = none), nearest voxel by
    world coordinates (the sets on other grids, Harvard-Oxford, JHU and AICHA, are resampled)."""
    _require_files([name])
    reference = reference if reference is not None else load_t1()
    atlas = nib.load(str(TEMPLATES / _spec(name).file))
    if atlas.shape[:3] == reference.shape[:3] and np.allclose(atlas.affine, reference.affine):
        data = np.asarray(atlas.dataobj)
    else:
        data = np.asarray(resample_from_to(atlas, (reference.shape[:3], reference.affine), order=0).dataobj)
    return np.rint(data).astype(np.int16)


def mirror_partners(labels: np.ndarray) -> dict[int, int]:
    """Each label's partner across the midline: the label that best covers its left-right mirror image.

    Bilateral labels (Brodmann, Harvard-Oxford) are their own partners; AAL's ``X_L`` pairs with ``X_R``.
    The first axis is left-right (RAS, as the T1). Labels with no partner covering at least a third of
    their mirror are left out.
    """
    flipped = labels[::-1]
    partners = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        under = flipped[labels == value]  # what the mirror image lays over this label
        under = under[under > 0]
        if under.size == 0:
            continue
        values, counts = np.unique(under, return_counts=True)
        best = int(values[counts.argmax()])
        if counts.max() >= (labels == value).sum() / 3:
            partners[best] = int(value)  # the mirror of `best` lands on `value`
    return partners


def training_classes(
    label_sets: dict[str, np.ndarray], heldout_mask: np.ndarray, max_overlap: float = 0.2, min_voxels: int = 200
) -> dict[str, list[int]]:
    """The values of each set that training may see: not overlapping the held-out structures.

    A value is left out when more than ``max_overlap`` of its voxels lie in a held-out structure, or it
    covers more than ``max_overlap`` of a held-out structure's voxels (Brodmann area 4 for the precentral
    gyrus), or it has fewer than ``min_voxels`` voxels.

    Args:
        label_sets: ``{set: labels}`` on the T1's grid.
        heldout_mask: ``(181, 217, 181)`` int, each held-out structure's index + 1 (0 elsewhere).
    """
    heldout_sizes = np.bincount(heldout_mask.ravel())
    out = {}
    for name, labels in label_sets.items():
        keep = []
        for value in np.unique(labels):
            if value == 0:
                continue
            region = labels == value
            size = int(region.sum())
            if size < min_voxels:
                continue
            inside = np.bincount(heldout_mask[region], minlength=len(heldout_sizes))
            covers = (inside[1:] / np.maximum(heldout_sizes[1:], 1)).max(initial=0.0)
            if inside[1:].sum() / size > max_overlap or covers > max_overlap:
                continue
            keep.append(int(value))
        out[name] = keep
    return out


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> str:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array).astype(dtype), affine), str(path))
    return path.name


def heldout_split(mask: np.ndarray, num_support: int, margin: int) -> tuple[list[int], list[int]]:
    """Axial slices of one structure: ``num_support`` support slices evenly spread over its extent, and the
    query slices (its extent widened by ``margin`` on each side, within the volume, less the support slices).

    Args:
        mask: ``(X, Y, Z)`` bool, axial slices along the last axis.
    """
    present = np.nonzero(mask.reshape(-1, mask.shape[2]).any(0))[0]
    if present.size < num_support + 1:
        raise InputError(f"The structure spans {present.size} slices; {num_support} support slices leave no query.")
    n = present.size
    support = sorted({int(present[(i + 1) * n // (num_support + 1)]) for i in range(num_support)})
    lo, hi = max(int(present[0]) - margin, 0), min(int(present[-1]) + margin, mask.shape[2] - 1)
    query = [z for z in range(lo, hi + 1) if z not in support]
    return support, query


def _slab_affine(affine: np.ndarray, z0: int) -> np.ndarray:
    shift = np.eye(4)
    shift[2, 3] = z0
    return affine @ shift


def write_brain_study(
    output_dir: str,
    heldout: Sequence[str] = HELDOUT,
    label_sets: Sequence[str] = tuple(LABEL_SETS),
    views: Sequence[str] = ("full", "zoom", "mirror"),
    num_support: int = 3,
    margin: int = 5,
    max_overlap: float = 0.2,
) -> str:
    """Write the training views, the held-out support/query volumes and ``datalist.json``; returns its path.

    Args:
        output_dir: folder to write to (created).
        heldout: AAL names of the held-out structures (see ``aal.nii.txt``).
        label_sets: the sets to train on (:data:`LABEL_SETS`).
        views: training views (``full``, ``zoom``, ``mirror``); at least two, as episodes take support and
            query from different volumes.
        num_support, margin: see :func:`heldout_split`.
        max_overlap: see :func:`training_classes`.

    Returns:
        The datalist's path. Besides MSD's keys it has ``classes`` (training label values), ``heldout``
        (``[{"name", "support": {"image", "label"}, "query": {"image", "label"}, "support_slices",
        "query_slices"}]``, slice indices ``k`` of the T1) and ``label_names`` (``{value: "set:name"}``).

    Raises:
        InputError: mricron-data missing, an unknown set, view or structure, or fewer than two views.
    """
    views = list(views)
    unknown_views = [v for v in views if v not in ("full", "zoom", "mirror")]
    if unknown_views or len(views) < 2:
        raise InputError(f"views must be at least two of 'full', 'zoom', 'mirror'; got {views}.")
    if isinstance(heldout, str):
        heldout = [heldout]
    label_sets = list(label_sets)
    _require_files(label_sets or ["aal"])
    t1 = load_t1()
    image = np.asarray(t1.dataobj).astype(np.int16)
    aal = load_label_set("aal", t1)
    aal_names = names_of("aal")
    unknown = [h for h in heldout if h not in aal_names]
    if unknown or not heldout:
        raise InputError(f"heldout {list(unknown) or list(heldout)}: give AAL region names (see aal.nii.txt).")
    heldout_mask = np.zeros(aal.shape, np.int16)
    for i, name in enumerate(heldout, start=1):
        heldout_mask[aal == aal_names[name]] = i
    sets = {name: load_label_set(name, t1) for name in label_sets}
    keep = training_classes(sets, heldout_mask, max_overlap)
    out = Path(output_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    crops = {"full": (slice(None), slice(None)), "mirror": (slice(None, None, -1), slice(None))}
    crops["zoom"] = (slice(*ZOOM[0]), slice(*ZOOM[1]))
    affines = {view: t1.affine for view in views}
    if "zoom" in views:
        affines["zoom"] = t1.affine @ np.array(
            [[1, 0, 0, ZOOM[0][0]], [0, 1, 0, ZOOM[1][0]], [0, 0, 1, 0], [0, 0, 0, 1]]
        )
    # a mirrored copy keeps the affine: another brain's anatomy (the T1 mirrored), not the same brain seen flipped
    images = {
        view: _save(image[crops[view]], affines[view], out / "train" / f"{view}_t1.nii.gz", np.int16) for view in views
    }
    training, classes, label_names = [], [], {}
    for name, labels in sets.items():
        offset = _spec(name).offset
        names = {v: k for k, v in names_of(name).items()}
        train_labels = np.where(np.isin(labels, keep[name]), labels + offset, 0).astype(np.int16)
        classes += [v + offset for v in keep[name]]
        label_names.update({v + offset: f"{name}:{names.get(v, v)}" for v in keep[name]})
        for view in views:
            lab = train_labels[crops[view]]
            if view == "mirror":  # each label on its partner's mirrored voxels, so a class stays on its own side
                mirrored, lab = labels[::-1], np.zeros_like(train_labels)
                for source, target in mirror_partners(labels).items():
                    if target in keep[name]:
                        lab[mirrored == source] = target + offset
            label_file = _save(lab, affines[view], out / "train" / f"{view}_{name}.nii.gz", np.int16)
            training.append({"image": f"train/{images[view]}", "label": f"train/{label_file}"})
    heldout_entries = []
    for i, name in enumerate(heldout, start=1):
        mask = heldout_mask == i
        support, query = heldout_split(mask, num_support, margin)
        entry = {"name": name, "support_slices": support, "query_slices": query}
        for part, slices in (("support", support), ("query", query)):
            # the slices as one volume; its affine places the first at its own k (the others follow on)
            affine = _slab_affine(t1.affine, slices[0])
            held = out / "heldout"
            entry[part] = {
                "image": "heldout/" + _save(image[..., slices], affine, held / f"{part}_{name}_t1.nii.gz", np.int16),
                "label": "heldout/" + _save(mask[..., slices], affine, held / f"{part}_{name}_label.nii.gz", np.uint8),
            }
        heldout_entries.append(entry)
    datalist = {
        "name": "Colin27 T1, five label sets, held-out structures",
        "labels": {label_names[c]: c for c in classes},
        "classes": classes,
        "label_names": {str(k): v for k, v in label_names.items()},
        "training": training,
        "validation": [e["query"] for e in heldout_entries],
        "heldout": heldout_entries,
        "settings": {
            "heldout": list(heldout),
            "label_sets": label_sets,
            "views": views,
            "num_support": num_support,
            "margin": margin,
            "max_overlap": max_overlap,
        },
    }
    os.makedirs(output_dir, exist_ok=True)
    return str(write_datalist(datalist, out / "datalist.json"))
