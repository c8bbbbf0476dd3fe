"""What a volume must be for the model to use it: checks shared by uploads, support sets and scoring.

A server must refuse a bad file when it arrives rather than fail later for
everyone (one 4D label in the support set used to break every in-context
request). MONAI's readers load anything they can parse; these checks say
whether the result is a volume this project can segment, and why not.

Rules (one place for each):

- **Image**: a 3D scalar volume. A 4D file whose 4th dimension is 1 counts as 3D;
  more channels (a time series, several MRI sequences in one file) are refused:
  store one sequence per image. Every axis has at least :data:`MIN_VOLUME_SIZE`
  voxels and every value is finite.
- **Label**: the same shape rules, integer values only, every value 0 or one of
  the configured label values, and on its image's grid (shape and affine).

``InputError`` marks the caller's mistake (a 4xx at a server boundary); any other
exception is a fault on the serving side.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Iterable

import nibabel as nib
import numpy as np
from monai.transforms import Compose, LoadImage, LoadImaged

from model_core.io.readers import IsalNibabelReader
from model_core.io.transforms import load_case, root_cause

__all__ = [
    "MIN_VOLUME_SIZE",
    "InputError",
    "ServiceBusy",
    "as_3d",
    "as_bool",
    "check_image_array",
    "check_image_header",
    "check_image_volume",
    "check_label_volume",
    "image_header_problem",
    "image_problem",
    "label_problem",
    "load_volume",
    "preprocess_checked_image",
    "read_header",
]

#: the smallest size of every axis of an image or label
MIN_VOLUME_SIZE = 4


class InputError(ValueError):
    """The caller's input is wrong (bad file, bad parameter): report it to them, don't log it as a fault.

    A ``ValueError`` so that library callers that catch ``ValueError`` keep working.

    Args:
        message: what is wrong and what is accepted.
        status: the HTTP status a server answers with (400 bad input, 404 unknown id, 409 conflict).
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = int(status)


