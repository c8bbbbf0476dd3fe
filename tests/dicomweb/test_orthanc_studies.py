"""Our NIfTI studies as DICOM series + SEG in a real Orthanc, read back over DICOMweb with the right geometry.

Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) runs as a plain process from
scripts/servers.py, in a temporary folder, loopback clients only. The geometry tests
at the end need no Orthanc.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from icl_sam2 import dicom_study
from model_core.io import dicom, mricron

LPS = np.diag([-1.0, -1.0, 1.0])
CT_IMAGE, MR_IMAGE, SEGMENTATION = (
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.66.4",
)
MRI_REGIONS = ["Precentral_L", "Precentral_R"]

# Dataset.from_json of WADO-RS metadata: Orthanc gives the SEG's pixels as a BulkDataURI, which we do not need
pytestmark = pytest.mark.filterwarnings("ignore:No bulk data URI handler")


@pytest.fixture(scope="module")
def client(pacs):
    return DICOMwebClient(url=pacs.dicomweb)


@pytest.fixture(scope="module")
def phantoms(pacs, tmp_path_factory):
    """Three 64 x 64 x 16 CT phantoms, the first two with a SEG, uploaded through Orthanc's REST API."""
    return dicom_study.make_study(
        pacs.url,
        "phantoms",
        cases=3,
        labelled=2,
        shape=(16, 64, 64),
        seed=3,
        work_dir=tmp_path_factory.mktemp("phantoms"),
    )


@pytest.fixture(scope="module")
def mri(pacs, tmp_path_factory):
    """The three Colin27 T1 views (support and lower with a SEG), uploaded through STOW-RS."""
    if not mricron.available():
        pytest.skip("needs Debian's mricron-data (apt-get install mricron-data; .ci/run does)")
    return dicom_study.make_study(
        pacs.dicomweb, "mricron", labelled=2, regions=MRI_REGIONS, work_dir=tmp_path_factory.mktemp("mri")
    )


def _download(client: DICOMwebClient, study: str, series: str, folder: Path) -> list[Dataset]:
    """WADO-RS: every instance of a series, saved in ``folder``."""
    folder.mkdir(parents=True)
    instances = client.retrieve_series(study, series)
    for ds in instances:
        ds.save_as(str(folder / f"{ds.SOPInstanceUID}.dcm"))
    return instances


def _check_series(client, study, entry, folder):
    """The series read back by ITK has the NIfTI's voxels, origin and direction (LPS vs RAS)."""
    instances = _download(client, study, entry["SeriesInstanceUID"], folder)
    assert len(instances) == len(entry["files"])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    nii = nib.load(entry["image"])
    expected = np.asarray(nii.dataobj)
    got = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (K, J, I) -> (I, J, K)
    assert got.shape == expected.shape
    if np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(got, expected)
    else:
        slope = float(instances[0].RescaleSlope)
        assert np.abs(got - expected).max() <= slope / 2 + 1e-6
    # ITK is LPS, the NIfTI affine RAS: origin = LPS @ A[:3, 3], direction = LPS @ A[:3, :3] / spacing
    spacing = np.linalg.norm(nii.affine[:3, :3], axis=0)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), LPS @ nii.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), LPS @ nii.affine[:3, :3] / spacing, atol=1e-6)
    return image


