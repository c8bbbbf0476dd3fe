"""The trust boundary: every id, tag and parameter from a request is checked here before any file or model is touched.

- **Ids and tags** (image ids, label tags, client ids) name datastore entries, never
  paths: :data:`ID_RULE` (letters, digits, ``.``, ``_``, ``-``; starts with a letter or
  digit; at most 128 characters; no ``..``). DICOM UIDs and file stems fit.
- **Parameters** of each model are one pydantic schema, checked before any work;
  a violation is a 422 naming the field and what it accepts. Types are strict: a
  point is three JSON numbers (``true`` is not ``1``, ``"3"`` is not ``3``), NaN and
  infinity are refused, ``null`` is "not given" only where documented.
- ``params.model`` and ``params.image`` may not contradict the URL: the model and the
  image a request names in its URL are the ones that run.
- **JSON** from a request (``params``, ``info`` form fields, JSON bodies) is read by
  :func:`parse_json_object`: it must be an object, and no integer in it may exceed
  :data:`MAX_JSON_INT` in magnitude. Python converts such integers to float in finite
  checks (``OverflowError`` beyond 1e308) and refuses to parse more than 4300 digits
  (a ``ValueError`` that is no ``JSONDecodeError``); both were 500s. No field of this
  app needs more than 2^53 (the largest integer a float, and JavaScript, hold exactly).

MONAI Label passes the plugins' JSON ``params`` straight into the request dict, and
its ``LocalDatastore`` joins ids and tags into paths unchecked; these checks are what
it lacks. Keys the plugins send that the models do not use (e.g. OHIF's
``result_compress``) are accepted and ignored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from model_core.io.validation import InputError

__all__ = [
    "FINAL_TAG",
    "ID_RULE",
    "MAX_JSON_INT",
    "RESULT_DTYPES",
    "RESULT_EXTENSIONS",
    "InContextParams",
    "InteractiveParams",
    "MedSAMLiteParams",
    "check_id",
    "check_json_numbers",
    "check_tag",
    "http_error",
    "parse_json_object",
    "parse_params",
]

ID_RULE = "1 to 128 characters: letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: the tag of the users' own labels (MONAI Label's DefaultLabelTag.FINAL): the support set
FINAL_TAG = "final"
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32")
MAX_POINTS = 1000
#: the largest integer magnitude accepted anywhere in a request's JSON (2^53: exact as a float and in JavaScript)
MAX_JSON_INT = 2**53


def check_id(value: Any, field: str) -> str:
    """``value`` if it is a valid id (see :data:`ID_RULE`), else a 400 naming ``field``."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "..."
        raise InputError(f"{field} {shown!r} is not a valid id: {ID_RULE}.")
    return value


def check_tag(value: Any, field: str = "tag") -> str:
    """A label tag: an id (it becomes a folder name under labels/)."""
    return check_id(value, field)


