"""Write phantom volumes as NIfTI files with an MSD-style datalist (the bundle's built-in data).

    python scripts/make_phantom_dataset.py --output_dir bundle/data/phantoms --train 8 --validation 2 --test 2

Each case is ``caseNNN_image.nii.gz`` (float32 intensities in [0, 1], 1 mm voxels,
axial slices along the third axis) and ``caseNNN_label.nii.gz`` (uint8: 1 blob,
2 tube, 3 block; see model_core.phantoms).
"""

from __future__ import annotations

import os

import fire
import nibabel as nib
import numpy as np

from model_core.phantoms import PHANTOM_LABELS, make_phantom
from prepare_datalist import write_datalist


def make_dataset(
    output_dir: str,
    train: int = 8,
    validation: int = 2,
    test: int = 2,
    shape: tuple[int, int, int] = (24, 96, 96),
    seed: int = 0,
) -> str:
    """Write the volumes and ``datalist.json``; returns the datalist path.

    Args:
        output_dir: folder to write to (created).
        train, validation, test: cases per split.
        shape: ``(D, H, W)`` of each phantom.
        seed: base seed (case i uses ``seed * 1000 + i``).
    """
    os.makedirs(output_dir, exist_ok=True)
    splits = {"training": train, "validation": validation, "test": test}
    datalist: dict = {"name": "ICL-SAM2 phantoms", "labels": dict(PHANTOM_LABELS)}
    case = 0
    for split, count in splits.items():
        datalist[split] = []
        for _ in range(count):
            image, label = make_phantom(tuple(shape), seed=seed * 1000 + case)
            entry = {}
            for key, array in (("image", image), ("label", label)):
                name = f"case{case:03d}_{key}.nii.gz"
                # (D, H, W) -> (H, W, D): axial slices along the third axis, identity affine (RAS, 1 mm)
                nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(1, 2, 0)), np.eye(4)), os.path.join(output_dir, name))
                entry[key] = name
            datalist[split].append(entry)
            case += 1
    return str(write_datalist(datalist, os.path.join(output_dir, "datalist.json")))


if __name__ == "__main__":
    fire.Fire(make_dataset, serialize=lambda p: print(p))
