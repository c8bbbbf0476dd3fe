"""What a path on a command line names (model_core.io.volumes): files, DICOM series folders, folders of them,
and the paths that are refused with a reason."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from model_core.io.dicom import nifti_to_dicom_series
from model_core.io.volumes import find_volumes


def _volume(seed: int = 0) -> nib.Nifti1Image:
    data = np.random.default_rng(seed).integers(0, 100, (8, 8, 4)).astype(np.int16)
    return nib.Nifti1Image(data, np.eye(4))


def test_files_series_folders_and_folders_of_them(tmp_path):
    nib.save(_volume(), str(tmp_path / "a.nii.gz"))
    series_files, _ = nifti_to_dicom_series(_volume(1), tmp_path / "series")
    batch = tmp_path / "batch"
    batch.mkdir()
    nib.save(_volume(2), str(batch / "b.nii"))
    (batch / "notes.txt").write_text("not a volume")  # passed over in a folder of volumes
    nifti_to_dicom_series(_volume(3), batch / "inner_series")
    found = find_volumes([tmp_path / "a.nii.gz", tmp_path / "series", batch])
    assert [(v.name, v.is_dicom, v.error) for v in found] == [
        ("a", False, None),
        ("series", True, None),
        ("b", False, None),
        ("inner_series", True, None),
    ]
    assert sorted(found[1].series_files) == sorted(series_files)
    assert len(find_volumes([tmp_path / "a.nii.gz", tmp_path / "a.nii.gz"])) == 1  # named twice, listed once


def test_refused_paths_say_why(tmp_path):
    two = tmp_path / "two"
    for number in (1, 2):
        nifti_to_dicom_series(_volume(number), tmp_path / f"s{number}", series_number=number)
        two.mkdir(exist_ok=True)
        for f in (tmp_path / f"s{number}").iterdir():
            f.rename(two / f"{number}_{f.name}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    single = next((tmp_path / "s1").parent.glob("two/1_*.dcm"))
    paths = [two, tmp_path / "missing.nii.gz", tmp_path / "empty", tmp_path / "picture.png", single]
    errors = [v.error for v in find_volumes(paths)]
    assert "holds 2 DICOM series" in errors[0] and "#1" in errors[0] and "#2" in errors[0]
    assert "does not exist" in errors[1]
    assert "holds no volume" in errors[2]
    assert "is not a volume file" in errors[3]
    assert "a single DICOM slice: give the folder of its series" in errors[4]
    assert all(str(p) in e for p, e in zip(paths, errors))  # each names its path
