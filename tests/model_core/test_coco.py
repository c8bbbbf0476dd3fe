"""NIfTI volumes to COCO and back: counts, id mapping, voxel-exact RLE, honest polygons, broken labels found."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from model_core.export.coco import IMAGE_ID_STRIDE, export_coco, verify_coco
from model_core.io.phantoms import PHANTOM_LABELS, make_phantom, write_phantom_dataset

SHAPE = (8, 24, 24)  # (D, H, W) of each phantom: axial slices along D
PHANTOM_WINDOW = (0.0, 1.0)  # phantom intensities are already in [0, 1] (the bundle demo's --intensity#window)


def _coco(path: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def _regions(mask: np.ndarray) -> int:
    return ndimage.label(mask, structure=np.ones((3, 3), bool))[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Two training and one validation phantom as NIfTI, exported once as RLE: ``(datalist, summary, root)``."""
    root = tmp_path_factory.mktemp("coco")
    datalist = write_phantom_dataset(root / "data", train=2, validation=1, test=0, shape=SHAPE, seed=0)
    summary = export_coco(datalist, root / "rle", splits="training,validation", window=PHANTOM_WINDOW)
    return datalist, summary, root


def test_rle_export_reads_in_pycocotools_and_maps_back_to_volume_and_slice(phantoms):
    _datalist, summary, root = phantoms
    coco = _coco(summary["training"]["json"])
    assert sorted((c["id"], c["name"]) for c in coco.dataset["categories"]) == sorted(
        (v, k) for k, v in PHANTOM_LABELS.items()
    )

    expected_images = expected_annotations = 0
    for case in range(2):  # write_phantom_dataset seeds case i with i; label (D, H, W), axial slices along D
        image, label = make_phantom(SHAPE, seed=case)
        volume = case + 1
        for k in range(SHAPE[0]):
            if not label[k].any():
                assert image_id_absent(coco, volume, k)
                continue
            expected_images += 1
            expected_annotations += sum(_regions(label[k] == v) for v in PHANTOM_LABELS.values())
            img = coco.imgs[volume * IMAGE_ID_STRIDE + k]
            assert (img["volume"], img["slice_index"], img["axis"]) == (volume, k, "axial")
            assert img["source_axis"] == 2 and img["source_slice_index"] == k  # identity affine: the file's own axis
            assert img["label_file"].endswith(f"case{case:03d}_label.nii.gz")
            assert img["image_file"].endswith(f"case{case:03d}_image.nii.gz")
            png = np.asarray(Image.open(root / "rle" / img["file_name"]))
            assert png.dtype == np.uint8 and png.shape == (img["height"], img["width"]) == SHAPE[1:]
            assert np.array_equal(png, np.round(image[k] * 255).astype(np.uint8))  # windowed, not a raw cast
            decoded = np.zeros(SHAPE[1:], np.int64)
            for ann in coco.imgToAnns[img["id"]]:
                mask = coco.annToMask(ann).astype(bool)
                assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() and _regions(mask) == 1  # one region each
                decoded[mask] = ann["category_id"]
            assert np.array_equal(decoded, label[k])
    assert len(coco.imgs) == summary["training"]["images"] == expected_images
    assert len(coco.anns) == summary["training"]["annotations"] == expected_annotations
    assert summary["validation"]["volumes"] == 1 and summary["validation"]["images"] > 0


def image_id_absent(coco: COCO, volume: int, k: int) -> bool:
    return volume * IMAGE_ID_STRIDE + k not in coco.imgs


def test_rle_round_trip_is_voxel_exact(phantoms):
    datalist, summary, _ = phantoms
    for split, n_volumes in (("training", 2), ("validation", 1)):
        report = verify_coco(summary[split]["json"], datalist)
        assert report["ok"] and report["mismatched_voxels"] == 0 and report["mismatches"] == []
        assert report["volumes"] == n_volumes and report["slices"] == n_volumes * SHAPE[0]
        assert report["voxels"] == n_volumes * int(np.prod(SHAPE))
        assert report["iou"] == {name: 1.0 for name in PHANTOM_LABELS}


