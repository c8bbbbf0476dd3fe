"""Every voxel of the image is a valid click: corners, edges and whole-image boxes, on images larger and smaller
than the model's size (issue 19, case 7).

Resampling maps voxel centres onto pixel centres, so when a slice is shrunk to the model's
size the border voxels land up to half a model pixel outside the outermost pixel centres;
these used to be refused deep in the prompt encoder ("Point [-0.1, -0.17] lies outside the
64x64 image", a 500 at the server) though the voxels are inside the image.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model_core.io.phantoms import make_phantom
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"blob": 1, "tube": 2, "block": 3}

#: (I, J, K) of the file, its voxel spacing (negative: the axis is stored flipped, as LPS files are)
IMAGES = {
    "larger_anisotropic": ((96, 80, 12), (-0.8, -1.2, 2.5)),
    "smaller": ((40, 48, 10), (1.0, 1.0, 1.0)),
    "larger_and_smaller_non_square": ((100, 30, 8), (0.7, 2.0, 3.0)),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("border")
    config = ServiceConfig(
        bundle_dir=str(ROOT / "bundle"),
        labels=LABELS,
        checkpoint=str(root / "none.pt"),
        preset="tiny",
        image_size=64,
        window=(0, 1),
    )
    return SegmentationService(config), root


def _image(root: Path, name: str) -> tuple[str, tuple[int, int, int]]:
    (I, J, K), spacing = IMAGES[name]
    image, _ = make_phantom((K, J, I), seed=1)  # (D, H, W)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [20.0, -15.0, 5.0]
    path = root / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)).astype(np.float32), affine), str(path))
    return str(path), (I, J, K)


def _on_the_image_grid(seg, path: str, shape: tuple[int, int, int]) -> None:
    assert tuple(seg.label.shape) == (1, *shape)
    assert np.allclose(np.asarray(seg.label.affine), nib.load(path).affine, atol=1e-4)


def _corners_and_edges(shape: tuple[int, int, int], k: int) -> list[list[int]]:
    I, J, _ = shape
    return [[i, j, k] for i in (0, I // 2, I - 1) for j in (0, J // 2, J - 1) if (i, j) != (I // 2, J // 2)]


@pytest.mark.parametrize("name", list(IMAGES))
def test_border_voxels_map_inside_the_model_grid(service, name):
    service, root = service
    path, shape = _image(root, name)
    image, _slices = service.preprocess(path, service.network)
    I, J, K = shape
    voxels = [[i, j, k] for i in (0, I - 1) for j in (0, J - 1) for k in (0, K - 1)]
    grid = service.to_model_grid(image, voxels)
    H, W, D = image.shape[1:]
    assert (
        np.all(grid >= 0)
        and np.all(grid[:, 0] <= W - 1)
        and np.all(grid[:, 1] <= H - 1)
        and np.all(grid[:, 2] <= D - 1)
    )
    inner = service.to_model_grid(image, [[I // 2, J // 2, K // 2]])[0]  # an inner voxel is not moved by the clamp
    assert 0 < inner[0] < W - 1 and 0 < inner[1] < H - 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IMAGES))
def test_clicks_on_every_corner_and_edge_are_segmented(service, name):
    service, root = service
    path, shape = _image(root, name)
    K = shape[2]
    foreground = _corners_and_edges(shape, K // 2)
    background = [[0, 0, 0], [shape[0] - 1, shape[1] - 1, K - 1]]  # the first and last voxels of the volume
    seg = service.interact(f"corners_{name}", path, "blob", foreground=foreground, background=background)
    _on_the_image_grid(seg, path, shape)
    assert sorted(seg.info["prompted_slices"]) == sorted({0, K // 2, K - 1})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IMAGES))
def test_whole_image_and_border_boxes_are_segmented(service, name):
    service, root = service
    path, shape = _image(root, name)
    I, J, K = shape
    whole = service.interact(f"roi_{name}", path, "blob", roi=[0, I - 1, 0, J - 1, 0, K - 1])
    _on_the_image_grid(whole, path, shape)
    # two border voxels that fall on one model pixel still make a box one pixel wide, inside the grid
    corner = service.interact(f"corner_roi_{name}", path, "blob", roi=[I - 2, I - 1, J - 2, J - 1, K - 1, K - 1])
    _on_the_image_grid(corner, path, shape)
    assert corner.info["prompted_slices"] == [K - 1]
