"""A DICOM study in a PACS, one command away: phantoms or the Colin27 brain as series with SEG labels, uploaded.

    icl-sam2 orthanc --storage_dir /tmp/pacs --port 8042 &
    icl-sam2 dicom-study --orthanc http://127.0.0.1:8042 --source phantoms
    icl-sam2 dicom-study --orthanc http://127.0.0.1:8042 --source mricron
    icl-sam2 dicom-study --orthanc http://127.0.0.1:8042/dicom-web --source phantoms   # STOW-RS

``--source phantoms`` writes ``cases`` phantom volumes (:mod:`model_core.io.phantoms`) as CT
series of one study (intensities as integer CT values, see :data:`HU_SCALE`; the app's default
window fits), the first ``labelled`` with a DICOM SEG (segments blob, tube, block);
``--source mricron`` the three views of the Colin27 T1 (:mod:`model_core.io.mricron`, Debian
``mricron-data``) as MR series of one study sharing a frame of reference, the first ``labelled``
(in the order support, lower, upper) with a SEG of the chosen AAL regions. The NIfTI files,
DICOM files and a ``study.json`` (what :func:`make_study` returns) stay in ``work_dir``.
The conversion itself is :mod:`model_core.io.dicom`; UIDs are derived from the contents
(same input, same UIDs), so uploading twice stores nothing new.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import requests
from dicomweb_client import DICOMwebClient

from model_core.io.dicom import label_to_dicom_seg, nifti_to_dicom_series, uid_from
from model_core.io.mricron import REGIONS
from model_core.io.mricron import make_study as make_mricron_study
from model_core.io.phantoms import write_phantom_dataset

__all__ = ["HU_OFFSET", "HU_SCALE", "main", "make_study", "upload", "wait_for_pacs"]


#: phantom intensity v in [0, 1] is stored as CT value round(v * HU_SCALE + HU_OFFSET): the app's default CT
#: window [-200, 300] maps it back to v (to 1/500), and viewers show it as they show any CT
HU_SCALE, HU_OFFSET = 500.0, -200.0


def wait_for_pacs(url: str, seconds: float = 60.0) -> None:
    """Wait until the PACS answers HTTP at all (a server started in the background a moment ago).

    Raises:
        ValueError: nothing answered within ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            requests.get(url, timeout=5)
            return
        except requests.RequestException as error:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"Nothing answers at {url} ({error}); is the PACS running (icl-sam2 orthanc --storage_dir ...)?"
                ) from error
            time.sleep(0.5)


def upload(orthanc_url: str, files: Sequence[str | os.PathLike], timeout: float = 60.0) -> list[dict]:
    """Store DICOM files in a PACS.

    Args:
        orthanc_url: Orthanc's REST root (``http://127.0.0.1:8042``: ``POST /instances`` per file), or
            a DICOMweb root ending in ``/dicom-web`` (STOW-RS, any PACS).
        files: the DICOM files.
        timeout: seconds per request.

    Returns:
        Per file ``{"file", "SOPInstanceUID", "status"}`` (Orthanc: ``Success`` or ``AlreadyStored``;
        STOW-RS: ``Stored``).

    Raises:
        ValueError: a file is missing, or the PACS refused a file or did not answer (the URL and its reply).
    """
    url = str(orthanc_url).rstrip("/")
    files = [str(f) for f in files]
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"{f} is not a file.")
    wait_for_pacs(url)
    results = []
    if url.endswith("/dicom-web"):
        client = DICOMwebClient(url=url)
        for start in range(0, len(files), 64):  # one multipart request per 64 files
            batch = [pydicom.dcmread(f) for f in files[start : start + 64]]
            try:
                reply = client.store_instances(batch)
            except (requests.RequestException, OSError) as error:
                raise ValueError(
                    f"STOW-RS to {url} failed ({error}); is the DICOMweb root right and the PACS running?"
                ) from error
            failed = {str(item.ReferencedSOPInstanceUID) for item in reply.get("FailedSOPSequence", [])}
            for f, ds in zip(files[start : start + 64], batch):
                if str(ds.SOPInstanceUID) in failed:
                    raise ValueError(f"STOW-RS to {url} refused {f}: {reply.FailedSOPSequence}")
                results.append({"file": f, "SOPInstanceUID": str(ds.SOPInstanceUID), "status": "Stored"})
        return results
    with requests.Session() as session:
        for f in files:
            with open(f, "rb") as fh:
                body = fh.read()
            try:
                reply = session.post(
                    f"{url}/instances", data=body, headers={"Content-Type": "application/dicom"}, timeout=timeout
                )
            except requests.RequestException as error:
                raise ValueError(
                    f"Orthanc at {url} did not answer ({error}); is it running (icl-sam2 orthanc --storage_dir ...)?"
                ) from error
            if reply.status_code != 200:
                raise ValueError(f"Orthanc at {url} refused {f}: HTTP {reply.status_code} {reply.text[:500]}")
            answer = reply.json()
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise ValueError(f"Orthanc at {url} did not store {f}: {answer}")
            sop = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            results.append({"file": f, "SOPInstanceUID": str(sop), "status": answer["Status"]})
    return results