def http_error(error: InputError) -> HTTPException:
    """The HTTP answer to an :class:`InputError`: its status and message (and ``Retry-After`` when it has one)."""
    retry_after = getattr(error, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return HTTPException(status_code=error.status, detail=str(error), headers=headers)


_Number = Annotated[StrictFloat | StrictInt, Field(allow_inf_nan=False)]
_Point = Annotated[list[_Number], Field(min_length=3, max_length=3)]


class BaseParams(BaseModel):
    """What every model of this app accepts."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(None, description="must equal the model in the URL when given")
    image: str | None = Field(None, description="must equal the image in the URL when given")
    result_extension: Literal[".nii.gz", ".nii", ".nrrd", "nii.gz", "nii", "nrrd"] = Field(
        ".nii.gz", description="file format of the returned label map"
    )
    result_dtype: Literal["uint8", "uint16", "int16", "int32"] = Field(
        "uint16", description="integer type of the label map"
    )
    save_label: StrictBool = Field(False, description="also store the result in the datastore (never as 'final')")
    label_tag: str = Field("original", description="tag the result is stored under with save_label")
    client_id: str | None = Field(None, description="the plugin's client id; sessions are per client and image")

    @field_validator("result_extension")
    @classmethod
    def _dotted(cls, value: str) -> str:
        return value if value.startswith(".") else f".{value}"

    @field_validator("label_tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        check_tag(value, "label_tag")
        if value == FINAL_TAG:
            raise ValueError(
                f"results are never stored as {FINAL_TAG!r} (the users' own labels); use another tag such as 'original'"
            )
        return value

    @field_validator("client_id")
    @classmethod
    def _client(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value, "client_id")


class InContextParams(BaseParams):
    """``icl_sam2``: every configured structure, in context of the labelled volumes."""


class InteractiveParams(BaseParams):
    """``icl_sam2_interactive``: clicks and an ROI box as the Slicer and OHIF plugins send them."""

    foreground: list[_Point] = Field(
        default_factory=list,
        max_length=MAX_POINTS,
        description="[[i, j, k], ...] voxel indices of the image (JSON numbers)",
    )
    background: list[_Point] = Field(
        default_factory=list,
        max_length=MAX_POINTS,
        description="[[i, j, k], ...] voxel indices of the image (JSON numbers)",
    )
    roi: Annotated[list[_Number], Field(min_length=6, max_length=6)] | None = Field(
        None, description="[i0, i1, j0, j1, k0, k1] voxel box (Slicer's ROI); [] or null for none"
    )
    label: str | None = Field(None, description="the structure's name (default: the first configured label)")
    from_in_context: StrictBool = Field(False, description="start from the in-context result and correct it")

    @field_validator("roi", mode="before")
    @classmethod
    def _empty_roi(cls, value: Any) -> Any:
        return None if value == [] else value


def _ordered(value: list | None, pairs: tuple[tuple[int, int, str], ...]) -> list | None:
    """``value`` if each (lo, hi) pair of its entries is in order with non-zero size, else a ValueError saying which."""
    if value is None:
        return value
    for lo, hi, what in pairs:
        if value[hi] < value[lo]:
            raise ValueError(f"reversed: {what} ({value[lo]} > {value[hi]}); give the smaller index first")
        if value[hi] == value[lo] and what[0] in "ij":
            raise ValueError(f"zero size: {what} ({value[lo]} == {value[hi]}); draw a box around the structure")
    return value


class MedSAMLiteParams(BaseParams):
    """``medsam_lite``: one box prompt, as Slicer's ROI or as a box on a slice (OHIF), for LiteMedSAM.

    Coordinates are inclusive voxel indices of the image file; the box lies in the ``(i, j)``
    plane and slices run along ``k``. Give ``roi``, or ``box`` with ``slice``. In-plane order
    and size are checked here; whether the box lies inside the image is checked against the
    image (also a 422 naming the field).
    """

    roi: Annotated[list[_Number], Field(min_length=6, max_length=6)] | None = Field(
        None,
        description="[i0, i1, j0, j1, k0, k1] voxel box (Slicer's ROI): the box on the middle slice of k0..k1, "
        "propagated through those slices; k0 == k1 for one slice",
    )
    box: Annotated[list[_Number], Field(min_length=4, max_length=4)] | None = Field(
        None, description="[i0, j0, i1, j1] voxel box on slice `slice` (OHIF's rectangle)"
    )
    slice: StrictInt | None = Field(None, description="k of the slice `box` is drawn on")
    slice_range: Annotated[list[StrictInt], Field(min_length=2, max_length=2)] | None = Field(
        None, description="[k0, k1] slices to segment with `box` (inclusive); none: propagate until the structure ends"
    )
    label: str | None = Field(None, description="the structure's name (default: the first configured label)")
    slice_step: StrictInt | None = Field(
        None,
        ge=1,
        description="slices per propagation step where the masks agree, the slices between filled by "
        "interpolation (1: every slice; none: --conf medsam_lite_slice_step)",
    )

    @field_validator("roi", "box", "slice_range", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return None if value == [] else value

    @field_validator("roi")
    @classmethod
    def _roi(cls, value: list | None) -> list | None:
        return _ordered(value, ((0, 1, "i0, i1"), (2, 3, "j0, j1"), (4, 5, "k0, k1")))

    @field_validator("box")
    @classmethod
    def _box(cls, value: list | None) -> list | None:
        return _ordered(value, ((0, 2, "i0, i1"), (1, 3, "j0, j1")))

    @field_validator("slice_range")
    @classmethod
    def _range(cls, value: list | None) -> list | None:
        return _ordered(value, ((0, 1, "k0, k1"),))

    @model_validator(mode="after")
    def _one_prompt(self) -> MedSAMLiteParams:
        if (self.roi is None) == (self.box is None):
            raise ValueError(
                "give exactly one prompt: roi [i0, i1, j0, j1, k0, k1], or box [i0, j0, i1, j1] with slice"
            )
        if self.box is not None and self.slice is None:
            raise ValueError("box needs slice: the k of the slice it is drawn on")
        if self.roi is not None and (self.slice is not None or self.slice_range is not None):
            raise ValueError("slice and slice_range go with box; roi carries its own slices k0..k1")
        return self


SCHEMAS: dict[str, type[BaseParams]] = {"segmentation": InContextParams, "deepgrow": InteractiveParams}


def _field(loc: tuple) -> str:
    out = "params"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def check_json_numbers(value: Any, field: str) -> None:
    """Raise a 422 naming the first integer under ``value`` beyond :data:`MAX_JSON_INT` (``params.roi[1]``)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            digits = len(str(abs(value)))
            raise InputError(
                f"{field}: a number of {digits} digits; numbers in a request are at most 2^53 "
                f"({MAX_JSON_INT}) in magnitude.",
                status=422,
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_numbers(item, f"{field}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_json_numbers(item, f"{field}[{i}]")


def parse_json_object(raw: Any, field: str, default: str = "{}") -> dict:
    """A request's JSON object (a form field's text, or a body FastAPI parsed), checked by :func:`check_json_numbers`.

    Raises:
        InputError: status 422 naming ``field``: not JSON, not an object, or a number too large.
    """
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw or default)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, int() refusing 4300+ digits, deep nesting
            raise InputError(f"{field} is not valid JSON: {str(e)[:200]}", status=422) from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{field} must be a JSON object, got {type(raw).__name__}.", status=422)
    check_json_numbers(raw, field)
    return raw


def parse_params(schema: type[BaseParams], raw: Any) -> BaseParams:
    """Validate a request's params against ``schema``.

    Raises:
        InputError: status 422, one line per wrong field (``params.foreground[0][1]: ...``).
    """
    raw = parse_json_object(raw, "params")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            value = err.get("input")
            shown = "NaN" if isinstance(value, float) and math.isnan(value) else json.dumps(value, default=str)[:60]
            lines.append(f"{_field(tuple(err['loc']))}: {err['msg']} (got {shown})")
        raise InputError("Invalid request: " + "; ".join(lines), status=422) from e