def _check_seg(client, study, entry, labels, image, folder, keep_only_named=False):
    """The SEG references its series, shares its study and frame, and decodes to the label voxel for voxel."""
    import pydicom_seg

    (seg,) = _download(client, study, entry["SegSeriesInstanceUID"], folder)
    assert seg.SOPClassUID == SEGMENTATION and seg.Modality == "SEG"
    # what MONAI Label's DICOMWebDatastore reads: WADO-RS series metadata, ReferencedSeriesSequence[0]
    meta = Dataset.from_json(client.retrieve_series_metadata(study, entry["SegSeriesInstanceUID"])[0])
    assert meta.ReferencedSeriesSequence[0].SeriesInstanceUID == entry["SeriesInstanceUID"]
    assert len(meta.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(entry["files"])
    first = pydicom.dcmread(entry["files"][0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == study and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    result = pydicom_seg.MultiClassReader().read(seg)
    names = {n: str(s.SegmentLabel) for n, s in result.segment_infos.items()}
    assert sorted(names.values()) == sorted(labels)
    numbers = sitk.GetArrayFromImage(result.image).transpose(2, 1, 0)
    decoded = np.zeros(numbers.shape, np.int64)
    for number, name in names.items():
        decoded[numbers == number] = labels[name]
    expected = np.asarray(nib.load(entry["label"]).dataobj).astype(np.int64)
    if keep_only_named:
        expected = np.where(np.isin(expected, list(labels.values())), expected, 0)
    np.testing.assert_array_equal(decoded, expected)
    # on the image's grid
    np.testing.assert_allclose(result.image.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(result.image.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(result.image.GetDirection(), image.GetDirection(), atol=1e-5)


@pytest.mark.slow
def test_qido_lists_the_phantom_study_its_ct_series_and_segs(client, phantoms):
    study = phantoms["StudyInstanceUID"]
    assert study in [Dataset.from_json(s).StudyInstanceUID for s in client.search_for_studies()]
    series = {s.SeriesInstanceUID: s for s in map(Dataset.from_json, client.search_for_series(study))}
    images = {e["SeriesInstanceUID"] for e in phantoms["series"]}
    segs = {e["SegSeriesInstanceUID"] for e in phantoms["series"] if e["SegSeriesInstanceUID"]}
    assert len(segs) == 2 and set(series) == images | segs
    assert {uid for uid, s in series.items() if s.Modality == "CT"} == images
    assert {uid for uid, s in series.items() if s.Modality == "SEG"} == segs
    # the series-level Modality filter MONAI Label's datastore uses
    ct = {Dataset.from_json(s).SeriesInstanceUID for s in client.search_for_series(search_filters={"Modality": "CT"})}
    assert images <= ct and not segs & ct
    instances = client.search_for_instances(study, phantoms["series"][2]["SeriesInstanceUID"])
    assert len(instances) == 16 and {Dataset.from_json(i).SOPClassUID for i in instances} == {CT_IMAGE}


@pytest.mark.slow
def test_phantom_series_and_segs_round_trip_over_dicomweb(client, phantoms, tmp_path):
    study = phantoms["StudyInstanceUID"]
    for i, entry in enumerate(phantoms["series"]):
        image = _check_series(client, study, entry, tmp_path / f"image{i}")
        if entry["SegSeriesInstanceUID"]:
            _check_seg(client, study, entry, phantoms["labels"], image, tmp_path / f"seg{i}")
        else:
            assert i == 2


@pytest.mark.slow
def test_uploading_again_stores_nothing_new(pacs, phantoms):
    entry = phantoms["series"][0]
    replies = dicom_study.upload(pacs.url, entry["files"][:2] + [entry["seg_file"]])
    assert {r["status"] for r in replies} == {"AlreadyStored"}


@pytest.mark.slow
def test_monailabel_dicomweb_datastore_finds_the_segs_as_labels_of_their_series(client, phantoms, tmp_path):
    from monailabel.datastore.dicom import DICOMWebDatastore

    store = DICOMWebDatastore(client, search_filter={"Modality": "CT"}, cache_path=str(tmp_path))
    labelled = {e["SeriesInstanceUID"] for e in phantoms["series"] if e["SegSeriesInstanceUID"]}
    ours = {e["SeriesInstanceUID"] for e in phantoms["series"]}
    assert labelled <= set(store.get_labeled_images())
    assert ours - labelled <= set(store.get_unlabeled_images())
    # its own download and conversion (SimpleITK series reader, pydicom-seg's MultiClassReader: segment numbers,
    # which are the phantoms' label values) give the NIfTI's label on the image's grid
    entries = {e["SeriesInstanceUID"]: e for e in phantoms["series"]}
    pairs = [d for d in store.datalist() if Path(d["image"]).name.split(".nii")[0] in labelled]
    assert len(pairs) == len(labelled)
    for pair in pairs:
        entry = entries[Path(pair["image"]).name.split(".nii")[0]]
        image, label = sitk.ReadImage(pair["image"]), sitk.ReadImage(pair["label"])
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(label).transpose(2, 1, 0), np.asarray(nib.load(entry["label"]).dataobj)
        )
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)


@pytest.mark.slow
def test_mri_series_and_segs_round_trip_over_dicomweb(client, mri, tmp_path):
    study = mri["StudyInstanceUID"]
    series = {s.SeriesInstanceUID: s for s in map(Dataset.from_json, client.search_for_series(study))}
    assert {series[e["SeriesInstanceUID"]].Modality for e in mri["series"]} == {"MR"}
    instances = client.search_for_instances(study, mri["series"][0]["SeriesInstanceUID"])
    assert {Dataset.from_json(i).SOPClassUID for i in instances} == {MR_IMAGE}
    labels = mri["labels"]
    assert set(labels) == set(MRI_REGIONS)
    frames = set()
    for i, entry in enumerate(mri["series"]):  # support (RAS), lower (S, R, A axes, 3 mm), upper (LPS)
        image = _check_series(client, study, entry, tmp_path / f"image{i}")
        frames.add(pydicom.dcmread(entry["files"][0], stop_before_pixels=True).FrameOfReferenceUID)
        if entry["SegSeriesInstanceUID"]:
            _check_seg(client, study, entry, labels, image, tmp_path / f"seg{i}", keep_only_named=True)
    assert len(frames) == 1  # three views of one head: one frame of reference
    assert [e["SegSeriesInstanceUID"] is not None for e in mri["series"]] == [True, True, False]


# --- no Orthanc needed -------------------------------------------------------------------------------------------


def _volume(affine: np.ndarray, shape=(20, 24, 7), seed=0) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    rng = np.random.default_rng(seed)
    image = (rng.random(shape) * 3.7 - 1.2).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[3:9, 4:15, 1:5], label[12:18, 10:20, 2:7] = 1, 4
    return nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine)


def _oblique_left_handed() -> np.ndarray:
    a, b = np.deg2rad(25), np.deg2rad(-15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = rz @ rx @ np.diag([1.0, 1.0, -1.0])  # a reflection: left-handed grid
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation * [0.8, 1.1, 2.5], [12.3, -45.6, 78.9]
    return affine


def test_an_oblique_left_handed_float_volume_and_its_seg_read_back_at_the_same_points(tmp_path):
    image_nii, label_nii = _volume(_oblique_left_handed())
    files, _ = dicom.nifti_to_dicom_series(image_nii, tmp_path / "mr", modality="MR")
    seg_file = dicom.label_to_dicom_seg(label_nii, files, {"left": 1, "right": 4}, tmp_path / "seg.dcm")
    back, seg = dicom.read_series(tmp_path / "mr"), dicom.read_seg(seg_file, {"left": 1, "right": 4})
    # readers order slices along row x column: same points, third axis reversed
    for got in (back, seg):
        assert np.linalg.det(got.affine[:3, :3]) > 0 > np.linalg.det(image_nii.affine[:3, :3])
        flipped = image_nii.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 6], [0, 0, 0, 1]])
        np.testing.assert_allclose(got.affine, flipped, atol=1e-4)
    slope = float(pydicom.dcmread(files[0], stop_before_pixels=True).RescaleSlope)
    assert np.abs(np.asarray(back.dataobj) - image_nii.get_fdata()[:, :, ::-1]).max() <= slope / 2 + 1e-6
    np.testing.assert_array_equal(np.asarray(seg.dataobj), np.asarray(label_nii.dataobj)[:, :, ::-1])


