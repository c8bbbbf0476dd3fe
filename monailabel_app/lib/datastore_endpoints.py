"""MONAI Label's datastore upload and download endpoints, replaced where they lose or tear data.

MONAI Label 0.8.5 (``monailabel/endpoints/datastore.py``):

- ``PUT /datastore/label`` and ``PUT /datastore/image`` (and its old alias ``PUT /datastore/``)
  copy the upload to a temporary file named after the client's file name, then parse
  the ``params`` form field with ``json.loads`` and hand whatever it gives to the
  datastore. A field that is not JSON is a 500; one that is JSON but not an object
  (``[1]``) reached the datastore, which had already replaced the stored label when it
  failed (500). The temporary file is removed by a background task that never runs
  when the request fails, and a file name too long for the file system is a 500.
  Here every field is checked first (ids, tag, ``params`` as a JSON object of finite
  values, the file's format), a 4xx names the field, and only then is the upload
  received into a private folder that is always removed; the datastore checks the file
  itself before it writes anything (``lib.datastore.CheckedDatastore``).
- ``GET /datastore/label`` and ``GET /datastore/image`` answer with Starlette's
  ``FileResponse(path)``, which takes the length from ``stat(path)`` and then opens the
  path again: a label saved in between (a rename over the path) gives the length of one
  version and the body of another, and the client's read fails. Here the file is
  opened once and the length taken from that open file (``os.fstat``), so the answer
  is one whole version (the datastore never rewrites a file in place).

The replacements keep MONAI Label's paths, parameter names, roles (``RBAC``) and
answers, so the Slicer and OHIF plugins and ``monailabel.client`` see no difference.
``lib.routes.install`` mounts them in place of MONAI Label's (:data:`ENDPOINTS`), behind the
same checks as every other kept route.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from contextlib import contextmanager
from email.utils import formatdate
from typing import Any, Iterator
from urllib.parse import quote

from fastapi import Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import StreamingResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_mime_type

from lib.datastore import UPLOAD_FOLDER_PREFIX, VOLUME_EXTENSIONS, check_info, volume_extension
from lib.requests import check_id, check_tag, http_error, parse_json_object
from model_core.io.files import private_folder
from model_core.io.validation import InputError

__all__ = ["ENDPOINTS", "parse_info", "serve_one_version"]

logger = logging.getLogger(__name__)

#: bytes read from disk per chunk of a download
CHUNK = 1 << 20


def parse_info(text: str | None, field: str) -> dict[str, Any]:
    """The JSON object in form field ``field`` (empty: ``{}``), as the datastore will store it.

    The request rule (:func:`lib.requests.parse_json_object`: JSON, an object, integers within
    2^53), then the datastore's (:func:`lib.datastore.check_info`: finite numbers, string keys).

    Raises:
        InputError: status 422 naming ``field``.
    """
    if text is None or not text.strip():
        return {}
    return check_info(parse_json_object(text, field), field)


@contextmanager
def _received(upload: UploadFile, ext: str) -> Iterator[str]:
    """The upload as a file ``upload<ext>`` in a private temporary folder, removed afterwards whatever happens.

    The name is ours, not the client's: only its format (``ext``) is kept, which the
    readers (nibabel, ITK) need.
    """
    with private_folder(UPLOAD_FOLDER_PREFIX) as folder:
        path = os.path.join(folder, f"upload{ext}")
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        yield path


def save_label(
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
) -> dict[str, Any]:
    """``PUT /datastore/label``: every field checked before anything is written (see the module docstring)."""
    tag = tag or DefaultLabelTag.FINAL.value  # MONAI Label's own default for an empty tag
    try:
        check_id(image, "image")
        check_tag(tag, "tag")
        info = parse_info(params, "params")
        ext = volume_extension(label.filename or f"label{VOLUME_EXTENSIONS[0]}", "label")
    except InputError as e:
        logger.info(f"Rejected label upload for {image!r} ({tag!r}) by {user.username}: {e}")
        raise http_error(e) from e
    instance = app_instance()
    with _received(label, ext) as path:
        label_id = instance.datastore().save_label(image, path, tag, info)
    result = instance.on_save_label(image, label_id) or {}
    result.update({"image": image, "label": label_id})
    return result


def add_image(
    image: str | None = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
) -> dict[str, str]:
    """``PUT /datastore/image``: every field checked before anything is written; the id defaults to the file's stem."""
    try:
        filename = os.path.basename(file.filename or f"image{VOLUME_EXTENSIONS[0]}")
        ext = volume_extension(filename, "image")
        image_id = check_id(image if image else filename[: -len(ext)], "image")
        info = parse_info(params, "params")
    except InputError as e:
        logger.info(f"Rejected image upload {image!r} by {user.username}: {e}")
        raise http_error(e) from e
    if user and user.username:
        info["user"] = user.username  # as MONAI Label records it
    with _received(file, ext) as path:
        image_id = app_instance().datastore().add_image(image_id, path, info)
    return {"image": image_id}


def _chunks(file: Any, size: int) -> Iterator[bytes]:
    """``size`` bytes of the open ``file``, then close it."""
    with file:
        left = size
        while left > 0:
            data = file.read(min(CHUNK, left))
            if not data:  # only a writer that truncates in place could do this; never the datastore
                raise RuntimeError(f"{file.name} shrank while it was being sent ({left} bytes missing)")
            left -= len(data)
            yield data


def serve_one_version(path: str, what: str) -> StreamingResponse:
    """The file at ``path`` as one whole version: opened once, its length from that open file.

    Raises:
        HTTPException: 404 when there is no such file (``what`` says which).
    """
    try:
        file = open(path, "rb") if path else None
    except OSError:
        file = None
    if file is None:
        raise HTTPException(status_code=404, detail=f"{what} not found")
    try:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise HTTPException(status_code=404, detail=f"{what} not found")
    except BaseException:
        file.close()
        raise
    name = os.path.basename(path)
    quoted = quote(name)
    disposition = f'attachment; filename="{name}"' if quoted == name else f"attachment; filename*=utf-8''{quoted}"
    headers = {
        "content-length": str(info.st_size),
        "content-disposition": disposition,
        "last-modified": formatdate(info.st_mtime, usegmt=True),
    }
    return StreamingResponse(_chunks(file, info.st_size), media_type=get_mime_type(path), headers=headers)


def download_label(
    label: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
) -> StreamingResponse:
    """``GET /datastore/label``: one whole version of the stored label."""
    return serve_one_version(app_instance().datastore().get_label_uri(label, tag), "Label")


def download_image(image: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> StreamingResponse:
    """``GET /datastore/image``: one whole version of the stored image."""
    return serve_one_version(app_instance().datastore().get_image_uri(image), "Image")


#: (method, path) -> the endpoint that replaces MONAI Label's
ENDPOINTS = {
    ("PUT", "/datastore/label"): save_label,
    ("PUT", "/datastore/image"): add_image,
    ("PUT", "/datastore/"): add_image,
    ("GET", "/datastore/label"): download_label,
    ("GET", "/datastore/image"): download_image,
}