class ServiceBusy(InputError):
    """The server is at capacity for this kind of work right now: a 503 with ``Retry-After``, not a fault.

    An :class:`InputError` so that every boundary that answers a caller's error with its
    status and does not log it as a server fault answers this one the same way; the
    HTTP layer adds the ``Retry-After`` header from :attr:`retry_after`.

    Args:
        message: what is busy and what to do.
        retry_after: whole seconds after which a retry is likely to be served (at least 1).
    """

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, status=503)
        self.retry_after = max(int(-(-float(retry_after) // 1)), 1)


def load_volume(path: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a volume file in full: ``(array (I, J, K) or as stored, RAS affine (4, 4))``.

    Raises:
        InputError: the file is missing or no readable image (truncated data is caught too).
    """

    if not os.path.exists(path):
        raise InputError(f"The {what} {os.path.basename(path)!r} does not exist.")
    try:
        volume = LoadImage(image_only=True, ensure_channel_first=False, reader=IsalNibabelReader)(path)
        array = np.asarray(volume)
    except Exception as e:
        raise InputError(f"The {what} is not a readable image volume ({type(e).__name__}: {e}).") from e
    return array, np.asarray(volume.affine, dtype=np.float64)


def _check_shape(shape: tuple[int, ...], what: str, min_size: int) -> None:
    spatial = tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)
    if len(spatial) != 3:
        raise InputError(
            f"The {what} has shape {tuple(shape)}; a 3D scalar volume (I, J, K) is needed "
            "(a 4D file only with one channel: store each sequence or time point as its own image)."
        )
    if min(spatial) < min_size:
        raise InputError(f"The {what} has shape {tuple(shape)}; every axis needs at least {min_size} voxels.")


def _check_value_type(dtype: np.dtype, what: str) -> None:
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"The {what} has values of type {dtype}; real numbers are needed.")


def as_3d(array: np.ndarray, what: str, min_size: int = MIN_VOLUME_SIZE) -> np.ndarray:
    """``array`` as a 3D volume (a 4D file only with one channel), each axis at least ``min_size`` voxels."""
    _check_shape(tuple(array.shape), what, min_size)
    return array[..., 0] if array.ndim == 4 else array


def check_image_array(array: np.ndarray, what: str = "image") -> np.ndarray:
    """The image rules on voxels already read (a reader's output, as stored): returns the ``(I, J, K)`` volume.

    :func:`check_image_volume` reads the file for them; a reader that needs the voxels anyway
    (``SegmentationService.preprocess``) checks its own array, so that a new image is read once.

    Raises:
        InputError: naming the rule that failed.
    """
    array = as_3d(np.asarray(array), what)
    _check_value_type(array.dtype, what)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(
                f"The {what} has {bad} NaN or infinite values of {array.size}; every voxel must be finite."
            )
    return array


def check_image_volume(path: str, what: str = "image") -> tuple[tuple[int, int, int], np.ndarray]:
    """Check that a file is an image the model can segment; returns ``(shape (I, J, K), affine (4, 4))``.

    Raises:
        InputError: naming the rule that failed (see the module's docstring).
    """
    check_image_header(path, what)
    array, affine = load_volume(path, what)
    array = check_image_array(array, what)
    return tuple(int(s) for s in array.shape), affine  # type: ignore[return-value]


def check_label_volume(
    path: str, image_path: str | None, values: Iterable[int], affine_tolerance: float = 1e-3, what: str = "label"
) -> tuple[int, ...]:
    """Check a label map: 3D, integer values among ``{0} | values``, on the image's grid.

    Args:
        path: the label file.
        image_path: its image (None: grid not checked).
        values: the configured label values.
        affine_tolerance: largest difference of the affines in mm.

    Returns:
        The label values present, background excluded.

    Raises:
        InputError: naming the rule that failed.
    """
    allowed = {0, *(int(v) for v in values)}
    array, affine = load_volume(path, what)
    array = as_3d(array, what)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"The {what} has NaN or infinite values; a label map holds integer label values.")
        if not np.array_equal(array, np.round(array)):
            odd = np.unique(array[array != np.round(array)])[:5].tolist()
            raise InputError(
                f"The {what} has non-integer values such as {odd}; a label map holds integer label values "
                f"{sorted(allowed)}."
            )
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise InputError(f"The {what} has values of type {array.dtype}; integer label values are needed.")
    present = {int(v) for v in np.unique(array)}
    unknown = sorted(present - allowed)
    if unknown:
        raise InputError(
            f"The {what} has values {unknown[:10]} that are not configured labels; allowed: {sorted(allowed)} "
            "(0 = background; the server's --conf labels names the others)."
        )
    if image_path is not None:
        image_shape, image_affine = _header_of(image_path)
        if tuple(array.shape) != image_shape:
            raise InputError(
                f"The {what} has shape {tuple(array.shape)} but its image has {image_shape}; "
                "it must be on the same grid."
            )
        if not np.allclose(affine, image_affine, atol=affine_tolerance):
            raise InputError(
                f"The {what} and its image have different affines (orientation, spacing or origin); "
                "it must be on the same grid."
            )
    return tuple(sorted(present - {0}))


def _header_of(image_path: str) -> tuple[tuple[int, ...], np.ndarray]:
    shape, affine = read_header(image_path, "image")
    return tuple(shape[:3]), affine


def _stamp(*paths: str) -> tuple:
    return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)


@lru_cache(maxsize=1024)
def _image_problem_cached(path: str, stamp: tuple) -> str | None:
    try:
        check_image_volume(path)
    except InputError as e:
        return str(e)
    return None


def image_problem(path: str) -> str | None:
    """Why an image cannot be segmented (None: it can), remembered until the file changes."""
    try:
        return _image_problem_cached(os.path.realpath(path), _stamp(path))
    except OSError as e:
        return f"cannot read it ({e.strerror})"


def preprocess_checked_image(path: str, preprocessing: Compose) -> dict[str, Any]:
    """``{"image": path}`` through a bundle's ``preprocessing``, the image rules checked on the voxels as its
    reader (the first transform, ``LoadImaged``) read them: a file is read once and checked.

    For readers of a request's or a query's image that need its voxels anyway: the full
    :func:`check_image_volume` before them would read the file twice (0.17 s more for a
    256x256x64 ``.nii.gz`` on a 2-core AMD EPYC).

    Raises:
        InputError: the file is no readable image volume (the reader's own message), or its voxels break a rule.
    """
    reader = preprocessing.transforms[0]
    if not isinstance(reader, LoadImaged):
        raise ValueError(f"The preprocessing must start with LoadImaged; it starts with {type(reader).__name__}.")
    try:
        item = preprocessing({"image": path}, end=1)
    except MemoryError:
        raise  # the reader's host ran out, not the file's fault
    except Exception as e:
        cause = root_cause(e)
        raise InputError(f"The image is not a readable image volume ({type(cause).__name__}: {cause}).") from e
    check_image_array(item["image"], "image")
    return load_case(item, lambda read: preprocessing(read, start=1))


def check_image_header(path: str, what: str = "image") -> None:
    """The shape and value-type rules of :func:`check_image_volume` from a NIfTI file's header alone (0.5 ms
    instead of 0.17 s for a 256x256x64 ``.nii.gz``); other formats pass here and are checked as they are read.

    Raises:
        InputError: naming the rule that failed.
    """
    if not path.endswith((".nii", ".nii.gz")):
        return
    if not os.path.exists(path):
        raise InputError(f"The {what} {os.path.basename(path)!r} does not exist.")
    try:
        header = nib.load(path)
        shape, dtype = tuple(int(v) for v in header.shape), header.get_data_dtype()
    except Exception as e:
        raise InputError(f"The {what} is not a readable image volume ({type(e).__name__}: {e}).") from e
    _check_shape(shape, what, MIN_VOLUME_SIZE)
    _check_value_type(dtype, what)  # MONAI's reader casts to float32: a complex file would lose its imaginary part


def image_header_problem(path: str) -> str | None:
    """Why an image cannot be segmented, as far as its header tells (None: nothing found there).

    For a request whose reader checks the voxels itself (:func:`check_image_array`), so that a
    new image is read once. Formats other than NIfTI are checked in full (:func:`image_problem`).
    """
    if not path.endswith((".nii", ".nii.gz")):
        return image_problem(path)
    try:
        check_image_header(path)
    except InputError as e:
        return str(e)
    return None


@lru_cache(maxsize=1024)
def _label_problem_cached(label: str, image: str, values: tuple[int, ...], stamp: tuple) -> str | None:
    try:
        check_label_volume(label, image, values)
    except InputError as e:
        return str(e)
    return None


def label_problem(label: str, image: str, values: Iterable[int]) -> str | None:
    """Why a stored label cannot be used (None: it can), remembered until either file changes."""
    try:
        stamp = _stamp(label, image)
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    return _label_problem_cached(label, image, tuple(sorted(int(v) for v in values)), stamp)


def read_header(path: str, where: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and RAS affine of a volume, reading only the header where the format allows."""
    if not os.path.exists(path):
        raise ValueError(f"{where}: {path!r} does not exist.")
    try:
        if path.endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            return tuple(int(v) for v in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
        # other formats (DICOM series folders, NRRD, MHA): MONAI's readers, affine in RAS as well

        vol = LoadImage(image_only=True, ensure_channel_first=False)(path)
        return tuple(int(v) for v in vol.shape[:3]), np.asarray(vol.affine, dtype=np.float64)
    except Exception as e:
        raise ValueError(f"{where}: cannot read {path!r} as an image volume ({type(e).__name__}: {e}).") from e


def as_bool(value: Any, name: str) -> bool:
    """fire passes ``--relative false`` as the string ``"false"``; accept bools and the usual words."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise ValueError(f"{name}={value!r} is not a boolean: pass true or false")
