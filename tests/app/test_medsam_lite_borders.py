"""medsam_lite: boxes that touch the image's border, on images larger and smaller than LiteMedSAM's 256 px
(issue 19, case 7), in-process with the real pretrained weights.

LiteMedSAM segments on the image's own voxel grid and takes boxes up to the slice's size,
so these were accepted before too: the test keeps it that way.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lib.infers.medsam_lite import LiteMedSAMRunner
from lib.requests import MedSAMLiteParams, parse_params
from lib.settings import medsam_lite_settings

pytestmark = pytest.mark.slow  # LiteMedSAM on CPU

SHAPES = {"larger": (300, 280, 4), "smaller": (40, 48, 4)}


@pytest.fixture(scope="module")
def runner():
    return LiteMedSAMRunner(
        medsam_lite_settings({"labels": '{"object": 1}', "device": "cpu", "precision": "fp32", "modality": "MRI"})
    )


@pytest.mark.parametrize("name", list(SHAPES))
def test_boxes_touching_the_border_are_segmented_on_the_image_grid(runner, tmp_path, name):
    I, J, K = SHAPES[name]
    rng = np.random.default_rng(0)
    volume = (100 + 10 * rng.standard_normal((I, J, K))).astype(np.float32)
    volume[: I // 3, : J // 3] = 300  # a bright block in the corner
    affine = np.diag([-0.8, 1.3, 3.0, 1.0])
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    # one slice each (LiteMedSAM encodes a slice in seconds on a CPU): the whole first slice, and a box in
    # the opposite corner of the last slice
    for raw in (
        {"roi": [0, I - 1, 0, J - 1, 0, 0]},
        {"box": [I - 6, J - 6, I - 1, J - 1], "slice": K - 1, "slice_range": [K - 1, K - 1]},
    ):
        seg = runner.segment(str(path), parse_params(MedSAMLiteParams, raw))
        assert tuple(seg.label.shape) == (1, I, J, K), raw
        assert np.allclose(np.asarray(seg.label.affine), affine), raw
