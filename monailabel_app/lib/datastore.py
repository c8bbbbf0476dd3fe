"""The datastore: MONAI Label's LocalDatastore with uploads checked and labels written atomically.

``LocalDatastore.save_label`` copies an upload over the previous label in place
and accepts any file, so a corrupt or interrupted upload destroys the label it
replaces; ``add_image`` accepts files that are no image. Here both are checked
first (readable volume; a label on its image's grid) and a rejected upload is a
400 that leaves the datastore as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from model_core.data import check_case

logger = logging.getLogger(__name__)


def _volume_header(path: str, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an uploaded volume, read in full so truncated data is caught too."""
    from monai.transforms import LoadImage

    try:
        volume = LoadImage(image_only=True, ensure_channel_first=False)(path)
        np.asarray(volume[(0,) * volume.ndim])  # touch the data
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a volume" to the client
        raise HTTPException(status_code=400, detail=f"The uploaded {what} is not a readable image volume "
                                                    f"({type(e).__name__}: {e}).") from e
    return tuple(int(s) for s in volume.shape[:3]), np.asarray(volume.affine, dtype=np.float64)


class CheckedDatastore(LocalDatastore):
    """``LocalDatastore`` whose uploads are validated and whose labels are replaced atomically."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        _volume_header(image_filename, "image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise HTTPException(status_code=404, detail=f"Image {image_id!r} is not in the datastore.")
        shape, affine = _volume_header(label_filename, "label")
        image_path = self.get_image_uri(image_id)
        try:
            check_case({"image": image_path, "label": label_filename}, where=f"Label for image {image_id!r}")
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        dest = os.path.join(label_path, self._filename(image_id, label_ext))
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            tmp = f"{dest}.{os.getpid()}.uploading"
            try:
                shutil.copy(label_filename, tmp)
                os.replace(tmp, dest)  # readers see the old label or the new one, never half of one
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            label_info = dict(label_info or {})
            label_info["ts"] = int(time.time())
            label_info["name"] = os.path.basename(dest)
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        logger.info(f"Saved label {dest} ({shape}) for {image_id}")
        return image_id


def labelled_volumes(datastore) -> list[dict[str, str]]:
    """``[{"image", "label", "id"}]`` of the final labels, most recently labelled first."""
    out = []
    for image_id in datastore.get_labeled_images():
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
        if not label_id:
            continue
        label = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL.value)
        if label and os.path.isfile(label):
            out.append({"id": image_id, "image": datastore.get_image_uri(image_id), "label": label})
    return sorted(out, key=lambda d: os.stat(d["label"]).st_mtime_ns, reverse=True)


def image_path(datastore, image_id: str) -> str:
    """The file of a datastore image, or a 404 naming it."""
    try:
        path = datastore.get_image_uri(image_id)
    except ImageNotFoundException:
        path = ""
    if not path or not os.path.exists(path):
        raise HTTPException(status_code=404, detail=f"Image {image_id!r} is not in the datastore.")
    return path
