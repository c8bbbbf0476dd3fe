"""The datastore: MONAI Label's LocalDatastore with ids checked, uploads checked and labels written atomically.

``LocalDatastore`` joins the ids and tags it is given into paths unchecked (a tag
of ``../../x`` writes outside the studies folder), copies an upload over the
previous label in place and accepts any file, so a corrupt or interrupted upload
destroys the label it replaces and a 4D "label" enters the support set. Here:

- ids and tags follow ``lib.requests.ID_RULE``, file types are volume formats;
- an image must be a volume the model can segment, a label an integer map of the
  configured values on its image's grid (``model_core.io.validation``);
- a new image never replaces another one of the same id (409), unless the bytes are equal;
- a label is written to a temporary file and renamed, so readers see the old label
  or the new one, never half of one.

A rejected upload is a 400 (409 for a conflict) that says what is wrong and leaves
the datastore as it was.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
import time
from typing import Any, Iterable

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.requests import check_id, check_tag, http_error
from model_core.io.files import atomic_path
from model_core.io.validation import InputError, check_image_volume, check_label_volume, label_problem

logger = logging.getLogger(__name__)

#: file types accepted for images and labels
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def _extension(filename: str, what: str) -> str:
    name = os.path.basename(filename).lower()
    for ext in VOLUME_EXTENSIONS:
        if name.endswith(ext):
            return ext
    raise InputError(f"The {what} file {os.path.basename(filename)!r} is not one of the volume formats {list(VOLUME_EXTENSIONS)}.")


class CheckedDatastore(LocalDatastore):
    """``LocalDatastore`` whose ids, tags and uploads are validated and whose labels are replaced atomically.

    Only MONAI Label's public datastore API is used: ``LocalDatastore``'s bookkeeping
    (``refresh``, ``update_label_info``, ``remove_label``) is the parent's own; the one
    thing done here is where the label file goes and how (``model_core.io.files.atomic_path``).

    Args:
        datastore_path, labels_dir, extensions, **kwargs: as for ``LocalDatastore``; the
            volume formats accepted for upload (``VOLUME_EXTENSIONS``) are added to
            ``extensions``, so that every stored label is also found again on disk.
        label_values: the configured label values; a label may hold only these and 0.
    """

    def __init__(self, datastore_path: str, label_values: Iterable[int] = (), labels_dir: str = "labels",
                 extensions: str | Iterable[str] = ("*.nii.gz", "*.nii"), **kwargs: Any):
        self.label_values = tuple(sorted(int(v) for v in label_values))
        #: the folder holding one folder per label tag (``LocalDatastore``'s layout: ``<labels_dir>/<tag>/<id><ext>``)
        self.labels_root = os.path.realpath(os.path.join(datastore_path, labels_dir))
        patterns = [extensions] if isinstance(extensions, str) else list(extensions)
        patterns += [f"*{ext}" for ext in VOLUME_EXTENSIONS if f"*{ext}" not in patterns]
        super().__init__(datastore_path, labels_dir=labels_dir, extensions=patterns, **kwargs)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            check_id(image_id, "image")
            ext = _extension(image_filename, "image")
            shape, _ = check_image_volume(image_filename)
            existing = self.get_image_uri(image_id)  # "" when there is none
            if existing:
                if existing.lower().endswith(ext) and os.path.isfile(existing) and filecmp.cmp(existing, image_filename, shallow=False):
                    return image_id  # the same file again
                raise InputError(f"Image {image_id!r} is already in the datastore with other content; upload it under "
                                 "another id, or delete the existing one first.", status=409)
        except InputError as e:
            logger.info(f"Rejected image upload {image_id!r}: {e}")
            raise http_error(e) from e
        image_id = super().add_image(image_id, image_filename, image_info)
        logger.info(f"Added image {image_id} {shape}")
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the upload, put it in place atomically, then record it with ``LocalDatastore``'s public API.

        ``LocalDatastore.save_label`` copies the upload over the stored label in place, so a
        reader (a support set being built, a download, a training run) can read half of a
        label, and an interrupted copy leaves a half label that the next reconciliation
        takes for a complete one. Here the file is written beside its final name and
        renamed over it; then ``refresh()`` registers a label new to its tag,
        ``update_label_info()`` records ``ts`` and ``name`` (merged into the previous info,
        where ``LocalDatastore`` would start afresh), and a label stored before in another
        format is removed with ``remove_label()`` once the new file is in place.

        Returns:
            the label id (the image id, as ``LocalDatastore`` does).
        """
        try:
            check_id(image_id, "image")
            check_tag(label_tag, "tag")
            image = self.get_image_uri(image_id)
            if not image:
                raise InputError(f"Image {image_id!r} is not in the datastore.", status=404)
            label_ext = _extension(label_filename, "label")
            values = check_label_volume(label_filename, image, self.label_values)
        except InputError as e:
            logger.info(f"Rejected label upload for {image_id!r} ({label_tag!r}): {e}")
            raise http_error(e) from e

        name = f"{image_id}{label_ext}"
        dest = os.path.join(self.labels_root, label_tag, name)
        previous = self.get_label_uri(image_id, label_tag)  # "" when there is none
        with atomic_path(dest) as tmp:  # readers see the old label or the new one, never half of one
            shutil.copyfile(label_filename, tmp)
        if previous and os.path.realpath(previous) != os.path.realpath(dest):
            self.remove_label(image_id, label_tag)  # the same label stored before in another format
        self.refresh()
        self.update_label_info(image_id, label_tag, {**(label_info or {}), "ts": int(time.time()), "name": name})
        logger.info(f"Saved label {label_tag}/{name} for {image_id} (values {list(values)})")
        return image_id

    def final_labels(self) -> list[dict[str, str]]:
        """``[{"id", "image", "label"}]`` of every image with a final label (files not checked here)."""
        out = []
        for image_id in self.get_labeled_images():
            label_id = self.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
            if label_id:
                out.append({"id": image_id, "image": self.get_image_uri(image_id),
                            "label": self.get_label_uri(label_id, DefaultLabelTag.FINAL.value)})
        return out


def labelled_volumes(datastore, label_values: Iterable[int], exclude: str | None = None
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
    except Exception as e:  # noqa: BLE001 - e.g. a SEG that cannot be decoded: the PACS's content, said not hidden
        logger.exception("Support set: the labelled volumes could not be listed")
        raise InputError(f"The labelled volumes could not be read from the datastore: {type(e).__name__}: {e}",
                         status=502) from e
    for entry in entries:
        image_id, image, label = entry["id"], entry["image"], entry["label"]
        if exclude and image and os.path.realpath(image) == os.path.realpath(exclude):
            continue
        problem = entry.get("problem") or (label_problem(label, image, values) if label and image else "its files are missing")
        if problem:
            logger.warning(f"Support set: skipped the final label of {image_id!r}: {problem}")
            skipped.append({"id": image_id, "reason": problem})
            continue
        usable.append({"id": image_id, "image": image, "label": label})
    usable.sort(key=lambda d: os.stat(d["label"]).st_mtime_ns, reverse=True)
    return usable, skipped
