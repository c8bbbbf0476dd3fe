"""Training says what is wrong (issue 19, case 10), in-process: the app's train task on a real datastore folder.

A final label that breaks the datastore's rules is left out and named with the rule; a run
that raises anywhere (here: validation) fails with its innermost cause as the message and
publishes nothing. What ``GET /train/`` shows of a run in the server's subprocess is
checked against the real server in ``test_model_limits.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import model_core.workflows.inferers
from lib.datastore import CheckedDatastore
from lib.trainers.icl_sam2 import ICLSAM2Train, TrainingFailed, root_cause
from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import write_phantom_dataset
from model_core.io.validation import InputError
from model_core.serving.config import ServiceConfig
from model_core.workflows.episodes import EpisodeDataset

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"blob": 1, "tube": 2, "block": 3}
#: each volume's label lacks one class, so no single volume can be validation's whole support set
LACKS = [1, 2, 3, 1, 2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def study(tmp_path):
    datalist = json.loads(
        Path(
            write_phantom_dataset(str(tmp_path / "src"), train=len(LACKS) + 1, validation=0, test=0, shape=(16, 64, 64))
        ).read_text()
    )
    studies = tmp_path / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    for i, case in enumerate(datalist["training"]):
        shutil.copy(tmp_path / "src" / case["image"], studies / f"case{i}.nii.gz")
        label = nib.load(str(tmp_path / "src" / case["label"]))
        array = np.asarray(label.dataobj).astype(np.int16)
        if i < len(LACKS):
            array[array == LACKS[i]] = 0
        else:  # placed by hand: value 7 is not a configured label
            array[array == 2] = 7
        nib.save(nib.Nifti1Image(array, label.affine), str(final / f"case{i}.nii.gz"))
    checkpoint = tmp_path / "published" / "model.pt"
    checkpoint.parent.mkdir()
    save_checkpoint(build_icl_sam2("tiny", image_size=64), str(checkpoint))
    config = ServiceConfig(
        bundle_dir=str(ROOT / "bundle"),
        labels=LABELS,
        checkpoint=str(checkpoint),
        preset="tiny",
        image_size=64,
        device="cpu",
    )
    trainer = ICLSAM2Train(config, str(tmp_path / "published" / "icl_sam2_training"), epochs=1, episodes=2)
    datastore = CheckedDatastore(str(studies), label_values=LABELS.values(), auto_reload=False)
    return {
        "trainer": trainer,
        "datastore": datastore,
        "checkpoint": checkpoint,
        "bad": final / f"case{len(LACKS)}.nii.gz",
    }


REQUEST = {"model": "icl_sam2", "max_epochs": 1, "episodes_per_epoch": 2, "device": "cpu"}


@pytest.mark.slow  # a bundle training run, in-process
def test_a_bad_label_is_left_out_and_named_and_the_support_covers_every_class(study, caplog):
    before = _sha(study["checkpoint"])
    with caplog.at_level(logging.WARNING, logger="lib.trainers.icl_sam2"):
        result = study["trainer"](dict(REQUEST), study["datastore"])
    skipped = result["skipped_labels"]
    assert [s["label"] for s in skipped] == [str(study["bad"].resolve())]
    assert "values [7] that are not configured labels" in skipped[0]["reason"]
    assert any(
        str(study["bad"].resolve()) in r.getMessage() and "not configured labels" in r.getMessage()
        for r in caplog.records
    )
    # every volume lacks a class, yet validation ran: its support set is two volumes that cover all three
    assert result["published"] == str(study["checkpoint"]) and _sha(study["checkpoint"]) != before


@pytest.mark.slow
def test_a_run_whose_validation_raises_fails_with_its_cause_and_publishes_nothing(study, monkeypatch):
    """Fault injection: validation's support set raises as a label without the class would make it raise."""
    before = _sha(study["checkpoint"])

    def absent(*args, **kwargs):
        raise InputError("Class 1 is absent from the support set; label it on at least one support slice.")

    monkeypatch.setattr(model_core.workflows.inferers, "support_slice_choice", absent)
    with pytest.raises(TrainingFailed) as failed:
        study["trainer"](dict(REQUEST), study["datastore"])
    message = str(failed.value)
    assert "Class 1 is absent from the support set" in message and "nothing was published" in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # a short traceback: the cause ends it
    assert _sha(study["checkpoint"]) == before  # the served checkpoint, byte for byte
    # the run got as far as saving its last state on the way out, which is what must not be published
    assert (Path(study["trainer"].work_dir) / "train" / "model_final.pt").is_file()


def test_a_failed_multi_gpu_run_raises(study):
    """MONAI Label's runner ignores torchrun's exit code; here a failed command is a failed run."""
    import os
    import sys

    with pytest.raises(RuntimeError, match="exited with code 3"):
        study["trainer"].run_multi_gpu({}, [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))
    study["trainer"].run_multi_gpu({}, [sys.executable, "-c", "pass"], dict(os.environ))


def test_root_cause_unwraps_the_config_parsers_errors():
    try:
        try:
            raise ValueError("Class 2 appears in fewer than two volumes")
        except ValueError as e:
            raise RuntimeError("Failed to instantiate component 'model_core.workflows.episodes.EpisodeDataset'") from e
    except RuntimeError as wrapped:
        assert str(root_cause(wrapped)) == "Class 2 appears in fewer than two volumes"


def test_episodes_name_the_label_files_of_a_class_in_too_few_volumes(tmp_path):
    datalist = json.loads(
        Path(write_phantom_dataset(str(tmp_path), train=3, validation=0, test=0, shape=(8, 32, 32))).read_text()
    )
    data = []
    for i, case in enumerate(datalist["training"]):
        label = nib.load(str(tmp_path / case["label"]))
        array = np.asarray(label.dataobj).astype(np.int16)
        if i > 0:
            array[array == 2] = 0  # class 2 only in the first volume
        path = tmp_path / f"label{i}.nii.gz"
        nib.save(nib.Nifti1Image(array, label.affine), str(path))
        data.append({"image": str(tmp_path / case["image"]), "label": str(path)})
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    transform = Compose(
        [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), ScaleIntensityd("image")]
    )
    with pytest.raises(ValueError) as error:
        EpisodeDataset(data, transform, [1, 2, 3], num_support=1, num_query=1, image_size=32)
    message = str(error.value)
    assert "Class 2 appears in fewer than two volumes" in message
    assert f"class 2: ['{data[0]['label']}']" in message and data[1]["label"] in message
