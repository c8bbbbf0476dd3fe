"""Generated 3D cases in the CVPR 2024 laptop challenge's npz form, for timing and agreement tests.

The challenge's 3D cases are CT/MRI volumes with one or more structures, each with a 3D box
(its bounding box). Offline there are none, so :func:`write_phantom_cases` makes cases of the
same form from :func:`model_core.io.phantoms.make_phantom`: a ``size`` x ``size`` volume whose
blob (an ellipsoid) spans a chosen number of slices (``extent``), stored as the challenge
stores cases (``imgs`` uint8 ``(D, H, W)``, ``boxes`` ``(1, 6)`` ``x_min, y_min, z_min, x_max,
y_max, z_max`` from the ground truth, ``spacing``; the ground truth ``gts`` beside it).
The depth is set so that the blob covers ``extent`` slices: a phantom's structures scale with
the volume (coordinates in [-1, 1]), so the blob's share of the slices is read from a small
phantom of the same seed first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from model_core.io.files import atomic_path
from model_core.io.phantoms import PHANTOM_LABELS, make_phantom

__all__ = ["write_phantom_cases"]


def _blob_share(seed: int) -> float:
    _, label = make_phantom((64, 32, 32), seed=seed)
    slices = np.flatnonzero((label == PHANTOM_LABELS["blob"]).any(axis=(1, 2)))
    return max(len(slices), 1) / 64


def write_phantom_cases(
    output_dir: str | os.PathLike,
    cases: int = 5,
    extent: Sequence[int] = (40, 80),
    size: int = 256,
    seed: int = 0,
) -> list[str]:
    """Write ``cases`` 3D cases to ``output_dir/imgs`` and their ground truth to ``output_dir/gts``.

    Args:
        output_dir: created if missing.
        cases: how many (named ``3D_phantom_000.npz``...).
        extent: ``(lo, hi)``: case ``i`` has its structure over about ``lo + (hi - lo) * i / (cases - 1)`` slices.
        size: slice side in pixels (the challenge's 3D cases are often 256 x 256 or larger).
        seed: the first case's phantom seed (case ``i`` uses ``seed + i``).

    Returns:
        The image files written.

    Raises:
        ValueError: fewer than one case, an extent below 2 slices or reversed, a size below 32.
    """
    lo, hi = (int(v) for v in extent)
    if int(cases) < 1 or lo < 2 or hi < lo or int(size) < 32:
        raise ValueError(
            f"cases must be at least 1, extent (lo, hi) with 2 <= lo <= hi and size at least 32; got cases={cases}, "
            f"extent={tuple(extent)}, size={size}."
        )
    folder = Path(output_dir)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    (folder / "gts").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(int(cases)):
        target = lo + (hi - lo) * i / max(int(cases) - 1, 1)
        depth = max(int(round(target / _blob_share(seed + i))), 2)
        image, label = make_phantom((depth, int(size), int(size)), seed=seed + i)
        gts = (label == PHANTOM_LABELS["blob"]).astype(np.uint8)
        z, y, x = np.nonzero(gts)
        boxes = np.array([[x.min(), y.min(), z.min(), x.max(), y.max(), z.max()]], dtype=np.int64)
        spacing = np.array([1.0, 1.0, 1.0])
        name = f"3D_phantom_{i:03d}.npz"
        image_file = folder / "imgs" / name
        with atomic_path(image_file, suffix=".npz") as tmp:
            np.savez_compressed(tmp, imgs=np.round(image * 255).astype(np.uint8), boxes=boxes, spacing=spacing)
        with atomic_path(folder / "gts" / name, suffix=".npz") as tmp:
            np.savez_compressed(tmp, gts=gts, spacing=spacing)
        written.append(str(image_file))
    return written
