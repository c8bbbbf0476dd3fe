"""DICOM series input: a folder of CT slices is read by MONAI's LoadImage (ITK/GDCM series reader)
wherever the bundle takes an image path, for inference queries and for datalist images.

The model under test has random weights, so its predictions say nothing about accuracy; what
the tests check is that the DICOM path reaches the model exactly as the same volume saved as
NIfTI does (same voxels in Hounsfield units after the rescale, same grid, same orientation), and
that results are written in the DICOM volume's space.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import make_phantom
from model_core.io.phantoms import write_phantom_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[2]

pydicom = pytest.importorskip("pydicom")
itk = pytest.importorskip("itk")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

SIZE = 64
WINDOW = "[-500,500]"  # the phantoms' intensities [0, 1] become -500..500 HU
SHAPE = (10, 80, 72)  # (slices, rows, columns): anisotropic, non-square
SPACING = (0.7, 0.8, 2.5)  # column spacing (x), row spacing (y), slice spacing (z) in mm
ORIGIN = (-20.0, 30.0, 100.0)  # ImagePositionPatient of the first slice (LPS, mm)


pytestmark = pytest.mark.slow  # monai.bundle runs in subprocesses


def to_hu(image: np.ndarray) -> np.ndarray:
    """Phantom intensities in [0, 1] as integer Hounsfield units in [-500, 500]."""
    return np.round(image * 1000.0 - 500.0).astype(np.int16)


def write_ct_series(folder: Path, hu: np.ndarray, spacing=SPACING, origin=ORIGIN) -> None:
    """Write ``hu`` ``(slices, rows, columns)`` as an axial CT series, one file per slice.

    Stored values are ``HU + 1024`` (unsigned 16 bit) with RescaleIntercept -1024, so a reader
    that skips the rescale gets wrong intensities. Files are named by their SOP Instance UID,
    so only ImagePositionPatient orders them.
    """
    folder.mkdir(parents=True)
    stored = hu.astype(np.int32) + 1024
    assert stored.min() >= 0 and stored.max() < 2**16
    stored = stored.astype(np.uint16)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(hu.shape[0]):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "Phantom^Test", "PHANTOM1"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows along +x, columns along +y (LPS)
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.save_as(str(folder / f"{sop}.dcm"), write_like_original=False)


def series_affine(spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    """The RAS affine of the series for arrays indexed (column, row, slice), as MONAI reads them."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS -> RAS flips x and y
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    return affine


def as_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    """Save a ``(slices, rows, columns)`` array on the series' grid: (column, row, slice) voxels."""
    nib.save(
        nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), series_affine() if affine is None else affine),
        str(path),
    )
    return path