def test_integer_volumes_are_stored_exactly(tmp_path):
    data = np.arange(30 * 20 * 4).reshape(30, 20, 4) * 7 % 2000 - 1000
    nii = nib.Nifti1Image(data.astype(np.int16), np.diag([0.7, 0.7, 3.0, 1.0]))
    files, _ = dicom.nifti_to_dicom_series(nii, tmp_path / "ct", modality="CT")
    first = pydicom.dcmread(files[0])
    assert (first.RescaleSlope, first.RescaleIntercept, first.PixelRepresentation) == (1, 0, 1)
    back = dicom.read_series(tmp_path / "ct")
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, nii.affine, atol=1e-6)


def test_a_seg_off_the_image_grid_or_with_unnamed_values_is_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image_nii, label_nii = _volume(affine, seed=1)
    files, _ = dicom.nifti_to_dicom_series(image_nii, tmp_path / "ct")
    labels = {"left": 1, "right": 4}
    label = np.asarray(label_nii.dataobj)
    shifted = affine.copy()
    shifted[2, 3] += 2.0  # one slice off: frames would not match the image's slices
    cases = [
        (nib.Nifti1Image(label, shifted), labels, "slices lie up to 2 mm"),
        (nib.Nifti1Image(label[:, :, :6], affine), labels, r"label map is \(20, 24, 6\) voxels"),
        (nib.Nifti1Image(label, np.diag([1.0, 1.2, 2.0, 1.0])), labels, "spacing"),
        (nib.Nifti1Image(label, np.diag([-1.0, 1.0, 2.0, 1.0])), labels, "axes"),
        (label_nii, {"left": 1}, r"values \[4\] that labels"),
        (label_nii, {"other": 2}, "none of the values"),
        (label_nii, {"left": 0}, "integers in 1..65535"),
    ]
    for nii, names, message in cases:
        with pytest.raises(ValueError, match=message):
            dicom.label_to_dicom_seg(nii, files, names, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
    # strict=False: the unnamed value becomes background
    seg = dicom.read_seg(dicom.label_to_dicom_seg(label_nii, files, {"left": 1}, tmp_path / "seg.dcm", strict=False))
    np.testing.assert_array_equal(np.asarray(seg.dataobj), np.where(label == 1, 1, 0))


def test_bad_volumes_are_refused(tmp_path):
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        dicom.nifti_to_dicom_series(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), sheared), tmp_path / "a")
    with pytest.raises(ValueError, match="Modality 'US'"):
        dicom.nifti_to_dicom_series(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "b", "US")
    with pytest.raises(ValueError, match="NaN"):
        dicom.nifti_to_dicom_series(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), tmp_path / "c")
    with pytest.raises(ValueError, match="3D volume"):
        dicom.nifti_to_dicom_series(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "d")
