"""The datastore: MONAI Label's LocalDatastore with ids checked, uploads checked, files and index written atomically.

``LocalDatastore`` joins the ids and tags it is given into paths unchecked (a tag
of ``../../x`` writes outside the studies folder), copies an upload over the
previous label in place and accepts any file, so a corrupt or interrupted upload
destroys the label it replaces and a 4D "label" enters the support set. Here:

- ids and tags follow ``lib.requests.ID_RULE``, file types are volume formats;
- an image must be a volume the model can segment, a label an integer map of the
  configured values on its image's grid (``model_core.io.validation``);
- a new image never replaces another one of the same id (409), unless the bytes are equal;
- a label or an image is written to a temporary file and renamed, so readers see the
  old file or the new one, never half of one;
- the info stored with a label or an image is a JSON object of finite values
  (:func:`check_info`), checked with the file before anything is written;
- the index (``datastore_v2.json``) is replaced atomically and durably, its previous
  version kept as ``datastore_v2.json.bak``; an index that cannot be read at start-up
  (an older server killed while writing it, a disk fault, a hand edit) is moved aside
  and rebuilt from that copy and the files on disk (:func:`repair_index`), where
  ``LocalDatastore`` refuses to start;
- the index is changed by one thread at a time, so two saves at once cannot drop
  each other's info.

A rejected upload is a 4xx (400 bad file or id, 404 unknown image, 409 conflict, 422 bad
info) that says what is wrong and leaves the datastore as it was.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import json
import logging
import math
import os
import shutil
import threading
import time
from typing import Any, Callable, Iterable

from filelock import FileLock
from monailabel.datastore.local import LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from watchdog.events import FileModifiedEvent

from lib.requests import check_id, check_tag, http_error
from model_core.io.files import atomic_path, fsync_folder, remove_stale_private_folders, remove_stale_temporaries
from model_core.io.validation import InputError, check_image_volume, check_label_volume, label_problem

logger = logging.getLogger(__name__)

#: file types accepted for images and labels
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
#: ending of the last good copy of the index, beside it
BACKUP_SUFFIX = ".bak"
#: ending (before a time stamp) of an index that could not be read, kept beside it
BROKEN_SUFFIX = ".broken-"
#: start of the private temporary folders that hold an upload while it is checked (``lib.datastore_endpoints``)
UPLOAD_FOLDER_PREFIX = "icl-sam2-upload-"


def volume_extension(filename: str, what: str) -> str:
    """The volume format of ``filename`` (one of :data:`VOLUME_EXTENSIONS`), else a 400 naming ``what``."""
    name = os.path.basename(filename).lower()
    for ext in VOLUME_EXTENSIONS:
        if name.endswith(ext):
            return ext
    shown = os.path.basename(filename)
    shown = shown if len(shown) <= 80 else shown[:80] + "..."
    raise InputError(f"The {what} file {shown!r} is not one of the volume formats {list(VOLUME_EXTENSIONS)}.")


def check_info(info: Any, field: str) -> dict[str, Any]:
    """``info`` if it can be stored in the index and listed again: a JSON object whose numbers are finite.

    The index is JSON, and the listings (``GET /datastore/?output=all``, ``/datastore/label/info``)
    are answered with strict JSON: a NaN or infinity stored in an info would make every
    listing of the datastore fail from then on, and a list or a string cannot be merged
    with ``ts`` and ``name``.

    Raises:
        InputError: status 422, naming ``field``.
    """
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise InputError(
            f'{field} must be a JSON object (e.g. {{}} or {{"client": "slicer"}}), got {type(info).__name__}.',
            status=422,
        )

    def bad(value: Any, where: str) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where} is {value}: numbers must be finite"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return f"{where} has the key {key!r}: keys must be strings"
                problem = bad(item, f"{where}.{key}")
                if problem:
                    return problem
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                problem = bad(item, f"{where}[{i}]")
                if problem:
                    return problem
        elif not (value is None or isinstance(value, (str, bool, int, float))):
            return f"{where} is a {type(value).__name__}: only JSON values are stored"
        return None

    problem = bad(info, field)
    if problem:
        raise InputError(f"{problem}.", status=422)
    return info


def _index_problem(path: str) -> str | None:
    """Why the index file ``path`` cannot be loaded by ``LocalDatastore``, or None when it can."""
    try:
        with open(path, "rb") as f:
            text = f.read()
        if not text.strip():
            return f"it is empty ({len(text)} bytes)"
        LocalDatastoreModel.model_validate_json(text)
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return None


def repair_index(index_path: str) -> str | None:
    """Move an index that cannot be read aside and put its last good copy in its place, if that one can be read.

    ``LocalDatastore`` refuses to start on an index it cannot parse ("Failed to load
    datastore ... Application startup failed") until someone deletes the file, which
    loses the info of every label. Here the broken file is kept beside it as
    ``<index>.broken-<time>``; the last good copy (``<index>.bak``: the index before its
    last change) becomes the index, or, when there is none, ``LocalDatastore`` starts
    without an index. Either way ``LocalDatastore``'s reconciliation then adds every image
    and label found on disk and drops entries whose files are gone, so every label is
    listed; the info recorded by the last change only is lost (with no copy, all info).

    Returns:
        the warning logged, or None when the index is readable or absent.
    """
    if not os.path.exists(index_path):
        return None
    problem = _index_problem(index_path)
    if problem is None:
        return None
    broken = f"{index_path}{BROKEN_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
    os.replace(index_path, broken)
    backup = index_path + BACKUP_SUFFIX
    if os.path.exists(backup) and _index_problem(backup) is None:
        with atomic_path(index_path, durable=True) as tmp:
            shutil.copyfile(backup, tmp)
        source = (
            f"its last good copy {backup} (the index before its last change) and the files on disk; "
            "the info recorded by that last change may be missing"
        )
    else:
        fsync_folder(os.path.dirname(os.path.abspath(index_path)))
        source = "the files on disk (no readable copy: the labels' recorded info is lost, ts and name are new)"
    message = (
        f"The datastore index {index_path} could not be read ({problem}). It was kept as {broken}, "
        f"and the index was rebuilt from {source}."
    )
    logger.warning(message)
    return message


def _one_at_a_time(method: Callable) -> Callable:
    """``LocalDatastore``'s ``method`` run under the datastore's lock (see ``CheckedDatastore._lock``)."""

    @functools.wraps(method)
    def locked(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class CheckedDatastore(LocalDatastore):
    """``LocalDatastore`` whose ids, tags and uploads are validated and whose files and index are replaced atomically.

    ``LocalDatastore``'s bookkeeping (``refresh``, ``update_label_info``, ``update_image_info``,
    ``remove_label``) is the parent's own; what is done here is where files go and how
    (``model_core.io.files.atomic_path``), how the index is written (:meth:`_update_datastore_file`,
    the one method of ``LocalDatastore`` that writes it) and what happens to an index that
    cannot be read (:func:`repair_index`, before ``LocalDatastore`` reads it).

    ``LocalDatastore`` changes its in-memory index and writes it without a lock between
    threads, and reloads it from disk whenever the file's time changed: two saves at once
    (or a save and the folder watcher) can drop the info one of them just recorded. Every
    method that changes or walks the index runs under one re-entrant lock (``_lock``),
    taken before ``LocalDatastore``'s own file lock (``.lock``, between processes).

    Args:
        datastore_path, labels_dir, extensions, **kwargs: as for ``LocalDatastore``; the
            volume formats accepted for upload (``VOLUME_EXTENSIONS``) are added to
            ``extensions``, so that every stored label is also found again on disk.
        label_values: the configured label values; a label may hold only these and 0.
    """

    def __init__(
        self,
        datastore_path: str,
        label_values: Iterable[int] = (),
        labels_dir: str = "labels",
        extensions: str | Iterable[str] = ("*.nii.gz", "*.nii"),
        datastore_config: str = "datastore_v2.json",
        **kwargs: Any,
    ):
        self.label_values = tuple(sorted(int(v) for v in label_values))
        #: the folder holding one folder per label tag (``LocalDatastore``'s layout: ``<labels_dir>/<tag>/<id><ext>``)
        self.labels_root = os.path.realpath(os.path.join(datastore_path, labels_dir))
        self._lock = threading.RLock()
        patterns = [extensions] if isinstance(extensions, str) else list(extensions)
        patterns += [f"*{ext}" for ext in VOLUME_EXTENSIONS if f"*{ext}" not in patterns]
        os.makedirs(datastore_path, exist_ok=True)
        with FileLock(os.path.join(datastore_path, ".lock")):  # LocalDatastore's lock file: one repair at a time
            repaired = repair_index(os.path.join(datastore_path, datastore_config))
        self._clear_stale_temporaries(datastore_path)
        super().__init__(
            datastore_path, labels_dir=labels_dir, extensions=patterns, datastore_config=datastore_config, **kwargs
        )
        if repaired and kwargs.get("read_only"):  # LocalDatastore reconciles with the disk only when writable
            self.refresh()
        if getattr(self, "_handler", None) is not None:  # auto_reload: LocalDatastore's folder watcher
            self._handler.on_moved = self._on_index_replaced

    def _on_index_replaced(self, event) -> None:
        """Reload the index when another process replaced it (a scoring or training subprocess saving image info).

        ``LocalDatastore`` reloads its index on a *modified* event; this class (in every process) replaces
        the index by a rename (:meth:`_update_datastore_file`), which the watcher reports as a *move* onto
        it: without this the server never saw the scores its scoring subprocess stored. The reload is
        ``LocalDatastore``'s own (:meth:`_on_modify_event`: skipped for this process's own writes).
        """
        if os.fsdecode(getattr(event, "dest_path", "") or "") == self._datastore_config_path:
            self._on_modify_event(FileModifiedEvent(self._datastore_config_path))

    def _clear_stale_temporaries(self, datastore_path: str) -> None:
        """Remove what writes killed midway left: temporary files beside the index, the images and the labels,
        and the upload folders of servers killed while receiving a file (in the system's temporary folder)."""
        folders = [datastore_path]
        if os.path.isdir(self.labels_root):
            folders += [e.path for e in os.scandir(self.labels_root) if e.is_dir()]
        for folder in folders:
            for name in remove_stale_temporaries(folder):
                logger.info(f"Removed {os.path.join(folder, name)}, left by a write that was interrupted")
        for name in remove_stale_private_folders(UPLOAD_FOLDER_PREFIX):
            logger.info(f"Removed the upload folder {name}, left by a server that was stopped while receiving it")

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write the index atomically and durably, keeping the previous version as ``<index>.bak``.

        ``LocalDatastore`` opens the index with ``"w"`` (which empties it) and then writes
        it: a server killed between the two leaves an empty index, and ``LocalDatastore``
        then refuses to start. Here the index is written beside its name, flushed to disk
        and renamed over it (``atomic_path(durable=True)``), so the file always holds one
        whole version, and a save answered 200 is on disk. The previous version is kept
        as a hard link (no copy) for :func:`repair_index`, only when it is the version
        this process last read or wrote (so a damaged file never replaces a good copy).
        The content is ``LocalDatastore``'s own (``json()``: the model without ``base_path``).
        """
        path = self._datastore_config_path
        with self._lock, FileLock(self._lock_file) if lock else contextlib.nullcontext():
            text = json.dumps(self.json(), indent=2, default=str)
            self._ignore_event_config = True  # LocalDatastore's watcher: our own write is no external change
            if os.path.exists(path) and os.stat(path).st_mtime == self._config_ts:
                with atomic_path(path + BACKUP_SUFFIX) as tmp:
                    try:
                        os.link(path, tmp)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(path, tmp)
            with atomic_path(path, durable=True) as tmp, open(tmp, "w") as f:
                f.write(text)
            self._config_ts = os.stat(path).st_mtime

    # LocalDatastore's methods that change or walk the index, one thread at a time (see the class docstring)
    _init_from_datastore_file = _one_at_a_time(LocalDatastore._init_from_datastore_file)
    refresh = _one_at_a_time(LocalDatastore.refresh)
    remove_image = _one_at_a_time(LocalDatastore.remove_image)
    remove_label = _one_at_a_time(LocalDatastore.remove_label)
    json = _one_at_a_time(LocalDatastore.json)
    status = _one_at_a_time(LocalDatastore.status)
    datalist = _one_at_a_time(LocalDatastore.datalist)
    list_images = _one_at_a_time(LocalDatastore.list_images)
    get_labeled_images = _one_at_a_time(LocalDatastore.get_labeled_images)
    get_unlabeled_images = _one_at_a_time(LocalDatastore.get_unlabeled_images)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """``LocalDatastore.update_image_info`` after checking ``info`` (:func:`check_info`)."""
        try:
            check_info(info, "info")
        except InputError as e:
            raise http_error(e) from e
        with self._lock:
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """``LocalDatastore.update_label_info`` after checking ``info`` (:func:`check_info`)."""
        try:
            check_info(info, "info")
        except InputError as e:
            raise http_error(e) from e
        with self._lock:
            super().update_label_info(label_id, label_tag, info)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Check the upload whole, put it in place atomically, then record it with ``LocalDatastore``'s public API.

        ``LocalDatastore.add_image`` copies the upload into the studies folder in place, so a
        server killed midway leaves half an image that the next start registers as an image.
        Here the file is written beside its final name and renamed; then ``refresh()``
        registers it and ``update_image_info()`` records the info with ``ts`` and ``name``.
        """
        try:
            check_id(image_id, "image")
            ext = volume_extension(image_filename, "image")
            info = check_info(image_info, "params")
            shape, _ = check_image_volume(image_filename)
            with self._lock:
                existing = self.get_image_uri(image_id)  # "" when there is none
                if existing:
                    if (
                        existing.lower().endswith(ext)
                        and os.path.isfile(existing)
                        and filecmp.cmp(existing, image_filename, shallow=False)
                    ):
                        return image_id  # the same file again
                    raise InputError(
                        f"Image {image_id!r} is already in the datastore with other content; upload it "
                        "under another id, or delete the existing one first.",
                        status=409,
                    )
                name = f"{image_id}{ext}"
                with atomic_path(os.path.join(self._datastore.image_path(), name), durable=True) as tmp:
                    shutil.copyfile(image_filename, tmp)
                self.refresh()
                super().update_image_info(image_id, {**info, "ts": int(time.time()), "name": name})
        except InputError as e:
            logger.info(f"Rejected image upload {image_id!r}: {e}")
            raise http_error(e) from e
        logger.info(f"Added image {image_id} {shape}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the upload whole, put it in place atomically, then record it with ``LocalDatastore``'s public API.

        ``LocalDatastore.save_label`` copies the upload over the stored label in place, so a
        reader (a support set being built, a download, a training run) can read half of a
        label, and an interrupted copy leaves a half label that the next reconciliation
        takes for a complete one. Here everything is checked first (ids, tag, the info,
        the file), then the file is written beside its final name and renamed over it; then
        ``refresh()`` registers a label new to its tag, ``update_label_info()`` records ``ts``
        and ``name`` (merged into the previous info, where ``LocalDatastore`` would start
        afresh), and a label stored before in another format is removed with
        ``remove_label()`` once the new file is in place. When this returns, the label and
        its info are on disk (``durable``): a crash afterwards loses neither.

        Returns:
            the label id (the image id, as ``LocalDatastore`` does).
        """
        try:
            check_id(image_id, "image")
            check_tag(label_tag, "tag")
            info = check_info(label_info, "params")
            image = self.get_image_uri(image_id)
            if not image:
                raise InputError(f"Image {image_id!r} is not in the datastore.", status=404)
            label_ext = volume_extension(label_filename, "label")
            values = check_label_volume(label_filename, image, self.label_values)
        except InputError as e:
            logger.info(f"Rejected label upload for {image_id!r} ({label_tag!r}): {e}")
            raise http_error(e) from e

        name = f"{image_id}{label_ext}"
        dest = os.path.join(self.labels_root, label_tag, name)
        with self._lock:
            previous = self.get_label_uri(image_id, label_tag)  # "" when there is none
            with atomic_path(dest, durable=True) as tmp:  # readers see the old label or the new one, never half of one
                shutil.copyfile(label_filename, tmp)
            if previous and os.path.realpath(previous) != os.path.realpath(dest):
                self.remove_label(image_id, label_tag)  # the same label stored before in another format
            self.refresh()
            super().update_label_info(image_id, label_tag, {**info, "ts": int(time.time()), "name": name})
        logger.info(f"Saved label {label_tag}/{name} for {image_id} (values {list(values)})")
        return image_id

    def final_labels(self) -> list[dict[str, str]]:
        """``[{"id", "image", "label"}]`` of every image with a final label (files not checked here)."""
        out = []
        for image_id in self.get_labeled_images():
            label_id = self.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
            if label_id:
                out.append(
                    {
                        "id": image_id,
                        "image": self.get_image_uri(image_id),
                        "label": self.get_label_uri(label_id, DefaultLabelTag.FINAL.value),
                    }
                )
        return out


def labelled_volumes(
    datastore, label_values: Iterable[int], exclude: str | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The final labels usable as a support set, most recently labelled first, and those skipped.

    A stored label that breaks the rules of ``model_core.io.validation`` (placed in the
    folder by hand, or stored before those checks) is skipped with its reason, so one
    bad file never takes in-context segmentation down for everyone.

    Args:
        datastore: the app's datastore (local folder or DICOMweb: both have ``final_labels()``).
        label_values: the configured label values.
        exclude: an image file to leave out (the query itself).

    Returns:
        ``([{"id", "image", "label"}], [{"id", "reason"}])``.
    """
    usable, skipped = [], []
    values = tuple(label_values)
    try:
        entries = datastore.final_labels()
    except Exception as e:
        logger.exception("Support set: the labelled volumes could not be listed")
        raise InputError(
            f"The labelled volumes could not be read from the datastore: {type(e).__name__}: {e}", status=502
        ) from e
    for entry in entries:
        image_id, image, label = entry["id"], entry["image"], entry["label"]
        if exclude and image and os.path.realpath(image) == os.path.realpath(exclude):
            continue
        problem = entry.get("problem") or (
            label_problem(label, image, values) if label and image else "its files are missing"
        )
        if problem:
            logger.warning(f"Support set: skipped the final label of {image_id!r}: {problem}")
            skipped.append({"id": image_id, "reason": problem})
            continue
        usable.append({"id": image_id, "image": image, "label": label})
    usable.sort(key=lambda d: os.stat(d["label"]).st_mtime_ns, reverse=True)
    return usable, skipped