def _to_hounsfield(path: Path) -> None:
    """Rewrite a phantom volume (float in [0, 1]) as integer Hounsfield-like values (int16), in place."""
    image = nib.load(str(path))
    hu = np.rint(np.asarray(image.dataobj, dtype=np.float64) * HU_SCALE + HU_OFFSET).astype(np.int16)
    out = nib.Nifti1Image(hu, image.affine)
    out.set_qform(image.affine, code=1)
    out.set_sform(image.affine, code=1)
    nib.save(out, str(path))


def _phantom_cases(nifti_dir: Path, cases: int, labelled: int, shape, seed: int) -> tuple[dict, list[dict]]:
    datalist = json.loads(
        Path(
            write_phantom_dataset(
                str(nifti_dir), train=labelled, validation=0, test=cases - labelled, shape=tuple(shape), seed=seed
            )
        ).read_text()
    )
    entries = [dict(e, labelled=True) for e in datalist["training"]] + [
        dict(e, labelled=False) for e in datalist["test"]
    ]
    out = []
    for e in entries:
        _to_hounsfield(nifti_dir / e["image"])
        label = nifti_dir / e["image"].replace("_image", "_label")
        out.append(
            {
                "name": Path(e["image"]).name.split("_")[0],
                "image": str(nifti_dir / e["image"]),
                "label": str(label) if label.is_file() else None,
                "labelled": e["labelled"],
            }
        )
    return datalist["labels"], out


def _mricron_cases(nifti_dir: Path, labelled: int, regions) -> tuple[dict, list[dict]]:
    datalist = json.loads(Path(make_mricron_study(str(nifti_dir), regions=regions or REGIONS)).read_text())
    out = []
    for i, view in enumerate(("support", "lower", "upper")):
        out.append(
            {
                "name": view,
                "image": str(nifti_dir / f"{view}_t1.nii.gz"),
                "label": str(nifti_dir / f"{view}_aal.nii.gz"),
                "labelled": i < labelled,
            }
        )
    return datalist["labels"], out


