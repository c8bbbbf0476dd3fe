"""NIfTI volumes as DICOM series and label maps as DICOM SEG, and back: the project's one DICOM conversion.

:func:`nifti_to_dicom_series` writes a volume as a CT or MR series, :func:`label_to_dicom_seg` a
label map as a SEG referencing that series, :func:`read_series` and :func:`read_seg` read them
back (the app's DICOMweb datastore decodes the PACS's SEGs with the same :func:`decode_seg`).
Building a whole study and uploading it to a PACS is the ``icl-sam2 dicom-study`` command
(:mod:`icl_sam2.dicom_study`).

Geometry. DICOM is LPS, NIfTI affines are RAS: a NIfTI voxel ``(i, j, k)`` at RAS point
``A @ (i, j, k, 1)`` is pixel ``(row j, column i)`` of slice ``k``; ``ImageOrientationPatient``
holds the LPS directions of ``i`` and ``j``, ``ImagePositionPatient`` each slice's LPS origin,
``PixelSpacing`` ``(j, i)`` spacings. ITK (and MONAI's ITKReader, SimpleITK, MONAI Label) read the
series back as the same voxels with origin ``LPS(A[:3, 3])`` and direction ``LPS(A[:3, :3]) / spacing``.
A left-handed grid (e.g. LAS) is written with its slices reversed, because readers order slices
along ``row x column``: the same voxels at the same points, the third axis reversed
(:func:`dicom_grid` says what a reader gets). Sheared affines are refused.

Intensities. Integer volumes (int16/uint16 range) are stored exactly (CT: slope 1, intercept 0;
MR: no rescale, which the MR IOD lacks); others as uint16 with ``RescaleSlope``/``RescaleIntercept``
(error at most half a slope; for MR also ``RescaleType`` US, outside the IOD but read by ITK/GDCM).

UIDs are derived from the contents (same input, same UIDs), so uploading twice stores nothing new.

SEG (pydicom-seg). One segment per label value present, numbered 1..M in the order of the
values, ``SegmentLabel`` the name from ``labels``; every slice is encoded (also empty ones), so
the SEG decodes onto the image's grid. It shares the image's study and frame of reference and its
``ReferencedSeriesSequence`` names the image series (how MONAI Label's DICOMWebDatastore links it).
Its names, recommended display colours, series description and identity (``MANUAL`` label, or a
model's result naming the model and its weights; content creator ICL-SAM2) are
:func:`model_core.io.seg_metadata.seg_metainfo`'s, the document the app's datastore hands to dcmqi.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from model_core.io.seg_metadata import CREATOR, SegIdentity, seg_metainfo

__all__ = [
    "SOP_CLASSES",
    "SegIdentity",
    "decode_seg",
    "dicom_grid",
    "label_to_dicom_seg",
    "nifti_to_dicom_series",
    "read_seg",
    "read_series",
    "uid_from",
]

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
# tolerances of the geometry checks: directions (cosines), spacings (relative), positions (mm)
DIRECTION_TOL, SPACING_TOL, POSITION_TOL = 1e-4, 1e-4, 1e-3
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "icl-sam2:dicom")  # namespace of our name-based UIDs


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS)."""
    value = float(value)
    return format_number_as_ds(0.0 if value == 0 else value)


def uid_from(*parts) -> str:
    """A UID ``2.25.<UUID>`` from a name-based (version 5) UUID of ``parts``: the same parts, the same UID."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"


def _digest(data: np.ndarray, affine: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str((data.shape, data.dtype.str)).encode())
    h.update(np.ascontiguousarray(data).tobytes())
    h.update(np.asarray(affine, np.float64).tobytes())
    return h.hexdigest()


def _load(nii: str | os.PathLike | nib.Nifti1Image) -> nib.Nifti1Image:
    if isinstance(nii, (nib.Nifti1Image, nib.Nifti2Image)):
        return nii
    path = Path(nii)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give a NIfTI volume (.nii or .nii.gz).")
    return nib.load(str(path))


def dicom_grid(nii: str | os.PathLike | nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The volume as a DICOM series holds it (and ITK reads it back), in LPS.

    Args:
        nii: a 3D NIfTI volume (path or nibabel image); a 4D one with one volume is accepted.

    Returns:
        ``data`` ``(I, J, K)`` (the NIfTI's array, third axis reversed when the grid is left-handed),
        ``origin`` ``(3,)`` LPS mm of voxel ``(0, 0, 0)``, ``spacing`` ``(3,)`` mm,
        ``direction`` ``(3, 3)`` LPS unit vectors of ``i, j, k`` as columns (right-handed).

    Raises:
        ValueError: not 3D, or the affine is sheared (its axes are not orthogonal).
    """
    img = _load(nii)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"The volume has shape {data.shape}; a DICOM series needs a 3D volume (I, J, K).")
    if min(data.shape) < 1:
        raise ValueError(f"The volume has shape {data.shape}; it is empty.")
    affine = np.asarray(img.affine, np.float64)
    matrix = LPS @ affine[:3, :3]
    origin = LPS @ affine[:3, 3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"The affine has a zero or non-finite axis:\n{affine}")
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=DIRECTION_TOL):
        raise ValueError(
            f"The affine is sheared (its axes are not orthogonal); a DICOM series cannot hold it. "
            f"Resample the volume onto an orthogonal grid first. Affine:\n{affine}"
        )
    if np.linalg.det(direction) < 0:  # readers order slices along row x column: reverse k
        data = data[:, :, ::-1]
        origin = origin + matrix[:, 2] * (data.shape[2] - 1)
        direction = direction.copy()
        direction[:, 2] *= -1
    return data, origin, spacing, direction


