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


@pytest.mark.parametrize(
    "image_id, tag, status, message",
    [
        ("case0", "../../x", 400, "is not a valid id"),
        ("../case0", "final", 400, "is not a valid id"),
        ("nothing", "final", 404, "not in the datastore"),
    ],
)
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


def test_an_added_image_is_recorded_with_its_info(store):
    datastore, uploads = store
    image = _save(os.path.join(uploads, "new.nii.gz"), np.ones(SHAPE, np.float32))
    assert datastore.add_image("case1", image, {"source": "scanner"}) == "case1"
    info = datastore.get_image_info("case1")
    assert info["source"] == "scanner" and info["name"] == "case1.nii.gz" and isinstance(info["ts"], int)
    assert open(datastore.get_image_uri("case1"), "rb").read() == open(image, "rb").read()
    assert _on_disk(datastore)["case1"]["image"]["info"]["source"] == "scanner"


# ---------------------------------------------------------------- the info stored with a label or an image
@pytest.mark.parametrize(
    "info, message",
    [
        ([1], "params must be a JSON object"),
        ("x", "params must be a JSON object"),
        ({"a": float("nan")}, "params.a is nan: numbers must be finite"),
        ({"a": {"b": [1, float("inf")]}}, "params.a.b[1] is inf: numbers must be finite"),
        ({"a": object()}, "params.a is a object: only JSON values are stored"),
    ],
)
def test_info_that_cannot_be_stored_is_refused_before_anything_is_written(store, info, message):
    """A list used to reach ``{**label_info}`` after the label was replaced (a 500 with the label changed)."""
    datastore, uploads = store
    datastore.save_label("case0", _label(uploads, "first", 1), "final", {})
    index = os.path.join(os.path.dirname(datastore.labels_root), "datastore_v2.json")
    before = {p: open(p, "rb").read() for p in (datastore.get_label_uri("case0", "final"), index)}
    with pytest.raises(HTTPException) as e:
        datastore.save_label("case0", _label(uploads, "second", 2), "final", info)
    assert e.value.status_code == 422 and message in str(e.value.detail), e.value.detail
    with pytest.raises(HTTPException) as e:
        datastore.add_image("case1", _save(os.path.join(uploads, "im.nii.gz"), np.ones(SHAPE, np.float32)), info)
    assert e.value.status_code == 422 and message in str(e.value.detail), e.value.detail
    with pytest.raises(HTTPException) as e:
        datastore.update_label_info("case0", "final", info)
    assert e.value.status_code == 422 and message.replace("params", "info") in str(e.value.detail)
    assert {p: open(p, "rb").read() for p in before} == before
    assert datastore.list_images() == ["case0"]


# ---------------------------------------------------------------- the index
def _index(datastore) -> str:
    return os.path.join(os.path.dirname(datastore.labels_root), "datastore_v2.json")


def test_an_interrupted_index_write_leaves_the_previous_index_whole(store, monkeypatch):
    """``LocalDatastore`` emptied the index before writing it: a write that stopped midway (here: serialising
    fails, as a kill at that instant would stop it) left an empty index, and the server could not start."""
    datastore, uploads = store
    datastore.save_label("case0", _label(uploads, "first", 1), "final", {"by": "annotator"})
    before = open(_index(datastore), "rb").read()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped while writing the index")

    monkeypatch.setattr(json, "dumps", stopped)
    with pytest.raises(KeyboardInterrupt):
        datastore.update_label_info("case0", "final", {"reviewed": True})
    monkeypatch.undo()
    assert open(_index(datastore), "rb").read() == before
    restarted = CheckedDatastore(os.path.dirname(datastore.labels_root))
    assert restarted.get_label_info("case0", "final")["by"] == "annotator"


def test_the_index_keeps_its_previous_version_beside_it(store):
    datastore, uploads = store
    datastore.save_label("case0", _label(uploads, "first", 1), "final", {"n": 1})
    previous = open(_index(datastore), "rb").read()
    datastore.update_label_info("case0", "final", {"n": 2})
    assert open(_index(datastore) + ".bak", "rb").read() == previous
    assert json.loads(open(_index(datastore)).read())["objects"]["case0"]["labels"]["final"]["info"]["n"] == 2


