"""Cut a small real-MRI study from the Colin27 T1 template and its AAL atlas (Debian package mricron-data).

    icl-sam2 mricron-study --output_dir /tmp/mricron_study
    icl-sam2 mricron-study --output_dir /tmp/mricron_study --regions '["Precentral_L","Precentral_R"]'

Needs ``apt-get install mricron-data`` (``/usr/share/mricron/templates``). Three views of the
1 mm template are written, each as ``<view>_t1.nii.gz`` (int16 T1) and ``<view>_aal.nii.gz``
(uint8 AAL labels resampled the same way, nearest voxel):

- ``support``: 2 mm, the whole axial plane, 12 slices from z = +25 mm, RAS like the template;
- ``upper``: the 12 slices above the support, another crop, stored LPS (x and y reversed);
- ``lower``: 12 slices below the support, 3 mm in-plane, stored slice axis first (S, R, A).

``datalist.json`` has ``labels`` (``{region: AAL value}``), ``training`` (the support),
``validation`` (the two queries with labels) and ``test`` (the two queries, images only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from model_core.io.datalist import write_datalist

TEMPLATES = Path("/usr/share/mricron/templates")
T1, ATLAS, NAMES = TEMPLATES / "ch2.nii.gz", TEMPLATES / "aal.nii.gz", TEMPLATES / "aal.nii.txt"

# four large AAL regions present in every view below: left/right precentral and middle frontal gyri
REGIONS = ("Precentral_L", "Precentral_R", "Frontal_Mid_L", "Frontal_Mid_R")

# Views of the 1 mm template: voxel ranges (start, stop) per axis, steps (mm), axes to flip, axis order.
VIEWS = {
    # support: 2 mm, whole axial plane, 12 slices from z = +25 mm, RAS like the template
    "support": {"ranges": ((0, 181), (0, 217), (96, 120)), "steps": (2, 2, 2), "flips": (), "order": (0, 1, 2)},
    # query 1: the 12 slices above the support, another crop, stored LPS (x and y reversed)
    "upper": {"ranges": ((10, 171), (20, 207), (120, 144)), "steps": (2, 2, 2), "flips": (0, 1), "order": (0, 1, 2)},
    # query 2: 12 slices below the support, 3 mm in-plane, stored slice axis first (S, R, A)
    "lower": {"ranges": ((0, 181), (0, 217), (72, 96)), "steps": (3, 3, 2), "flips": (), "order": (2, 0, 1)},
}


def available() -> bool:
    """Whether the mricron-data files (T1 template, AAL atlas and its names) are installed."""
    return T1.is_file() and ATLAS.is_file() and NAMES.is_file()


def aal_names() -> dict[str, int]:
    """``{region name: label value}`` from the atlas's text file (``value name code`` per line)."""
    names = {}
    for line in NAMES.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[parts[1]] = int(parts[0])
    return names


def cut(data: np.ndarray, affine: np.ndarray, ranges, steps, flips, order) -> tuple[np.ndarray, np.ndarray]:
    """Crop and subsample ``data`` (nearest voxel), reverse and reorder its axes, with the matching affine."""
    index = tuple(slice(a, b, s) for (a, b), s in zip(ranges, steps))
    out = data[index]
    grid = np.eye(4)
    grid[:3, :3] = np.diag(steps)
    grid[:3, 3] = [a for a, _ in ranges]
    affine = affine @ grid
    for axis in flips:
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, out.shape[axis] - 1
        out, affine = np.flip(out, axis), affine @ flip
    permute = np.eye(4)
    permute[:3, :3] = np.eye(3)[:, list(order)]  # new axis i is old axis order[i]
    return np.ascontiguousarray(out.transpose(order)), affine @ permute


def make_study(output_dir: str, regions: Sequence[str] = REGIONS) -> str:
    """Write the support/upper/lower cases and ``datalist.json``; returns the datalist path.

    Args:
        output_dir: folder to write to (created).
        regions: AAL region names to keep as classes (see ``/usr/share/mricron/templates/aal.nii.txt``);
            each must be present in every view.

    Raises:
        ValueError: mricron-data is not installed, a region is unknown or absent from a view,
            or the template and atlas (or a cut of them) do not line up.
    """
    if not available():
        raise ValueError(
            f"The Colin27 template and AAL atlas ({T1}, {ATLAS}, {NAMES}) are missing; "
            "install them with `apt-get install mricron-data`."
        )
    if isinstance(regions, str):
        regions = (regions,)
    regions = list(regions)
    if not regions:
        raise ValueError("No regions given.")
    names = aal_names()
    unknown = [r for r in regions if r not in names]
    if unknown:
        raise ValueError(f"Unknown AAL region(s) {unknown}; the names are listed in {NAMES}.")
    labels = {r: names[r] for r in regions}
    t1, atlas = nib.load(str(T1)), nib.load(str(ATLAS))
    if not (np.allclose(t1.affine, atlas.affine) and t1.shape == atlas.shape):
        raise ValueError(f"{T1} and {ATLAS} are not on the same grid.")
    t1_data, atlas_data = np.asarray(t1.dataobj), np.asarray(atlas.dataobj)
    os.makedirs(output_dir, exist_ok=True)
    files = {}
    for view, spec in VIEWS.items():
        image, affine = cut(t1_data, t1.affine, **spec)
        label, label_affine = cut(atlas_data, atlas.affine, **spec)
        if not np.array_equal(affine, label_affine):
            raise ValueError(f"View {view!r}: the image and label affines differ.")
        # the affine is right: a voxel of the view lies where the same value lies in the template
        inverse = np.linalg.inv(t1.affine)
        for ijk in ([0, 0, 0], [s - 1 for s in image.shape], [s // 2 for s in image.shape]):
            src = np.rint(nib.affines.apply_affine(inverse, nib.affines.apply_affine(affine, ijk))).astype(int)
            if image[tuple(ijk)] != t1_data[tuple(src)]:
                raise ValueError(f"View {view!r}: voxel {ijk} does not map back to template voxel {src.tolist()}.")
        present = set(np.unique(label).tolist())
        absent = [r for r, v in labels.items() if v not in present]
        if absent:
            raise ValueError(
                f"Region(s) {absent} are absent from view {view!r}; choose regions present at "
                "z = +1 to +72 mm (voxels 72-143 of the template's third axis)."
            )
        files[view] = {}
        for key, array, dtype, suffix in (("image", image, np.int16, "t1"), ("label", label, np.uint8, "aal")):
            files[view][key] = f"{view}_{suffix}.nii.gz"
            nib.save(nib.Nifti1Image(array.astype(dtype), affine), os.path.join(output_dir, files[view][key]))
    queries = ("upper", "lower")
    datalist = {
        "name": "Colin27 T1 + AAL",
        "labels": labels,
        "training": [files["support"]],
        "validation": [files[v] for v in queries],
        "test": [{"image": files[v]["image"]} for v in queries],
    }
    return str(write_datalist(datalist, os.path.join(output_dir, "datalist.json")))
