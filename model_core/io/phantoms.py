"""Synthetic phantom volumes for fast, deterministic tests and demos.

Each volume is a noisy body ellipse holding three structures that differ in shape
and intensity, at random positions, sizes and contrasts:

====  ==========  ===================================  ======================
label name        shape                                intensity (body 0.45)
====  ==========  ===================================  ======================
1     blob        ellipsoid                            bright (0.70-0.90)
2     tube        cylinder along z, radius varies      dark (0.15-0.30)
3     block       rotated box, shorter in z            medium (0.55-0.65)
====  ==========  ===================================  ======================

Every structure is in every volume, so only the support set tells the model which
one to segment. :func:`write_phantom_dataset` writes phantoms as NIfTI files with an
MSD-style datalist (the bundle's built-in data, ``icl-sam2 phantoms``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from model_core.io.datalist import write_datalist

__all__ = [
    "PHANTOM_LABELS",
    "make_phantom",
    "phantom_study_case",
    "structure_click",
    "write_phantom_dataset",
    "write_phantom_study",
]

PHANTOM_LABELS = {"blob": 1, "tube": 2, "block": 3}


def make_phantom(shape: tuple[int, int, int] = (32, 128, 128), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume.

    Args:
        shape: ``(D, H, W)`` in voxels.
        seed: random seed (same seed, same volume).

    Returns:
        ``image`` ``(D, H, W)`` float32 in [0, 1] and ``label`` ``(D, H, W)`` uint8 (0 = background).
    """
    rng = np.random.default_rng(seed)
    D, H, W = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, D, dtype=np.float32),
        np.linspace(-1, 1, H, dtype=np.float32),
        np.linspace(-1, 1, W, dtype=np.float32),
        indexing="ij",
    )
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    body = (y / rng.uniform(0.85, 0.95)) ** 2 + (x / rng.uniform(0.85, 0.95)) ** 2 <= 1
    image[body] = 0.45 + rng.uniform(-0.03, 0.03)

    # three quadrant centres, shuffled: structures never overlap
    centres = [(-0.45, -0.45), (-0.45, 0.45), (0.45, -0.45), (0.45, 0.45)]
    order = rng.permutation(4)[:3]
    (cy1, cx1), (cy2, cx2), (cy3, cx3) = [centres[i] for i in order]
    jitter = lambda: rng.uniform(-0.08, 0.08)  # noqa: E731

    # 1 blob: ellipsoid
    cz, cy, cx = rng.uniform(-0.2, 0.2), cy1 + jitter(), cx1 + jitter()
    rz, ry, rx = rng.uniform(0.35, 0.6), rng.uniform(0.2, 0.3), rng.uniform(0.2, 0.3)
    blob = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    # 2 tube: along z over most of the volume, radius varies with z
    cy, cx = cy2 + jitter(), cx2 + jitter()
    z0, z1 = rng.uniform(-0.95, -0.6), rng.uniform(0.6, 0.95)
    radius = rng.uniform(0.1, 0.16) * (1 + 0.3 * np.sin(math.pi * z * rng.uniform(0.5, 1.5)))
    tube = (((y - cy) ** 2 + (x - cx) ** 2) <= radius**2) & (z >= z0) & (z <= z1)
    # 3 block: box rotated in-plane
    cz, cy, cx = rng.uniform(-0.2, 0.2), cy3 + jitter(), cx3 + jitter()
    a = rng.uniform(0, math.pi / 2)
    u = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
    v = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
    hz, hu, hv = rng.uniform(0.25, 0.45), rng.uniform(0.15, 0.25), rng.uniform(0.1, 0.2)
    block = (np.abs(z - cz) <= hz) & (np.abs(u) <= hu) & (np.abs(v) <= hv)

    for mask, lab, lo, hi in ((blob, 1, 0.70, 0.90), (tube, 2, 0.15, 0.30), (block, 3, 0.55, 0.65)):
        mask &= body
        image[mask] = rng.uniform(lo, hi)
        label[mask] = lab
    # texture and noise, as in a scan; then back to [0, 1]
    image += rng.normal(0, 0.03, shape).astype(np.float32)
    image += 0.03 * np.sin(7 * x + rng.uniform(0, 6)) * np.cos(5 * y + rng.uniform(0, 6))
    return np.clip(image, 0, 1).astype(np.float32), label


