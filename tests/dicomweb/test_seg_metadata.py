"""The SEG metadata of the project (model_core.io.seg_metadata) in both writers, decoded with pydicom.

pydicom-seg (:func:`model_core.io.dicom.label_to_dicom_seg`) and dcmqi's ``itkimage2segimage`` (what the
app's DICOMweb datastore runs: ``lib.dicomweb.dcmqi_seg``, through MONAI Label's ``itk_image_to_dicom_seg``)
get the same metadata document and must write SEGs that say the same: names, recommended display colours,
series description, algorithm identification and content creator. No PACS here; the app's own path is
checked in test_app_dicomweb.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom_seg.template import rgb_to_cielab

from lib.dicomweb import dcmqi_seg
from model_core.io import dicom, mricron
from model_core.io.seg_metadata import PAIR_DISTANCE, SegIdentity, mirror_key, seg_metainfo, segment_colours

LABELS = {"blob": 1, "tube": 2, "block": 3}
MODEL_INFO = {
    "checkpoint": "/models/model.pt",
    "untrained": False,
    "model_version": "0123456789abcdef",
    "preset": "tiny",
    "image_size": 64,
}


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _names() -> list[str]:
    """AAL's 116 region names where mricron-data is installed (54 left/right pairs), else a list like them."""
    if mricron.available():
        return list(mricron.aal_names())
    return [f"Region{i}_{side}" for i in range(40) for side in "LR"] + ["Vermis_1_2", "left kidney", "right kidney"]


def test_colours_are_distinct_fixed_per_structure_and_apart_for_left_right_pairs():
    names = _names()
    labels = {name: i + 1 for i, name in enumerate(names)}
    colours = segment_colours(labels)
    assert len(set(colours.values())) == len(names)  # every structure its own colour
    keys = {name: mirror_key(name) for name in names}
    lefts = {keys[n][1]: n for n in names if keys[n] and keys[n][0] == "left"}
    pairs = [(lefts[keys[n][1]], n) for n in names if keys[n] and keys[n][0] == "right" and keys[n][1] in lefts]
    assert len(pairs) >= 40
    assert min(_distance(colours[a], colours[b]) for a, b in pairs) >= PAIR_DISTANCE
    # a pair whose ranks would give near colours: the second side takes the complementary hue
    near = segment_colours({"spleen": 1, "kidney_L": 9, "kidney_R": 10, **{f"s{i}": i + 1 for i in range(1, 8)}})
    assert _distance(near["kidney_L"], near["kidney_R"]) >= PAIR_DISTANCE
    # a structure keeps its colour whichever structures a SEG holds (colours follow the configured labels)
    assert seg_metainfo([(1, "tube")], LABELS)["segmentAttributes"][0][0]["recommendedDisplayRGBValue"] == list(
        segment_colours(LABELS)["tube"]
    )
    assert mirror_key("Precentral_L") == ("left", "precentral") and mirror_key("right kidney") == ("right", "kidney")
    assert mirror_key("Vermis_1_2") is None and mirror_key("blob") is None


def test_an_identity_says_who_made_the_segments():
    with pytest.raises(ValueError, match="needs algorithm_name"):
        SegIdentity("AUTOMATIC")
    with pytest.raises(ValueError, match="must be one of"):
        SegIdentity("GUESSED", "x")
    model = SegIdentity.for_model("icl_sam2", MODEL_INFO)
    assert model.algorithm_name == "ICL-SAM2 icl_sam2 model.pt 0123456789ab"
    assert "preset tiny at 64 px" in model.details
    untrained = SegIdentity.for_model("icl_sam2", {**MODEL_INFO, "checkpoint": None, "untrained": True, "seed": 0})
    assert untrained.algorithm_name == "ICL-SAM2 icl_sam2 UNTRAINED seed 0 0123456789ab"
    with pytest.raises(ValueError, match="not configured labels"):
        seg_metainfo([(1, "liver")], LABELS)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A small CT series and a label map on its grid holding blob and block (not tube)."""
    root = tmp_path_factory.mktemp("seg_metadata")
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    image = np.random.default_rng(0).integers(-100, 200, (32, 24, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), str(root / "image.nii.gz"))
    label = np.zeros(image.shape, np.uint8)
    label[4:12, 4:10, 1:3] = 1
    label[18:26, 12:20, 3:5] = 3
    nib.save(nib.Nifti1Image(label, affine), str(root / "label.nii.gz"))
    files, uid = dicom.nifti_to_dicom_series(root / "image.nii.gz", root / "series")
    return {"root": root, "files": files, "uid": uid, "label": root / "label.nii.gz"}


def _check(seg: pydicom.Dataset, identity: SegIdentity, source: str, colour_tolerance: int) -> None:
    colours = segment_colours(LABELS)
    assert seg.SeriesDescription == f"{source}: blob, block"
    assert str(seg.ContentCreatorName) == "ICL-SAM2"
    assert seg.ContentLabel == "SEGMENTATION"
    segments = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert sorted(segments) == ["blob", "block"]
    for name, segment in segments.items():
        assert segment.SegmentAlgorithmType == identity.algorithm_type
        if identity.algorithm_type == "MANUAL":
            assert "SegmentAlgorithmName" not in segment
        else:
            assert segment.SegmentAlgorithmName == identity.algorithm_name
        assert segment.SegmentDescription == f"{name} (label value {LABELS[name]})"
        lab = [int(v) for v in segment.RecommendedDisplayCIELabValue]
        assert np.abs(np.subtract(lab, rgb_to_cielab(list(colours[name])))).max() <= colour_tolerance, (name, lab)
    labs = [tuple(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]
    assert len(set(labs)) == len(labs)  # one colour per segment, not one for all


@pytest.mark.parametrize("kind", ["MANUAL", "AUTOMATIC"])
def test_both_writers_write_the_same_names_colours_and_identity(series, kind, monkeypatch, tmp_path):
    identity = SegIdentity() if kind == "MANUAL" else SegIdentity.for_model("icl_sam2", MODEL_INFO)
    source = "Label" if kind == "MANUAL" else "ICL-SAM2 icl_sam2"
    written = dicom.label_to_dicom_seg(
        series["label"], series["files"], LABELS, tmp_path / "pydicom_seg.dcm", identity=identity
    )
    by_pydicom_seg = pydicom.dcmread(written)
    _check(by_pydicom_seg, identity, source, colour_tolerance=0)
    assert by_pydicom_seg.Manufacturer == "ICL-SAM2"
    if kind != "MANUAL":
        assert by_pydicom_seg.ContentDescription == identity.details

    # the app's path (lib/dicomweb.py): dcmqi with the same document, labelID = the label value
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    metainfo = seg_metainfo([(1, "blob"), (3, "block")], LABELS, identity)
    by_dcmqi = pydicom.dcmread(dcmqi_seg(str(series["label"]), str(Path(series["files"][0]).parent), metainfo))
    _check(by_dcmqi, identity, source, colour_tolerance=8)  # dcmqi rounds its own RGB -> CIELab conversion
    assert by_dcmqi.ContentDescription == by_pydicom_seg.ContentDescription
    # and both decode to the same voxels
    assert np.array_equal(
        np.asarray(dicom.read_seg(written, LABELS).dataobj), np.asarray(nib.load(series["label"]).dataobj)
    )