@pytest.mark.parametrize("content", [b"", b'{"name": "x", "objects": {', b"[1, 2]", b"\x00" * 64])
def test_an_unreadable_index_is_rebuilt_from_its_last_good_copy(store, caplog, content):
    datastore, uploads = store
    datastore.save_label("case0", _label(uploads, "first", 1), "final", {"by": "annotator"})
    datastore.update_image_info("case0", {"last": "change"})  # the change only the broken index holds
    folder, index = os.path.dirname(datastore.labels_root), _index(datastore)
    open(index, "wb").write(content)
    with caplog.at_level("WARNING", logger="lib.datastore"):
        restarted = CheckedDatastore(folder, label_values=(1, 2))
    broken = [n for n in os.listdir(folder) if n.startswith("datastore_v2.json.broken-")]
    assert len(broken) == 1 and open(os.path.join(folder, broken[0]), "rb").read() == content
    assert f"The datastore index {index} could not be read" in caplog.text and broken[0] in caplog.text
    assert f"{index}.bak" in caplog.text
    assert restarted.get_label_info("case0", "final")["by"] == "annotator"
    assert restarted.get_labeled_images() == ["case0"]


def test_an_unreadable_index_without_a_copy_is_rebuilt_from_the_files(tmp_path, caplog):
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    _save(studies / "case0.nii.gz", np.zeros(SHAPE, np.float32))
    _label(str(studies / "labels" / "final"), "case0", 1)
    (studies / "datastore_v2.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="lib.datastore"):
        datastore = CheckedDatastore(str(studies), label_values=(1,))
    assert datastore.get_labeled_images() == ["case0"]
    assert datastore.get_label_info("case0", "final")["name"] == "case0.nii.gz"
    assert "rebuilt from the files on disk" in caplog.text
    assert [n for n in os.listdir(studies) if n.startswith("datastore_v2.json.broken-")]


def test_writes_interrupted_by_a_kill_are_cleared_at_start(store):
    """``atomic_path`` leaves its temporary file when its process is killed; the next start removes it."""
    import subprocess
    import sys

    datastore, _ = store
    folder = os.path.dirname(datastore.labels_root)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = [
        os.path.join(folder, f".datastore_v2.json.{dead.stdout.strip()}.0123456789ab.tmp"),
        os.path.join(datastore.labels_root, "final", f".case0.nii.gz.{dead.stdout.strip()}.0123456789ab.tmp"),
    ]
    live = os.path.join(folder, f".datastore_v2.json.{os.getpid()}.0123456789ab.tmp")  # a writer still running
    for path in stale + [live]:
        open(path, "w").write("half")
    CheckedDatastore(folder)
    assert [os.path.exists(p) for p in stale + [live]] == [False, False, True]


def test_upload_folders_of_a_killed_server_are_cleared_at_start(store, tmp_path, monkeypatch):
    """An upload is received in a private folder removed in a ``finally``, which a SIGKILL skips; the next start
    removes the folders whose server is gone, not those of a server still running."""
    import subprocess
    import sys
    import tempfile

    from lib.datastore import UPLOAD_FOLDER_PREFIX

    datastore, _ = store
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = temporary / f"{UPLOAD_FOLDER_PREFIX}{dead.stdout.strip()}-k1ll3d"
    live = temporary / f"{UPLOAD_FOLDER_PREFIX}{os.getpid()}-runn1ng"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "upload.nii.gz").write_bytes(b"half")
    CheckedDatastore(os.path.dirname(datastore.labels_root))
    assert (stale.exists(), live.exists()) == (False, True)


def test_info_another_process_stores_reaches_the_server(tmp_path):
    """A scoring subprocess stores image info through its own datastore (an atomic rename of the index): the
    server's datastore, watching the folder, reads it (before, it never saw the scores the strategy needs)."""
    import time

    studies = tmp_path / "studies"
    studies.mkdir()
    _save(studies / "case0.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32))
    server = CheckedDatastore(str(studies), label_values=(1,), auto_reload=True)
    try:
        subprocess_side = CheckedDatastore(str(studies), label_values=(1,), auto_reload=False)
        subprocess_side.update_image_info("case0", {"icl_sam2_confidence": {"mean": 0.5}})
        deadline = time.time() + 30
        while time.time() < deadline and "icl_sam2_confidence" not in server.get_image_info("case0"):
            time.sleep(0.1)
        assert server.get_image_info("case0")["icl_sam2_confidence"] == {"mean": 0.5}
        server.update_image_info("case0", {"note": "own write"})  # its own writes change nothing else
        assert server.get_image_info("case0")["icl_sam2_confidence"] == {"mean": 0.5}
    finally:
        server._observer.stop()