def write_phantom_dataset(
    output_dir: str | os.PathLike,
    train: int = 8,
    validation: int = 2,
    test: int = 2,
    shape: tuple[int, int, int] = (24, 96, 96),
    seed: int = 0,
) -> str:
    """Write phantom volumes as NIfTI files and ``datalist.json`` beside them.

    Each case is ``caseNNN_image.nii.gz`` (float32 intensities in [0, 1], 1 mm voxels,
    axial slices along the third axis, identity affine) and ``caseNNN_label.nii.gz``
    (uint8 values of :data:`PHANTOM_LABELS`). The datalist's paths are relative to its folder.

    Args:
        output_dir: folder to write to (created).
        train, validation, test: cases per split.
        shape: ``(D, H, W)`` of each phantom.
        seed: base seed (case i uses ``seed * 1000 + i``).

    Returns:
        The datalist's path.
    """

    os.makedirs(output_dir, exist_ok=True)
    splits = {"training": train, "validation": validation, "test": test}
    datalist: dict = {"name": "ICL-SAM2 phantoms", "labels": dict(PHANTOM_LABELS)}
    case = 0
    for split, count in splits.items():
        datalist[split] = []
        for _ in range(int(count)):
            image, label = make_phantom(tuple(shape), seed=seed * 1000 + case)
            entry = {}
            for key, array in (("image", image), ("label", label)):
                name = f"case{case:03d}_{key}.nii.gz"
                # (D, H, W) -> (H, W, D): axial slices along the third axis, identity affine (RAS, 1 mm)
                volume = nib.Nifti1Image(np.ascontiguousarray(array.transpose(1, 2, 0)), np.eye(4))
                nib.save(volume, os.path.join(output_dir, name))
                entry[key] = name
            datalist[split].append(entry)
            case += 1
    return str(write_datalist(datalist, os.path.join(output_dir, "datalist.json")))


def phantom_study_case(index: int, shape: tuple[int, int, int] = (256, 256, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Volume ``index`` of :func:`write_phantom_study` and its full label (every case has one here,
    labelled in the study or not: the truth that benchmarks score answers against).

    Returns:
        ``image`` ``(i, j, k)`` float32 in [0, 1] and ``label`` ``(i, j, k)`` uint8, in the files' voxel order.
    """
    image, label = make_phantom((shape[2], shape[0], shape[1]), seed=int(index))  # (D, H, W)
    return image.transpose(1, 2, 0), label.transpose(1, 2, 0)


def write_phantom_study(
    folder: str | os.PathLike,
    shape: tuple[int, int, int] = (256, 256, 64),
    cases: int = 3,
    labelled: int = 1,
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    scale: float = 1.0,
) -> list[str]:
    """Phantom volumes in MONAI Label's datastore layout: ``<folder>/caseN.nii.gz`` and ``labels/final/caseN.nii.gz``.

    Args:
        folder: the studies folder (created).
        shape: ``(i, j, k)`` of each volume (k: slices).
        cases: how many volumes; the first ``labelled`` get a final label.
        spacing: voxel size in mm.
        scale: intensities are ``[0, scale]`` (255 for a tool that reads grey levels as 8-bit values,
            such as MONAI Label's SAM2 task).

    Returns:
        The image ids (``case0``, ...).
    """
    folder = Path(folder)
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, spacing), 1.0])
    ids = []
    for i in range(cases):
        image, label = phantom_study_case(i, shape)
        nib.save(nib.Nifti1Image((image * float(scale)).astype(np.float32), affine), str(folder / f"case{i}.nii.gz"))
        if i < labelled:
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labels" / "final" / f"case{i}.nii.gz"))
        ids.append(f"case{i}")
    return ids


def structure_click(label: np.ndarray, value: int, offset: int = 0) -> list[int]:
    """Where a user clicks structure ``value`` of an ``(i, j, k)`` label map (the last axis: slices).

    The voxel of the structure nearest its in-plane centroid, on the middle slice of its extent
    moved ``offset`` slices (clamped to the extent), so benchmarks click where the structure is
    whatever the phantom's random layout.

    Returns:
        ``[i, j, k]`` voxel indices, as Slicer and OHIF send clicks.

    Raises:
        ValueError: the structure is not in the label map.
    """
    inside = np.asarray(label) == int(value)
    slices = np.nonzero(inside.reshape(-1, inside.shape[-1]).any(0))[0]
    if len(slices) == 0:
        raise ValueError(f"Structure {value} is not in the label map.")
    k = int(np.clip((slices[0] + slices[-1]) // 2 + int(offset), slices[0], slices[-1]))
    i, j = np.nonzero(inside[..., k])
    nearest = int(np.argmin((i - i.mean()) ** 2 + (j - j.mean()) ** 2))
    return [int(i[nearest]), int(j[nearest]), k]