def _bundle(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("MONAI_DICOM_READER", None)  # LoadImage's default reader order: ITK reads folders
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    # NIfTI support set from the phantom dataset, rewritten in HU like the CT queries
    datalist = make_dataset(str(root / "support"), train=1, validation=0, test=0, shape=(12, SIZE, SIZE))
    for item in json.loads(Path(datalist).read_text())["training"]:
        path = Path(datalist).parent / item["image"]
        src = nib.load(str(path))
        nib.save(nib.Nifti1Image(to_hu(np.asarray(src.dataobj)), src.affine), str(path))
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    save_checkpoint(build_icl_sam2("tiny", image_size=SIZE), str(ckpt))

    image, label = make_phantom(SHAPE, seed=77)
    hu = to_hu(image)
    series = root / "ct_series"
    write_ct_series(series, hu)
    return {"root": root, "datalist": datalist, "ckpt": ckpt, "hu": hu, "label": label, "series": series}


def test_series_is_one_gdcm_series_and_monai_reads_it_in_hu(study):
    """The written folder is a valid series for ITK's GDCM reader, and LoadImage gets HU on the right grid."""
    from monai.transforms import LoadImage

    names = itk.GDCMSeriesFileNames.New()
    names.SetDirectory(str(study["series"]))
    uids = list(names.GetSeriesUIDs())
    assert len(uids) == 1 and len(names.GetFileNames(uids[0])) == SHAPE[0]

    volume = LoadImage(image_only=True)(str(study["series"]))
    assert tuple(volume.shape) == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert np.allclose(volume.affine.numpy(), series_affine(), atol=1e-4)
    assert np.array_equal(volume.numpy(), study["hu"].transpose(2, 1, 0).astype(np.float32))  # rescale applied


@pytest.fixture(scope="module")
def inference(study):
    """One inference run over the DICOM folder, its NIfTI twin, a negative control and two UID-named series."""
    root, series, hu = study["root"], study["series"], study["hu"]
    same = as_nifti(hu, root / "ct_volume.nii.gz")
    # negative control: the stored values without the rescale intercept (a reader ignoring it)
    unscaled = as_nifti(hu.astype(np.int32) + 1024, root / "ct_unscaled.nii.gz")
    # PACS/TCIA exports name series folders by SeriesInstanceUID: dots, and a common prefix
    uid_series = []
    for seed in (78, 79):
        folder = root / "exports" / generate_uid()
        write_ct_series(folder, to_hu(make_phantom(SHAPE, seed=seed)[0]))
        uid_series.append(folder)
    out = root / "out"
    queries = [series, same, unscaled, *uid_series]
    result = _bundle(
        "--config_file",
        "['bundle/configs/train.json','bundle/configs/inference.json']",
        "--datalist_file",
        study["datalist"],
        "--preset",
        "tiny",
        "--image_size",
        str(SIZE),
        "--checkpoint",
        str(study["ckpt"]),
        "--query_images",
        json.dumps([str(q) for q in queries]),
        "--output_dir",
        str(out),
        "--intensity#window",
        WINDOW,
        "--classes",
        "[1,3]",
        "--class_names",
        '{"blob": 1, "block": 3}',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "uid_series": uid_series}


def test_inference_on_a_dicom_folder_matches_the_same_volume_as_nifti(study, inference):
    from monai.transforms import LoadImage

    series, out = study["series"], inference["out"]
    seg = nib.load(str(out / "ct_series_seg.nii.gz"))  # named after the folder
    reference = LoadImage(image_only=True)(str(series))
    assert seg.shape == tuple(reference.shape) == (SHAPE[2], SHAPE[1], SHAPE[0])  # the DICOM volume's grid
    assert np.allclose(seg.affine, reference.affine.numpy(), atol=1e-4)  # and its orientation, spacing, origin
    assert np.allclose(seg.affine, series_affine(), atol=1e-4)
    predicted = np.asarray(seg.dataobj)
    assert set(np.unique(predicted).tolist()) <= {0, 1, 3}

    twin = nib.load(str(out / "ct_volume_seg.nii.gz"))
    assert np.allclose(twin.affine, seg.affine, atol=1e-4)
    assert np.array_equal(np.asarray(twin.dataobj), predicted)  # DICOM read exactly like the NIfTI twin
    confidence = json.loads((out / "ct_series_confidence.json").read_text())
    assert confidence["image"] == str(series)
    assert confidence["confidence"] == json.loads((out / "ct_volume_confidence.json").read_text())["confidence"]

    # the comparison can tell intensities apart: without the rescale the model sees another image
    wrong_seg = np.asarray(nib.load(str(out / "ct_unscaled_seg.nii.gz")).dataobj)
    wrong_conf = json.loads((out / "ct_unscaled_confidence.json").read_text())["confidence"]
    assert not np.array_equal(wrong_seg, predicted) or wrong_conf != confidence["confidence"]


def test_uid_named_series_folders_get_their_own_outputs(inference):
    out = inference["out"]
    for folder in inference["uid_series"]:
        seg = out / f"{folder.name}_seg.nii.gz"
        assert seg.exists(), sorted(p.name for p in out.iterdir())
        assert nib.load(str(seg)).shape == (SHAPE[2], SHAPE[1], SHAPE[0])
        report = out / f"{folder.name}_confidence.json"
        assert report.exists(), sorted(p.name for p in out.iterdir())
        assert json.loads(report.read_text())["image"] == str(folder)


def test_evaluation_with_dicom_series_images(study):
    """Datalist images may be DICOM folders (labels NIfTI on the same grid), for support and queries."""
    root = study["root"]
    image, label = make_phantom((12, SIZE, SIZE), seed=5)
    support = root / "support_series"
    write_ct_series(support, to_hu(image), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    support_label = as_nifti(
        label, root / "support_series_label.nii.gz", series_affine((1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    )
    query_label = as_nifti(study["label"], root / "ct_series_label.nii.gz")
    datalist = root / "dicom_datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [{"image": str(support), "label": str(support_label)}],
                "validation": [{"image": str(study["series"]), "label": str(query_label)}],
            }
        )
    )
    out = root / "metrics"
    result = _bundle(
        "--config_file",
        "['bundle/configs/train.json','bundle/configs/evaluate.json']",
        "--datalist_file",
        str(datalist),
        "--preset",
        "tiny",
        "--image_size",
        str(SIZE),
        "--intensity#window",
        WINDOW,
        "--classes",
        "[1,2,3]",
        "--checkpoint",
        str(study["ckpt"]),
        "--ckpt_dir",
        str(root / "models"),
        "--output_dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("val_mean_dice", "val_nsd", "val_hd95"):
        with open(out / f"{name}_raw.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and rows[0]["filename"] == str(study["series"])  # one row, named by the folder
        assert {"class0", "class1", "class2", "mean"} <= set(rows[0])
        assert (out / f"{name}_summary.csv").exists()
    with open(out / "val_mean_dice_raw.csv") as f:
        dice = next(iter(csv.DictReader(f)))
    assert 0.0 <= float(dice["mean"]) <= 1.0