def test_a_corrupted_label_is_found_slice_by_slice(phantoms, tmp_path):
    datalist, _, _root = phantoms
    data = tmp_path / "data"
    shutil.copytree(Path(datalist).parent, data)
    summary = export_coco(data / "datalist.json", tmp_path / "coco", window=PHANTOM_WINDOW)
    assert verify_coco(summary["training"]["json"])["ok"]

    path = data / "case001_label.nii.gz"
    label = np.asarray(nib.load(path).dataobj).copy()  # (H, W, D)
    k = int(np.argmax((label == 1).sum(axis=(0, 1))))  # the slice with the most blob
    blob = np.argwhere(label[:, :, k] == 1)[:5]
    label[blob[:, 0], blob[:, 1], k] = 2  # five blob voxels said to be tube
    empty = int(np.flatnonzero(~label.any(axis=(0, 1)))[0])  # phantom 1 has no foreground in slices 0, 1, 6, 7
    label[0, 0, k] = 7  # a value that is no category
    label[3, 3, empty] = 3  # foreground in a slice the export left out
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)

    report = verify_coco(summary["training"]["json"])
    assert not report["ok"]
    found = {(m["volume"], m["slice_index"], m["category"]): m["voxels"] for m in report["mismatches"]}
    assert found == {(2, k, "blob"): 5, (2, k, "tube"): 5, (2, k, "value 7"): 1, (2, empty, "block"): 1}
    assert report["mismatched_voxels"] == 5 + 1 + 1 and report["mismatch_records"] == 4
    assert all(m["image_id"] == m["volume"] * IMAGE_ID_STRIDE + m["slice_index"] for m in report["mismatches"])


def _ring_dataset(folder: Path, affine: np.ndarray | None = None) -> Path:
    """One (16, 16, 6) volume: a ring of label 1 (a hole of 4 x 4 voxels) on slices 1-3, a dot of 2 on slice 4."""
    folder.mkdir(parents=True, exist_ok=True)
    label = np.zeros((16, 16, 6), np.uint8)
    label[3:11, 3:11, 1:4] = 1
    label[5:9, 5:9, 1:4] = 0  # the hole: 16 voxels per slice
    label[12, 12, 4] = 2  # a single voxel
    image = np.linspace(-300, 400, label.size, dtype=np.float32).reshape(label.shape)  # HU-like
    affine = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(image, affine), folder / "ring_image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "ring_label.nii.gz")
    datalist = {
        "labels": {"ring": 1, "dot": 2},
        "training": [{"image": "ring_image.nii.gz", "label": "ring_label.nii.gz"}],
    }
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder / "datalist.json"


def test_polygons_agree_above_stated_iou_and_verify_reports_the_filled_holes(tmp_path, phantoms):
    datalist, _, _ = phantoms
    summary = export_coco(datalist, tmp_path / "poly", encoding="polygon", window=PHANTOM_WINDOW)
    report = verify_coco(summary["training"]["json"])
    assert min(report["iou"].values()) >= 0.99  # phantom regions have no holes: pixel-precise contours

    ring = _ring_dataset(tmp_path / "ring")
    poly = export_coco(ring, tmp_path / "ring_poly", encoding="polygon")["training"]
    coco = _coco(poly["json"])
    assert all(isinstance(a["segmentation"], list) for a in coco.dataset["annotations"])
    report = verify_coco(poly["json"])
    assert not report["ok"] and report["mismatched_voxels"] == 3 * 16  # the holes, filled: polygons are lossy
    assert {(m["slice_index"], m["category"], m["voxels"]) for m in report["mismatches"]} == {
        (1, "ring", 16),
        (2, "ring", 16),
        (3, "ring", 16),
    }
    assert report["iou"]["ring"] == pytest.approx(48 / 64) and report["iou"]["dot"] == 1.0  # 48 ring voxels a slice
    assert verify_coco(export_coco(ring, tmp_path / "ring_rle")["training"]["json"])["ok"]  # RLE keeps the hole


def test_options_axis_instances_empty_slices_and_a_flipped_affine(tmp_path):
    # the file's third axis runs inferior (flipped z) and its first two are swapped: (A, R, I) voxel axes
    affine = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], float)
    ring = _ring_dataset(tmp_path / "ring", affine)
    summary = export_coco(
        ring, tmp_path / "out", instances="label", include_empty="true", modality="CT", window=(-200, 300)
    )["training"]
    coco = _coco(summary["json"])
    assert summary["images"] == 6 and summary["annotations"] == 3 + 1  # every slice; one annotation per label
    raw = np.asarray(nib.load(tmp_path / "ring" / "ring_label.nii.gz").dataobj)
    for img in coco.dataset["images"]:
        decoded = (
            sum(coco.annToMask(a) * a["category_id"] for a in coco.imgToAnns[img["id"]])
            if coco.imgToAnns[img["id"]]
            else np.zeros((img["height"], img["width"]))
        )
        source = np.take(raw, img["source_slice_index"], axis=img["source_axis"])
        assert img["source_axis"] == 2 and img["source_slice_index"] == 5 - img["slice_index"]
        assert np.array_equal(decoded, source.T)  # RAS swaps the file's first two axes back
    assert verify_coco(summary["json"])["ok"]

    coronal = export_coco(ring, tmp_path / "cor", axis="coronal", window=(-200, 300))["training"]
    images = _coco(coronal["json"]).dataset["images"]
    assert {i["axis"] for i in images} == {"coronal"} and {(i["height"], i["width"]) for i in images} == {(16, 6)}
    assert all(i["source_axis"] == 0 for i in images)  # RAS y (anterior) is the file's first axis
    assert verify_coco(coronal["json"])["ok"]