def _stored(data: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """Stored pixel values with slope, intercept and PixelRepresentation (0 unsigned, 1 signed)."""
    if not np.all(np.isfinite(data)):
        raise ValueError("The volume holds NaN or infinite values; replace them before writing DICOM.")
    lo, hi = (float(data.min()), float(data.max()))
    integral = np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.rint(data))
    if integral and lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), 1.0, 0.0, 1
    if integral and lo >= 0 and hi <= 65535:
        return data.astype(np.uint16), 1.0, 0.0, 0
    # uint16 with a margin of 500 steps on each side against the rounding of the DS strings
    slope = float(_ds((hi - lo) / 64535 if hi > lo else 1.0))
    intercept = float(_ds(lo - 500 * slope))
    stored = np.rint((data.astype(np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:  # pragma: no cover - guarded by the margin
        raise ValueError(f"Cannot fit the range [{lo}, {hi}] into 16 bits.")
    return stored.astype(np.uint16), slope, intercept, 0


def nifti_to_dicom_series(
    image_nii: str | os.PathLike | nib.Nifti1Image,
    out_dir: str | os.PathLike,
    modality: str = "CT",
    patient_id: str = "ICL-SAM2",
    patient_name: str = "ICL-SAM2^Phantom",
    study_uid: str | None = None,
    study_id: str = "1",
    study_description: str = "ICL-SAM2",
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "",
    frame_of_reference_uid: str | None = None,
    body_part: str = "",
    date: str | None = None,
) -> tuple[list[str], str]:
    """Write a 3D NIfTI volume as a single-frame DICOM series (one file per slice of its third axis).

    Args:
        image_nii: the volume (path or nibabel image), ``(I, J, K)`` with a RAS affine.
        out_dir: folder for ``IM0001.dcm`` ... (created; must hold no files).
        modality: ``CT`` (CT Image Storage) or ``MR`` (MR Image Storage).
        patient_id, patient_name: patient module (``Family^Given``).
        study_uid: StudyInstanceUID; by default derived from ``patient_id`` and ``study_id``
            (series of one patient and study id share a study).
        study_id, study_description: study module.
        series_uid: SeriesInstanceUID; by default derived from the study, the voxels and the affine.
        series_number, series_description: series module.
        frame_of_reference_uid: shared by volumes in the same space; by default one per series.
        body_part: BodyPartExamined (e.g. ``HEAD``), empty by default.
        date: StudyDate/SeriesDate ``YYYYMMDD``; today by default.

    Returns:
        The files written (in slice order) and the SeriesInstanceUID.

    Raises:
        ValueError: unknown modality, not a 3D orthogonal grid, NaN/inf voxels, or a non-empty ``out_dir``.
    """
    modality = str(modality).upper()
    if modality not in SOP_CLASSES:
        raise ValueError(f"Modality {modality!r} is not supported; use one of {sorted(SOP_CLASSES)}.")
    img = _load(image_nii)
    data, origin, spacing, direction = dicom_grid(img)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give an empty or new folder for the series.")
    out.mkdir(parents=True, exist_ok=True)
    stored, slope, intercept, signed = _stored(data)
    real = stored.astype(np.float64) * slope + intercept
    p1, p99 = np.percentile(real, [1, 99])
    date = date or datetime.now().strftime("%Y%m%d")
    study_uid = study_uid or uid_from("study", patient_id, study_id)
    series_uid = series_uid or uid_from("series", study_uid, modality, series_number, _digest(data, img.affine))
    frame_of_reference_uid = frame_of_reference_uid or uid_from("frame-of-reference", series_uid)
    normal = direction[:, 2]
    files = []
    for k in range(data.shape[2]):
        position = origin + direction[:, 2] * spacing[2] * k
        sop_uid = uid_from("instance", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out / f"IM{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[modality], sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.Manufacturer = modality, "ICL-SAM2"
        ds.StudyDescription, ds.SeriesDescription = study_description, series_description
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", ""
        ds.BodyPartExamined = body_part
        if modality == "CT":
            ds.KVP = ""
        else:  # MR Image module, type 1 and 2 attributes (research-mode acquisition, unknown timings)
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "", "", ""
        ds.PatientPosition = "HFS"
        if not body_part:  # type 2C: empty when the body part is unknown, absent for an unpaired one
            ds.Laterality = ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = study_id, int(series_number), 1, k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid, ""
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # (between rows = along j, between columns = along i)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, signed
        if modality == "CT" or (slope, intercept) != (1.0, 0.0):  # type 1 in CT; outside the MR IOD but read by all
            ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
            if modality != "CT":
                ds.RescaleType = "US"
        ds.WindowCenter, ds.WindowWidth = _ds((p1 + p99) / 2), _ds(max(p99 - p1, slope))
        if p99 - p1 < 1:  # a window narrower than one unit is valid only with LINEAR_EXACT
            ds.VOILUTFunction = "LINEAR_EXACT"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<" + stored.dtype.str[1:]).tobytes()
        ds.save_as(str(path), write_like_original=False)
        files.append(str(path))
    return files, series_uid


def _series_geometry(datasets: Sequence[pydicom.Dataset]) -> dict:
    """Geometry of a single-frame series: sorted datasets, origin, spacing, direction (LPS), shape."""
    if not datasets:
        raise ValueError("No image series files given.")
    first = datasets[0]
    uids = {str(d.SeriesInstanceUID) for d in datasets}
    if len(uids) != 1:
        raise ValueError(f"The image files belong to {len(uids)} series ({sorted(uids)}); give the files of one.")
    for d in datasets:
        for key in ("Rows", "Columns", "ImageOrientationPatient", "PixelSpacing"):
            if key not in d:
                raise ValueError(f"Image {d.get('SOPInstanceUID', '?')} has no {key}; it is not a volume slice.")
            if [float(x) for x in np.atleast_1d(d[key].value)] != [float(x) for x in np.atleast_1d(first[key].value)]:
                raise ValueError(f"The image series is not one grid: {key} differs between slices.")
    iop = np.array([float(x) for x in first.ImageOrientationPatient])
    direction = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
    positions = np.array([[float(x) for x in d.ImagePositionPatient] for d in datasets])
    distance = positions @ direction[:, 2]
    order = np.argsort(distance)
    steps = np.diff(distance[order])
    if len(steps) and (steps.min() <= 0 or np.ptp(steps) > POSITION_TOL * 10):
        raise ValueError("The image series' slices are not evenly spaced along their normal.")
    row_spacing, column_spacing = (float(x) for x in first.PixelSpacing)
    slice_spacing = float(steps.mean()) if len(steps) else float(first.get("SliceThickness", 1.0) or 1.0)
    return {
        "datasets": [datasets[i] for i in order],
        "positions": positions[order],
        "origin": positions[order[0]],
        "spacing": np.array([column_spacing, row_spacing, slice_spacing]),
        "direction": direction,
        "shape": (int(first.Columns), int(first.Rows), len(datasets)),
    }


def _check_same_grid(label: tuple, series: dict) -> None:
    """Raise ValueError naming what differs between the label's grid and the image series'."""
    data, origin, spacing, direction = label
    if tuple(data.shape) != series["shape"]:
        raise ValueError(
            f"The label map is {data.shape} voxels but the image series is {series['shape']} "
            "(columns, rows, slices); the label must be on the image's grid (resample it, nearest voxel)."
        )
    if not np.allclose(direction, series["direction"], atol=DIRECTION_TOL):
        raise ValueError(
            f"The label map's axes (LPS)\n{direction.round(5)}\ndiffer from the image series' "
            f"\n{series['direction'].round(5)}; the label must be on the image's grid."
        )
    if not np.allclose(spacing, series["spacing"], rtol=SPACING_TOL, atol=0):
        raise ValueError(
            f"The label map's spacing {spacing.round(5).tolist()} mm differs from the image series' "
            f"{series['spacing'].round(5).tolist()} mm; the label must be on the image's grid."
        )
    expected = origin + np.outer(np.arange(data.shape[2]) * spacing[2], direction[:, 2])
    error = np.abs(expected - series["positions"]).max()
    if error > POSITION_TOL:
        raise ValueError(
            f"The label map's slices lie up to {error:.3g} mm from the image series' slices (first "
            f"at {origin.round(3).tolist()} vs {series['origin'].round(3).tolist()} LPS mm); "
            "the label must be on the image's grid."
        )


def _check_labels(labels: dict) -> dict[str, int]:
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"labels must be a non-empty {{name: value}} dict, got {labels!r}.")
    out = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ValueError(f"Label name {name!r} must be a non-empty string of at most 64 characters.")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < int(value) <= 65535:
            raise ValueError(f"Label {name!r} has value {value!r}; values must be integers in 1..65535.")
        out[name] = int(value)
    if len(set(out.values())) != len(out):
        raise ValueError(f"Two labels share a value in {out}; each name needs its own value.")
    return out


def label_to_dicom_seg(
    label_nii: str | os.PathLike | nib.Nifti1Image,
    series_files: Sequence[str | os.PathLike],
    labels: dict[str, int],
    out_file: str | os.PathLike,
    strict: bool = True,
    series_uid: str | None = None,
    series_number: int = 300,
    series_description: str | None = None,
    identity: SegIdentity | None = None,
) -> str:
    """Encode a label map as a DICOM SEG of the image series it lies on.

    Args:
        label_nii: the label map (path or nibabel image), ``(I, J, K)`` integers, on the image's grid.
        series_files: the image series' DICOM files (as :func:`nifti_to_dicom_series` wrote them).
        labels: ``{segment name: label value}``; each value present in the map becomes a segment,
            numbered 1..M in the order of the values, named by ``SegmentLabel``.
        out_file: the SEG file to write.
        strict: refuse values the map holds that ``labels`` does not name (else they become background).
        series_uid: the SEG's SeriesInstanceUID; by default derived from the image series and the map.
        series_number: the SEG series' number.
        series_description: its description (default: the source and the structures,
            :func:`model_core.io.seg_metadata.series_description`).
        identity: who made the segments (:class:`~model_core.io.seg_metadata.SegIdentity`; default a
            ``MANUAL`` label); names, colours and identity are :func:`~model_core.io.seg_metadata.seg_metainfo`'s,
            as in the SEGs the app stores.

    Returns:
        ``out_file``.

    Raises:
        ValueError: the map is not on the image series' grid (size, axes, spacing or slice positions
            differ; the message says which), holds non-integer or unnamed values (with ``strict``),
            none of the named values, or ``labels`` is malformed.
    """
    import pydicom_seg
    import SimpleITK as sitk

    labels = _check_labels(labels)
    identity = identity or SegIdentity()
    data, origin, spacing, direction = dicom_grid(label_nii)
    if not (np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.rint(data))):
        raise ValueError("The label map holds non-integer values; give integer labels (0 = background).")
    data = np.rint(data).astype(np.int64)
    datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in series_files]
    series = _series_geometry(datasets)
    _check_same_grid((data, origin, spacing, direction), series)

    present = sorted(int(v) for v in np.unique(data) if v != 0)
    by_value = {v: n for n, v in labels.items()}
    named = [v for v in present if v in by_value]
    if not named:
        raise ValueError(
            f"The label map holds none of the values of {labels} (it holds {present[:20]}); there is nothing to encode."
        )
    unnamed = [v for v in present if v not in by_value]
    if unnamed and strict:
        raise ValueError(
            f"The label map holds values {unnamed[:20]} that labels {labels} does not name; "
            "name them, or pass strict=False to encode them as background."
        )
    segments = np.zeros(data.shape, np.uint16)
    for number, value in enumerate(named, start=1):
        segments[data == value] = number

    metainfo = seg_metainfo(
        [(number, by_value[value]) for number, value in enumerate(named, start=1)],
        labels,
        identity,
        series_number=series_number,
        series_description_text=series_description,
    )
    template = pydicom_seg.template.from_dcmqi_metainfo(metainfo)
    # the segmentation image on the series' own geometry (equal to the map's within the checks above)
    image = sitk.GetImageFromArray(np.ascontiguousarray(segments.transpose(2, 1, 0)))
    image.SetOrigin([float(v) for v in series["origin"]])
    image.SetSpacing([float(v) for v in series["spacing"]])
    image.SetDirection([float(v) for v in series["direction"].ravel()])
    writer = pydicom_seg.MultiClassWriter(
        template=template, inplane_cropping=False, skip_empty_slices=False, skip_missing_segment=False
    )
    # pydicom-seg shares data elements with the source datasets and then draws a new frame of reference
    # UID into them: give it copies, and put the image's frame of reference back into the SEG
    seg = writer.write(image, [copy.deepcopy(d) for d in series["datasets"]])
    if seg.NumberOfFrames != len(named) * data.shape[2] or any(
        "DerivationImageSequence" not in f for f in seg.PerFrameFunctionalGroupsSequence
    ):
        raise ValueError(
            "Some SEG frames could not be matched to an image slice; the label map must be on the image's grid."
        )
    first = series["datasets"][0]
    seg.FrameOfReferenceUID = first.FrameOfReferenceUID
    seg.SeriesInstanceUID = series_uid or uid_from(
        "seg",
        first.SeriesInstanceUID,
        _digest(segments, np.eye(4)),
        json.dumps(labels, sort_keys=True),
        identity.algorithm_type,
        identity.algorithm_name,
    )
    seg.SOPInstanceUID = uid_from("seg-instance", seg.SeriesInstanceUID)
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    for key in ("StudyDescription", "BodyPartExamined"):
        if key in first:
            setattr(seg, key, first[key].value)
    seg.Manufacturer, seg.ContentCreatorName = CREATOR, metainfo["ContentCreatorName"]
    for segment in seg.SegmentSequence:  # pydicom-seg always writes one, empty: not allowed for MANUAL segments
        if identity.algorithm_type == "MANUAL" and "SegmentAlgorithmName" in segment:
            del segment.SegmentAlgorithmName
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out), write_like_original=False)
    return str(out)


