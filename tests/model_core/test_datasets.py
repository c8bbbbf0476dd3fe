"""model_core.io.datasets and model_core.io.datalist (and their command line, icl-sam2 datalist) on tiny generated
datasets in every supported layout.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import model_core.io.datasets as pdl
from model_core.io.datalist import write_datalist
from model_core.io.transforms import merge_labels

ROOT = Path(__file__).resolve().parents[2]


def _nii(path: Path, shape=(8, 8, 4), values=(1,), dtype=np.uint8) -> Path:
    """A tiny NIfTI volume whose nonzero voxels take ``values`` (one value per z slice, cycling)."""
    data = np.zeros(shape, dtype)
    for i, v in enumerate(values):
        data[2:5, 2:5, i % shape[2]] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _resolves(datalist: dict, output: Path) -> None:
    """Every path in every split resolves (relative to the output's folder) to an existing file."""
    for split in ("training", "validation", "test"):
        for entry in datalist[split]:
            for key in ("image", "label"):
                if key in entry:
                    assert not os.path.isabs(entry[key])
                    assert Path(os.path.normpath(output.parent / entry[key])).is_file(), (split, entry)


def _kits23(root: Path, n: int = 5) -> Path:
    for i in range(n):
        _nii(root / f"case_{i:05d}" / "imaging.nii.gz", values=(100,), dtype=np.int16)
        _nii(root / f"case_{i:05d}" / "segmentation.nii.gz", values=(1, 2, 3))
    return root


def _btcv(root: Path, n: int = 5, alt: bool = False, test: int = 0) -> Path:
    img, lab = ("img", "label") if alt else ("imagesTr", "labelsTr")
    for i in range(1, n + 1):
        _nii(root / img / f"img{i:04d}.nii.gz", dtype=np.int16)
        _nii(root / lab / f"label{i:04d}.nii.gz", values=tuple(range(1, 14)), shape=(8, 8, 13))
    for i in range(n + 1, n + 1 + test):
        _nii(root / "imagesTs" / f"img{i:04d}.nii.gz", dtype=np.int16)
    return root


def _msd(root: Path, n: int = 5, test: int = 2, four_d: bool = False) -> Path:
    shape = (8, 8, 4, 2) if four_d else (8, 8, 4)
    training, tests = [], []
    for i in range(n):
        _nii(root / "imagesTr" / f"liver_{i}.nii.gz", shape=shape, dtype=np.float32)
        _nii(root / "labelsTr" / f"liver_{i}.nii.gz", values=(1, 2))
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    for i in range(n, n + test):
        _nii(root / "imagesTs" / f"liver_{i}.nii.gz", shape=shape, dtype=np.float32)
        tests.append(f"./imagesTs/liver_{i}.nii.gz")
    # macOS resource forks, as shipped in some MSD tarballs
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    training.append({"image": "./imagesTr/._liver_0.nii.gz", "label": "./labelsTr/._liver_0.nii.gz"})
    meta = {
        "name": "Liver",
        "description": "tiny",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "modality": {"0": "FLAIR", "1": "T1w"} if four_d else {"0": "CT"},
        "numTraining": n,
        "numTest": test,
        "training": training,
        "test": tests,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ----------------------------------------------------------------------------- presets


def test_kits23_merges_kidney_and_tumour_and_splits_deterministically(tmp_path):
    data = _kits23(tmp_path / "kits23")
    out = tmp_path / "lists" / "kits.json"
    dl = pdl.make_datalist(data, "kits23", output=out, val_fraction=0.2, seed=0)
    assert dl["preset"] == "kits23" and dl["name"] == "kits23"
    assert dl["labels"] == {"kidney": 1} and dl["label_merge"] == {"1": [1, 2]}
    assert (dl["num_training"], dl["num_validation"], dl["num_test"]) == (4, 1, 0)
    assert len(dl["training"]) == 4 and len(dl["validation"]) == 1 and dl["test"] == []
    _resolves(dl, out)
    assert dl["training"][0]["image"].startswith("../kits23/case_")
    # the documented merge: 1 and 2 -> 1, 3 (cyst) -> 0
    seg = np.array([0, 1, 2, 3], np.uint8)
    assert merge_labels(torch.as_tensor(seg), dl["label_merge"]).tolist() == [0, 1, 1, 0]
    # same seed, same split; another seed, another split; absolute paths on request
    assert pdl.make_datalist(data, "kits23", output=out, seed=0) == dl
    others = {pdl.make_datalist(data, "kits23", output=out, seed=s)["validation"][0]["image"] for s in range(6)}
    assert len(others) > 1
    absolute = pdl.make_datalist(data, "kits23", output=out, relative="false")
    assert all(os.path.isabs(e["image"]) and Path(e["label"]).is_file() for e in absolute["training"])


def test_kits23_test_fraction_takes_labelled_cases(tmp_path):
    dl = pdl.make_datalist(
        _kits23(tmp_path / "k", n=10), "kits23", output=tmp_path / "d.json", val_fraction=0.2, test_fraction=0.3, seed=3
    )
    assert (dl["num_training"], dl["num_validation"], dl["num_test"]) == (5, 2, 3)
    images = [e["image"] for s in ("training", "validation", "test") for e in dl[s]]
    assert len(set(images)) == 10 and all("label" in e for e in dl["test"])


@pytest.mark.parametrize("alt", [False, True])
def test_btcv_names_thirteen_organs_in_either_layout(tmp_path, alt):
    data = _btcv(tmp_path / "btcv", alt=alt, test=0 if alt else 2)
    out = tmp_path / "btcv.json"
    dl = pdl.make_datalist(data, "btcv", output=out, val_fraction=0.4)
    assert len(dl["labels"]) == 13 and sorted(dl["labels"].values()) == list(range(1, 14))
    assert dl["labels"]["spleen"] == 1 and dl["labels"]["inferior_vena_cava"] == 9
    assert dl["labels"]["left_adrenal_gland"] == 13
    assert (dl["num_training"], dl["num_validation"]) == (3, 2)
    assert dl["num_test"] == (0 if alt else 2) and all("label" not in e for e in dl["test"])
    _resolves(dl, out)
    for e in dl["training"]:
        assert Path(e["label"]).name == "label" + Path(e["image"]).name[3:]


def test_msd_reads_labels_modality_and_skips_macos_files(tmp_path):
    data = _msd(tmp_path / "Task03_Liver")
    out = tmp_path / "Task03_Liver" / "datalist.json"
    dl = pdl.make_datalist(data, "msd", output=out)
    assert dl["name"] == "Liver" and dl["labels"] == {"liver": 1, "cancer": 2}
    assert dl["modality"] == {"0": "CT"} and "channel" not in dl
    assert (dl["num_training"], dl["num_validation"], dl["num_test"]) == (4, 1, 2)
    assert all("._" not in e["image"] for s in ("training", "validation", "test") for e in dl[s])
    assert dl["training"][0]["image"].startswith("imagesTr/")
    _resolves(dl, out)


def test_msd_4d_images_need_a_channel(tmp_path):
    data = _msd(tmp_path / "Task01_BrainTumour", four_d=True)
    with pytest.raises(ValueError, match=r"4D with 2 channels.*0: FLAIR, 1: T1w.*--channel"):
        pdl.make_datalist(data, "msd", output=tmp_path / "d.json")
    with pytest.raises(ValueError, match=r"--channel 2 is out of range"):
        pdl.make_datalist(data, "msd", output=tmp_path / "d.json", channel=2)
    out = tmp_path / "d.json"
    dl = pdl.make_datalist(data, "msd", output=out, channel=1)
    assert dl["modality"] == {"0": "FLAIR", "1": "T1w"} and dl["channel"] == 1
    assert all(e["channel"] == 1 for s in ("training", "validation", "test") for e in dl[s])
    _resolves(dl, out)
    # MONAI reads it (the int channel passes through untouched)
    from monai.data import load_decathlon_datalist

    write_datalist(dl, out)
    items = load_decathlon_datalist(out, data_list_key="training")
    assert items[0]["channel"] == 1 and Path(items[0]["image"]).is_file()


def test_generic_images_labels_with_suffixes_and_inferred_names(tmp_path):
    data = tmp_path / "mine"
    for i, suffix in enumerate(["", "_seg", "_label", "", ""]):
        _nii(data / "images" / f"case{i}.nii.gz", dtype=np.int16)
        _nii(data / "labels" / f"case{i}{suffix}.nii.gz", values=(2, 5))
    _nii(data / "images" / "case9.nii.gz", dtype=np.int16)  # no label: goes to test
    out = tmp_path / "out" / "mine.json"
    dl = pdl.make_datalist(data, "generic", output=out, val_fraction=0.2)
    assert dl["labels"] == {"label_2": 2, "label_5": 5} and "label_merge" not in dl
    assert (dl["num_training"], dl["num_validation"], dl["num_test"]) == (4, 1, 1)
    assert dl["test"] == [{"image": "../mine/images/case9.nii.gz"}]
    _resolves(dl, out)
    named = pdl.make_datalist(data, "generic", output=out, labels='{"kidney": 2}')
    assert named["labels"] == {"kidney": 2}
    merged = pdl.make_datalist(data, "generic", output=out, labels={"kidney": [2, 5]})
    assert merged["labels"] == {"kidney": 1} and merged["label_merge"] == {"1": [2, 5]}


def test_generic_case_folders(tmp_path):
    data = tmp_path / "cases"
    for i in range(4):
        _nii(data / f"c{i}" / "image.nii.gz", dtype=np.int16)
        _nii(data / f"c{i}" / ("label.nii.gz" if i % 2 else "seg.nii.gz"), values=(1,))
    out = tmp_path / "d.json"
    dl = pdl.make_datalist(data, "generic", output=out, val_fraction=0.25, labels={"organ": 1})
    assert dl["labels"] == {"organ": 1} and (dl["num_training"], dl["num_validation"]) == (3, 1)
    _resolves(dl, out)


def test_json_preset_normalises_seg_to_label_and_keeps_splits(tmp_path):
    data = _kits23(tmp_path / "k", n=4)
    src = {
        "labels": {"0": "background", "1": "kidney"},
        "training": [
            {"image": f"case_{i:05d}/imaging.nii.gz", "seg": f"case_{i:05d}/segmentation.nii.gz", "fold": i}
            for i in range(3)
        ],
        "validation": [{"image": "case_00003/imaging.nii.gz", "seg": "case_00003/segmentation.nii.gz"}],
        "test": ["case_00003/imaging.nii.gz"],
    }
    (data / "medsam2.json").write_text(json.dumps(src))
    out = tmp_path / "norm" / "out.json"
    dl = pdl.make_datalist(None, "json", output=out, datalist=data / "medsam2.json")
    assert (dl["num_training"], dl["num_validation"], dl["num_test"]) == (3, 1, 1)
    assert all("seg" not in e and "label" in e for s in ("training", "validation") for e in dl[s])
    assert [e["fold"] for e in dl["training"]] == [0, 1, 2]
    assert dl["labels"] == {"kidney": 1} and dl["test"] == [{"image": "../k/case_00003/imaging.nii.gz"}]
    _resolves(dl, out)
    # only a training list: split like a folder
    (data / "train_only.json").write_text(json.dumps({"training": src["training"]}))
    dl = pdl.make_datalist(data, "json", output=out, datalist=data / "train_only.json", val_fraction=0.34)
    assert (dl["num_training"], dl["num_validation"]) == (2, 1) and dl["labels"] == {
        "label_1": 1,
        "label_2": 2,
        "label_3": 3,
    }


# ----------------------------------------------------------------------------- errors


def test_boundary_errors(tmp_path):
    kits = _kits23(tmp_path / "kits", n=3)
    out = tmp_path / "d.json"
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*kits23, btcv, msd, generic"):
        pdl.make_datalist(kits, "nope", output=out)
    with pytest.raises(ValueError, match=r"dataset folder .*missing does not exist"):
        pdl.make_datalist(tmp_path / "missing", "kits23", output=out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no cases found in .*empty: searched .*case_\*.*imaging\.nii\.gz"):
        pdl.make_datalist(tmp_path / "empty", "kits23", output=out)
    with pytest.raises(ValueError, match=r"no cases found in .*empty: searched .*imagesTr.*img\*\.nii\.gz"):
        pdl.make_datalist(tmp_path / "empty", "btcv", output=out)
    with pytest.raises(ValueError, match=r"no cases found in .*empty: searched .*images/\*.*image"):
        pdl.make_datalist(tmp_path / "empty", "generic", output=out)
    with pytest.raises(ValueError, match=r"has no dataset\.json"):
        pdl.make_datalist(tmp_path / "empty", "msd", output=out)
    for kwargs, pattern in [
        ({"val_fraction": 1.2}, r"val_fraction=1\.2 is out of range"),
        ({"test_fraction": -0.1}, r"test_fraction=-0\.1 is out of range"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"sum must be below 1"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            pdl.make_datalist(kits, "kits23", output=out, **kwargs)
    with pytest.raises(ValueError, match=r"training split is empty: 3 of 3 cases"):
        pdl.make_datalist(kits, "kits23", output=out, val_fraction=0.5, test_fraction=0.49)
    with pytest.raises(ValueError, match=r"relative='maybe' is not a boolean"):
        pdl.make_datalist(kits, "kits23", output=out, relative="maybe")
    with pytest.raises(ValueError, match=r"--channel 0 was given but the images are 3D"):
        pdl.make_datalist(kits, "kits23", output=out, channel=0)
    with pytest.raises(ValueError, match=r"--labels\['kidney'\] = 0"):
        pdl.make_datalist(kits, "kits23", output=out, labels={"kidney": 0})
    with pytest.raises(ValueError, match=r"not valid JSON"):
        pdl.make_datalist(kits, "kits23", output=out, labels="{kidney: 1")
    with pytest.raises(ValueError, match=r"needs --datalist"):
        pdl.make_datalist(kits, "json", output=out)


def test_image_without_label_is_named(tmp_path):
    kits = _kits23(tmp_path / "kits", n=3)
    (kits / "case_00001" / "segmentation.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case_00001/imaging\.nii\.gz has no label: expected .*segmentation"):
        pdl.make_datalist(kits, "kits23", output=tmp_path / "d.json")
    btcv = _btcv(tmp_path / "btcv", n=3)
    (btcv / "labelsTr" / "label0002.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"img0002\.nii\.gz has no label: expected .*label0002\.nii\.gz"):
        pdl.make_datalist(btcv, "btcv", output=tmp_path / "d.json")
    msd = _msd(tmp_path / "msd", n=3)
    (msd / "labelsTr" / "liver_2.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"liver_2\.nii\.gz has no label"):
        pdl.make_datalist(msd, "msd", output=tmp_path / "d.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": "kits/case_00000/imaging.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"case_00000/imaging\.nii\.gz has no label"):
        pdl.make_datalist(None, "json", output=tmp_path / "d.json", datalist=bad)
    # generic: an unlabelled-only dataset cannot be trained on
    _nii(tmp_path / "g" / "images" / "a.nii.gz")
    with pytest.raises(ValueError, match=r"no case has a label"):
        pdl.make_datalist(tmp_path / "g", "generic", output=tmp_path / "d.json")


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_writes_the_datalist_atomically(tmp_path, icl_sam2_command):
    data = _msd(tmp_path / "Task01_BrainTumour", four_d=True)
    out = tmp_path / "lists" / "brats.json"
    args = [
        *icl_sam2_command,
        "datalist",
        "--dataset_dir",
        str(data),
        "--preset",
        "msd",
        "--val_fraction",
        "0.4",
        "--seed",
        "1",
        "--relative",
        "true",
    ]
    proc = subprocess.run(
        args + ["--output", str(out), "--channel", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    dl = json.loads(out.read_text())
    assert summary["num_training"] == dl["num_training"] == 3 and dl["num_validation"] == 2 and dl["num_test"] == 2
    assert dl["channel"] == 0 and dl["labels"] == {"liver": 1, "cancer": 2}
    _resolves(dl, out)
    assert [p.name for p in out.parent.iterdir()] == ["brats.json"]  # no temporary file left behind
    # 4D without --channel: a clear error, nothing written
    proc = subprocess.run(
        args + ["--output", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "--channel" in proc.stderr and not (tmp_path / "x.json").exists()


# ----------------------------------------------------------------------------- entries, writing, phantom datasets


def test_normalise_entry_is_the_one_seg_to_label_rule():
    assert pdl.normalise_entry("a.nii.gz") == {"image": "a.nii.gz"}
    entry = {"image": "a.nii.gz", "seg": "a_seg.nii.gz", "channel": 0}
    assert pdl.normalise_entry(entry) == {"image": "a.nii.gz", "label": "a_seg.nii.gz", "channel": 0}
    assert "seg" in entry  # the caller's entry is left as it was
    assert pdl.normalise_entry({"image": "a", "label": "l", "seg": "l"}) == {"image": "a", "label": "l"}
    with pytest.raises(ValueError, match='both "label" and "seg" and they differ'):
        pdl.normalise_entry({"image": "a", "label": "l", "seg": "s"}, "training[3]")
    with pytest.raises(ValueError, match='training\\[3\\] has no "image"'):
        pdl.normalise_entry({"label": "l"}, "training[3]")
    with pytest.raises(ValueError, match="expected an image path"):
        pdl.normalise_entry(3)


def test_write_datalist_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "datalist.json"
    assert write_datalist({"training": [{"image": "a"}]}, out) == out.resolve()
    assert json.loads(out.read_text()) == {"training": [{"image": "a"}]}

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pdl.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_datalist({"training": []}, out)
    assert json.loads(out.read_text()) == {"training": [{"image": "a"}]}  # the old file, whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["datalist.json"]  # no temporary file left


def test_phantom_dataset_reads_back_through_the_datalist(tmp_path):
    from model_core.io.phantoms import PHANTOM_LABELS, make_phantom, write_phantom_dataset

    path = Path(write_phantom_dataset(tmp_path / "ph", train=2, validation=1, test=0, shape=(4, 16, 16), seed=3))
    datalist = json.loads(path.read_text())
    assert datalist["labels"] == PHANTOM_LABELS and [len(datalist[s]) for s in ("training", "validation", "test")] == [
        2,
        1,
        0,
    ]
    image, label = make_phantom((4, 16, 16), seed=3 * 1000 + 2)  # the third case
    entry = datalist["validation"][0]
    np.testing.assert_allclose(nib.load(path.parent / entry["image"]).get_fdata(), image.transpose(1, 2, 0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nib.load(path.parent / entry["label"]).dataobj), label.transpose(1, 2, 0))