def _write(folder: Path, label: np.ndarray, datalist: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.float32), np.eye(4)), folder / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), folder / "lab.nii.gz")
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder / "datalist.json"


def test_bad_inputs_are_named(tmp_path):
    good = np.zeros((8, 8, 4), np.uint8)
    good[2:4, 2:4, 1] = 1
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    one = {"labels": {"a": 1}, "training": [entry]}
    ok = _write(tmp_path / "ok", good, {"labels": {"a": 1}, "training": [entry], "test": [{"image": "img.nii.gz"}]})
    cases = [
        (dict(datalist=tmp_path / "none.json"), "datalist=.*does not exist"),
        (dict(datalist=ok, axis="oblique"), "axis='oblique' is unknown: pass one of sagittal, coronal, axial"),
        (dict(datalist=ok, axis=3), "axis=3 is unknown"),
        (dict(datalist=ok, encoding="bitmap"), "encoding='bitmap' is unknown: pass one of rle, polygon"),
        (dict(datalist=ok, instances="blob"), "instances='blob' is unknown"),
        (dict(datalist=ok, include_empty="maybe"), "include_empty='maybe' is not a boolean"),
        (dict(datalist=ok, window=(1,)), "window=.* must be two numbers"),
        (dict(datalist=ok, modality="PET"), "modality must be 'CT' or 'MRI'"),
        (dict(datalist=ok, splits="validation"), "no 'validation' list"),
        (dict(datalist=ok, splits="test"), "Entry 0 of 'test'.*has no \"label\""),
        (dict(datalist=ok, labels='{"a": -1}'), "positive integer"),
        (dict(datalist=_write(tmp_path / "nolab", good, {"training": [entry]})), 'has no "labels" mapping'),
        (
            dict(datalist=_write(tmp_path / "float", good.astype(np.float32) * 0.5, one)),
            "Entry 0 of 'training'.*\"label\" has non-integer values",
        ),
        (dict(datalist=_write(tmp_path / "extra", good * 4, one)), "holds values \\[4\\] that are no category"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            export_coco(output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "annotations").exists()  # nothing half-written
    with pytest.raises(ValueError, match="coco_json=.*does not exist"):
        verify_coco(tmp_path / "missing.json", ok)


def test_label_merge_is_applied_and_verify_needs_the_same_datalist(tmp_path):
    label = np.zeros((8, 8, 4), np.uint8)
    label[1:3, 1:3, 1], label[4:6, 4:6, 1], label[1:3, 5:7, 2] = 1, 2, 3  # KiTS23-like: kidney, tumour, cyst
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    merged = _write(
        tmp_path / "kits", label, {"labels": {"kidney": 1}, "label_merge": {"1": [1, 2]}, "training": [entry]}
    )
    summary = export_coco(merged, tmp_path / "out", instances="label")["training"]
    coco = _coco(summary["json"])
    assert [c["name"] for c in coco.dataset["categories"]] == ["kidney"]
    assert summary["images"] == 1 and summary["annotations"] == 1  # slice 2 holds only the cyst: background
    assert coco.anns[1]["area"] == 8  # kidney and tumour, one class
    assert verify_coco(summary["json"])["ok"]

    other = _write(tmp_path / "other", label, {"labels": {"kidney": 1}, "training": [entry]})
    with pytest.raises(ValueError, match="Entry 0 of 'training'.*pass the datalist it was exported from"):
        verify_coco(summary["json"], other)


def test_unlisted_values_as_background_when_asked(tmp_path):
    label = np.zeros((8, 8, 4), np.uint8)
    label[1:3, 1:3, 1], label[4:6, 4:6, 2] = 1, 5  # 5 is an atlas region the datalist does not name
    entry = {"image": "img.nii.gz", "label": "lab.nii.gz"}
    datalist = _write(tmp_path / "atlas", label, {"labels": {"a": 1}, "training": [entry]})
    with pytest.raises(ValueError, match=r"holds values \[5\].*or pass unlisted='background'"):
        export_coco(datalist, tmp_path / "out")
    summary = export_coco(datalist, tmp_path / "out", unlisted="background")["training"]
    assert summary["images"] == 1 and summary["annotations"] == 1
    assert verify_coco(summary["json"])["ok"]  # the check applies the same rule
    with pytest.raises(ValueError, match="unlisted='zero' is unknown: pass one of error, background"):
        export_coco(datalist, tmp_path / "out", unlisted="zero")