def _ras_image(array_ijk: np.ndarray, origin, spacing, direction) -> nib.Nifti1Image:
    affine = np.eye(4)
    affine[:3, :3] = LPS @ (np.asarray(direction, np.float64).reshape(3, 3) * np.asarray(spacing, np.float64))
    affine[:3, 3] = LPS @ np.asarray(origin, np.float64)
    return nib.Nifti1Image(array_ijk, affine)


def read_series(folder: str | os.PathLike) -> nib.Nifti1Image:
    """Read a folder holding one DICOM image series with ITK (SimpleITK's GDCM series reader, as MONAI Label's
    ``dicom_to_nifti`` does), as a RAS NIfTI image ``(I, J, K)``.

    The voxels are what ITK returns: rescaled to real values (float when the slope is not 1).

    Raises:
        ValueError: the folder holds no DICOM series, or more than one.
    """
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        raise ValueError(f"{folder} holds {len(series)} DICOM series ({list(series)}); give a folder of one.")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return _ras_image(array, image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def decode_seg(dataset: pydicom.Dataset) -> tuple[Any, dict[int, str]]:
    """Decode a DICOM SEG of non-overlapping segments (pydicom-seg's multi-class reader).

    Returns:
        ``(segments, names)``: a SimpleITK image of segment numbers (0 = none) on the SEG's own
        frames, and ``{segment number: SegmentLabel}``.
    """
    import pydicom_seg

    result = pydicom_seg.MultiClassReader().read(dataset)
    names = {int(s.SegmentNumber): str(getattr(s, "SegmentLabel", "")) for s in dataset.SegmentSequence}
    return result.image, names


def read_seg(seg_file: str | os.PathLike, labels: dict[str, int] | None = None) -> nib.Nifti1Image:
    """Decode a DICOM SEG (non-overlapping segments) into a label map, a RAS NIfTI image ``(I, J, K)`` uint16.

    Args:
        seg_file: the SEG file.
        labels: ``{segment label: value}``; segments are given these values by their ``SegmentLabel``.
            ``None``: the segment numbers (as MONAI Label's own SEG conversion gives them).

    Raises:
        ValueError: a segment's ``SegmentLabel`` is not in ``labels``.
    """
    import SimpleITK as sitk

    image, names = decode_seg(pydicom.dcmread(str(seg_file)))
    numbers = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    out = numbers.astype(np.uint16)
    if labels is not None:
        labels = _check_labels(labels)
        out = np.zeros_like(out)
        for number, name in names.items():
            if name not in labels:
                raise ValueError(f"Segment {number} is named {name!r}, which labels {labels} does not name.")
            out[numbers == number] = labels[name]
    return _ras_image(out, image.GetOrigin(), image.GetSpacing(), image.GetDirection())
