"""A dark volume with a few small bright spheres ("lesions"), for the proposal tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]

#: (i, j, k) centres in voxels and radii in mm of the lesions
LESIONS = (((12, 14, 3), 3.0), ((30, 28, 5), 4.0), ((20, 36, 2), 2.5))


def write_lesion_phantom(
    path: Path, shape: tuple[int, int, int] = (48, 44, 6), seed: int = 0
) -> tuple[Path, np.ndarray]:
    """Write the phantom (``shape`` = i, j, k voxels; 0.9 x 0.9 x 2 mm, the first axis flipped) to ``path``.

    Returns:
        The path and the affine.
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([-0.9, 0.9, 2.0, 1.0])
    affine[:3, 3] = [20.0, -10.0, 4.0]
    image = rng.normal(50.0, 5.0, shape).astype(np.float32)  # dark, noisy background (MRI-like units)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    spacing = np.abs(np.diag(affine)[:3])
    for (ci, cj, ck), radius in LESIONS:
        sphere = ((i - ci) * spacing[0]) ** 2 + ((j - cj) * spacing[1]) ** 2 + ((k - ck) * spacing[2]) ** 2 <= radius**2
        image[sphere] = 400.0 + rng.normal(0, 10.0, int(sphere.sum()))
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path, affine
