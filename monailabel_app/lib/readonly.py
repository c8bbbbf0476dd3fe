"""Read-only mode (``MONAI_LABEL_DATASTORE_READ_ONLY=true``): no request changes the datastore or the served model.

MONAI Label 0.8.5 reads the setting in one place only: ``LocalDatastore`` then skips
reconciling its index with the files at start-up (so a fresh folder lists no image at
all) and still accepts every upload, deletion and info update. Here:

- every route that writes answers 403 naming the setting (:func:`refuse_if_read_only`,
  called by ``lib/routes.py`` for the routes its table marks as writing, and for
  ``save_label`` in an infer request);
- :class:`ReadOnlyDatastore` makes the datastore itself refuse writes, so side
  effects of reading routes are refused too (MONAI Label's active-learning endpoint
  records which image it proposed in the datastore; it logs the refusal and answers);
  its index is rebuilt from the files in memory and never written.

Sessions (``/session``) stay available: they hold a volume sent for inference outside the
datastore (MONAI Label's Slicer plugin uses them), and nothing in a session reaches the
datastore.
"""

from __future__ import annotations

import logging
from typing import Any

from model_core.io.validation import InputError

logger = logging.getLogger(__name__)

__all__ = ["READ_ONLY_SETTING", "ReadOnlyDatastore", "read_only_error", "refuse_if_read_only"]

READ_ONLY_SETTING = "MONAI_LABEL_DATASTORE_READ_ONLY"


def read_only_error(what: str) -> InputError:
    """The 403 of a write in read-only mode; ``what`` names the write (``"label uploads"``)."""
    return InputError(
        f"This server is read-only ({READ_ONLY_SETTING}=true): {what} are refused; nothing was changed.", status=403
    )


def is_read_only() -> bool:
    from monailabel.config import settings

    return bool(settings.MONAI_LABEL_DATASTORE_READ_ONLY)


def refuse_if_read_only(what: str) -> None:
    """Raise :func:`read_only_error` when the server runs read-only."""
    if is_read_only():
        raise read_only_error(what)


class ReadOnlyDatastore:
    """Mixin before a datastore class (``class X(ReadOnlyDatastore, CheckedDatastore)``): its writes raise a 403.

    The methods are those of MONAI Label's ``Datastore`` interface that change something,
    plus ``LocalDatastore._update_datastore_file``, which writes its index: here a no-op,
    so the index built from the files at start-up (and on file events) stays in memory.
    """

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise read_only_error("image uploads")

    def remove_image(self, image_id: str) -> None:
        raise read_only_error("image deletions")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        raise read_only_error("label uploads")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise read_only_error("label deletions")

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        raise read_only_error("image info updates")

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        raise read_only_error("label info updates")

    def _update_datastore_file(self, *args: Any, **kwargs: Any) -> None:
        logger.debug("Read-only datastore: the index is kept in memory, not written")
