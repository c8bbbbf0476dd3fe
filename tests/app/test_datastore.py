"""The checked datastore in-process: labels are replaced atomically and recorded through MONAI Label's own API."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException

from lib.datastore import CheckedDatastore

SHAPE = (16, 16, 6)


def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return str(path)


def _label(folder, name, value=1, ext=".nii.gz"):
    array = np.zeros(SHAPE, np.uint8)
    array[4:10, 4:10, 1:4] = value
    return _save(os.path.join(folder, f"{name}{ext}"), array)


@pytest.fixture
def store(tmp_path):
    studies, uploads = tmp_path / "studies", tmp_path / "uploads"
    studies.mkdir()
    uploads.mkdir()
    _save(studies / "case0.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32))
    return CheckedDatastore(str(studies), label_values=(1, 2)), str(uploads)


def _stored(datastore, image_id="case0", tag="final"):
    path = datastore.get_label_uri(image_id, tag)
    return path, np.asarray(nib.load(path).dataobj)


def _on_disk(datastore) -> dict:
    """What a restarted server would read: the datastore file (LocalDatastore's ``datastore_v2.json``)."""
    with open(os.path.join(os.path.dirname(datastore.labels_root), "datastore_v2.json")) as f:
        return json.load(f)["objects"]


def test_a_new_label_is_stored_and_recorded(store):
    datastore, uploads = store
    assert datastore.save_label("case0", _label(uploads, "up", 2), "final", {"client": "slicer"}) == "case0"
    path, array = _stored(datastore)
    assert path == os.path.join(datastore.labels_root, "final", "case0.nii.gz") and array.max() == 2
    info = datastore.get_label_info("case0", "final")
    assert info["name"] == "case0.nii.gz" and info["client"] == "slicer" and isinstance(info["ts"], int)
    assert datastore.get_labeled_images() == ["case0"]
    assert _on_disk(datastore)["case0"]["labels"]["final"]["ext"] == ".nii.gz"
    datastore.save_label("case0", _label(uploads, "draft", 1), "proposal", {})  # another tag, beside it
    assert datastore.get_labels_by_image_id("case0") == {"final": "case0", "proposal": "case0"}


def test_a_label_is_replaced_whole_or_not_at_all(store, monkeypatch):
    datastore, uploads = store
    datastore.save_label("case0", _label(uploads, "first", 1), "final", {})
    before = open(datastore.get_label_uri("case0", "final"), "rb").read()

    def half_then_disk_full(src, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(open(src, "rb").read()[:10])
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", half_then_disk_full)
    with pytest.raises(OSError, match="disk full"):
        datastore.save_label("case0", _label(uploads, "second", 2), "final", {})
    monkeypatch.undo()
    assert open(datastore.get_label_uri("case0", "final"), "rb").read() == before
    assert os.listdir(os.path.join(datastore.labels_root, "final")) == ["case0.nii.gz"], "a temporary file was left"

    inode = os.stat(datastore.get_label_uri("case0", "final")).st_ino
    datastore.save_label("case0", _label(uploads, "second", 2), "final", {})
    path, array = _stored(datastore)
    assert array.max() == 2
    assert os.stat(path).st_ino != inode, "the label was rewritten in place, not renamed over"


def test_a_label_in_another_format_replaces_the_old_file(store):
    datastore, uploads = store
    datastore.save_label("case0", _label(uploads, "first", 1), "final", {})
    datastore.save_label("case0", _label(uploads, "second", 2, ext=".nii"), "final", {})
    assert datastore.get_label_uri("case0", "final").endswith("case0.nii")
    assert os.listdir(os.path.join(datastore.labels_root, "final")) == ["case0.nii"]
    assert datastore.get_label_info("case0", "final")["name"] == "case0.nii"
    assert _stored(datastore)[1].max() == 2
    assert _on_disk(datastore)["case0"]["labels"]["final"]["ext"] == ".nii"


@pytest.mark.parametrize("image_id, tag, status, message", [
    ("case0", "../../x", 400, "is not a valid id"),
    ("../case0", "final", 400, "is not a valid id"),
    ("nothing", "final", 404, "not in the datastore"),
])
def test_a_refused_label_changes_nothing(store, image_id, tag, status, message):
    datastore, uploads = store
    with pytest.raises(HTTPException) as e:
        datastore.save_label(image_id, _label(uploads, "up", 1), tag, {})
    assert e.value.status_code == status and message in str(e.value.detail)
    assert sorted(os.listdir(datastore.labels_root)) == ["final", "original"]
    assert os.listdir(os.path.join(datastore.labels_root, "final")) == []


def test_an_image_is_never_silently_replaced(store, tmp_path):
    datastore, uploads = store
    image = datastore.get_image_uri("case0")
    copy = shutil.copy(image, os.path.join(uploads, "same.nii.gz"))
    assert datastore.add_image("case0", copy, {}) == "case0"  # the same bytes: idempotent
    other = _save(os.path.join(uploads, "other.nii.gz"), np.ones(SHAPE, np.float32))
    with pytest.raises(HTTPException) as e:
        datastore.add_image("case0", other, {})
    assert e.value.status_code == 409
    assert datastore.add_image("case1", other, {}) == "case1" and sorted(datastore.list_images()) == ["case0", "case1"]