def make_study(
    orthanc_url: str | None,
    source: str = "phantoms",
    cases: int = 4,
    labelled: int = 2,
    shape: Sequence[int] = (24, 96, 96),
    seed: int = 0,
    regions: Sequence[str] | None = None,
    work_dir: str | os.PathLike | None = None,
) -> dict:
    """Write a study as NIfTI, DICOM series and SEG, and upload it.

    Args:
        orthanc_url: Orthanc's REST root or a DICOMweb root (see :func:`upload`); ``None`` writes only.
        source: ``phantoms`` (CT, model_core.io.phantoms) or ``mricron`` (MR, the Colin27 T1 views).
        cases: phantom cases (``phantoms`` only).
        labelled: how many cases get a SEG (phantoms: the first; mricron: of support, lower, upper).
        shape: ``(D, H, W)`` of each phantom.
        seed: phantom seed (:func:`model_core.io.phantoms.write_phantom_dataset`).
        regions: AAL regions for ``mricron`` (default: :data:`model_core.io.mricron.REGIONS`).
        work_dir: folder for ``nifti/``, ``dicom/`` and ``study.json`` (a new temporary folder by default).

    Returns:
        ``{"source", "orthanc", "work_dir", "PatientID", "StudyInstanceUID", "Modality", "labels": {name: value},
        "series": [{"name", "image", "label", "SeriesInstanceUID", "files": [...], "SegSeriesInstanceUID",
        "seg_file"}]}``; ``SegSeriesInstanceUID``/``seg_file`` are ``None`` for cases without a SEG,
        ``label`` is the label NIfTI (present also where no SEG was uploaded).

    Raises:
        ValueError: unknown source, bad counts, a non-empty ``work_dir/dicom``, mricron-data missing,
            or the PACS refused an upload.
    """
    source = str(source).lower()
    if source not in ("phantoms", "mricron"):
        raise ValueError(f"source {source!r} must be 'phantoms' or 'mricron'.")
    cases, labelled = int(cases), int(labelled)
    most = cases if source == "phantoms" else 3
    if (source == "phantoms" and cases < 1) or not 0 <= labelled <= most:
        raise ValueError(
            f"Need cases >= 1 and 0 <= labelled <= cases (3 views for mricron); got cases={cases}, labelled={labelled}."
        )
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=f"icl_sam2_dicom_{source}_"))
    nifti_dir, dicom_dir = work / "nifti", work / "dicom"
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        raise ValueError(f"{dicom_dir} is not empty; give a new work_dir.")
    if isinstance(regions, str):
        regions = [regions]
    if source == "phantoms":
        labels, entries = _phantom_cases(nifti_dir, cases, labelled, shape, seed)
        modality, patient_id, patient_name, description, body_part = (
            "CT",
            "PHANTOM",
            "ICL-SAM2^Phantom",
            "ICL-SAM2 phantoms",
            "",
        )
    else:
        labels, entries = _mricron_cases(nifti_dir, labelled, regions)
        modality, patient_id, patient_name, description, body_part = (
            "MR",
            "COLIN27",
            "Colin27^T1",
            "Colin27 T1 + AAL",
            "HEAD",
        )
    study_uid = uid_from("study", source, patient_id, seed, json.dumps(labels, sort_keys=True))
    shared_frame = uid_from("frame-of-reference", "colin27") if source == "mricron" else None
    result = {
        "source": source,
        "orthanc": orthanc_url,
        "work_dir": str(work),
        "PatientID": patient_id,
        "StudyInstanceUID": study_uid,
        "Modality": modality,
        "labels": labels,
        "series": [],
    }
    for number, e in enumerate(entries, start=1):
        files, series_uid = nifti_to_dicom_series(
            e["image"],
            dicom_dir / e["name"],
            modality=modality,
            patient_id=patient_id,
            patient_name=patient_name,
            study_uid=study_uid,
            study_description=description,
            series_number=number,
            series_description=f"{e['name']} {'T1' if modality == 'MR' else 'CT'}",
            frame_of_reference_uid=shared_frame,
            body_part=body_part,
        )
        seg_file = seg_uid = None
        if e["labelled"]:
            seg_file = label_to_dicom_seg(
                e["label"],
                files,
                labels,
                dicom_dir / f"{e['name']}_seg" / "SEG.dcm",
                strict=source == "phantoms",
                series_number=100 + number,
                series_description=f"{e['name']} labels",
            )
            seg_uid = str(pydicom.dcmread(seg_file, stop_before_pixels=True).SeriesInstanceUID)
        if orthanc_url:
            upload(orthanc_url, files + ([seg_file] if seg_file else []))
        result["series"].append(
            {
                "name": e["name"],
                "image": e["image"],
                "label": e["label"],
                "SeriesInstanceUID": series_uid,
                "files": files,
                "SegSeriesInstanceUID": seg_uid,
                "seg_file": seg_file,
            }
        )
    (work / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(
    orthanc: str | None = "http://127.0.0.1:8042",
    source: str = "phantoms",
    cases: int = 4,
    labelled: int = 2,
    shape: Sequence[int] = (24, 96, 96),
    seed: int = 0,
    regions: Sequence[str] | None = None,
    work_dir: str | None = None,
) -> None:
    """Command line: :func:`make_study` with ``--orthanc`` (``--orthanc ''`` writes files only); prints a summary."""
    result = make_study(
        orthanc or None,
        source=source,
        cases=cases,
        labelled=labelled,
        shape=shape,
        seed=seed,
        regions=regions,
        work_dir=work_dir,
    )
    print(
        f"Study {result['StudyInstanceUID']} ({result['Modality']}, patient {result['PatientID']}) "
        f"{'uploaded to ' + orthanc if orthanc else 'written'}; {result['work_dir']}/study.json lists it."
    )
    for s in result["series"]:
        seg = f"SEG {s['SegSeriesInstanceUID']}" if s["SegSeriesInstanceUID"] else "no SEG"
        print(f"  {s['name']}: series {s['SeriesInstanceUID']} ({len(s['files'])} slices), {seg}")
