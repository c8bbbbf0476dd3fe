"""What a DICOM SEG of this project says about itself: names, colours, who made it and with which weights.

One definition for every SEG the project writes: :func:`model_core.io.dicom.label_to_dicom_seg`
(pydicom-seg) and the app's DICOMweb datastore (MONAI Label's dcmqi ``itkimage2segimage``) both take
:func:`seg_metainfo`, a dcmqi metadata document (the JSON that ``itkimage2segimage --inputMetadata``
reads and that ``pydicom_seg.template.from_dcmqi_metainfo`` turns into a template).

Why this is missing upstream: MONAI Label's ``nifti_to_dicom_seg`` fixes the document's top level
(series description ``"AIName"`` unless a model name is given, creator ``"Reader1"``, every segment
``AUTOMATIC`` by ``"MONAILABEL"``) and colours segments by name from a table of generic anatomy,
red for any other name, so every segment of our SEGs was drawn red; dcmqi and pydicom-seg write
whatever document they are given.

- **Names**: ``SegmentLabel`` is the configured structure name; the series description names the
  source (the model, or that it is a label) and the structures (:func:`series_description`).
- **Colours**: :func:`segment_colours` gives each configured structure its own recommended display
  colour, fixed by the order of the label values (a structure has the same colour in every SEG of a
  server), distinct also between left/right pairs (``Precentral_L``/``Precentral_R``, ``left
  kidney``/``right kidney``), whose names differ by one character and so got nearly the same
  colour from the MONAI Label panel's name hash.
- **Who made it** (:class:`SegIdentity`): ``SegmentAlgorithmType`` ``MANUAL`` for a label a person
  drew or approved, ``SEMIAUTOMATIC``/``AUTOMATIC`` for a model's result, with ``SegmentAlgorithmName``
  naming the model and its weights (:meth:`SegIdentity.for_model`); ``ContentCreatorName`` is the
  application that wrote the SEG.
"""

from __future__ import annotations

import colorsys
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALGORITHM_TYPES",
    "CREATOR",
    "SegIdentity",
    "mirror_key",
    "seg_metainfo",
    "segment_colours",
    "series_description",
]

#: ``ContentCreatorName`` (PN) and ``Manufacturer`` of the SEGs this project writes
CREATOR = "ICL-SAM2"
ALGORITHM_TYPES = ("MANUAL", "SEMIAUTOMATIC", "AUTOMATIC")
#: the first colours, picked by hand to be told apart at a glance (red, blue, yellow, green, purple, orange, cyan,
#: brown); further structures get golden-angle hues at three lightness levels
PALETTE = [
    (220, 60, 60),
    (60, 160, 220),
    (240, 200, 40),
    (80, 200, 100),
    (200, 90, 220),
    (250, 140, 40),
    (40, 200, 200),
    (150, 110, 60),
]
#: smallest RGB distance kept between the colours of a left/right pair
PAIR_DISTANCE = 120.0
_LEFT = {"l", "left", "lt", "lh", "sin", "sinister"}
_RIGHT = {"r", "right", "rt", "rh", "dex", "dexter"}
_LO = 64  # DICOM LO and the PN component group: at most 64 characters


def _lo(text: str) -> str:
    """``text`` as a DICOM LO value: one line, at most 64 characters (cut with an ellipsis)."""
    text = " ".join(str(text).replace("\\", "/").split())
    return text if len(text) <= _LO else text[: _LO - 3] + "..."


def mirror_key(name: str) -> tuple[str, str] | None:
    """``(side, key)`` of a left/right structure name, ``None`` for an unpaired one.

    The side is a whole word of the name (``_L``, ``Left``, ``rt``...); ``key`` is the name
    without it, shared by both sides: ``Precentral_L`` -> ``("left", "precentral")``,
    ``right kidney`` -> ``("right", "kidney")``.
    """
    words = [w for w in re.split(r"[\s_\-.,/()]+", str(name).lower()) if w]
    sides = [("left" if w in _LEFT else "right") for w in words if w in _LEFT | _RIGHT]
    if len(sides) != 1 or len(words) < 2:
        return None
    return sides[0], " ".join(w for w in words if w not in _LEFT | _RIGHT)


def _colour(index: int) -> tuple[int, int, int]:
    if index < len(PALETTE):
        return PALETTE[index]
    hue = (index * 0.6180339887) % 1.0
    lightness = (0.55, 0.40, 0.70)[index % 3]
    return tuple(int(round(255 * c)) for c in colorsys.hls_to_rgb(hue, lightness, 0.75))  # type: ignore[return-value]


def _distance(a, b) -> float:
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)) ** 0.5


def segment_colours(labels: Mapping[str, int]) -> dict[str, tuple[int, int, int]]:
    """A recommended display colour (RGB 0-255) for every configured structure.

    The colour is fixed by the structure's rank among the label values, so one server gives a
    structure the same colour in every SEG, whichever structures a SEG holds. The second side
    of a left/right pair (:func:`mirror_key`) whose colour is closer than :data:`PAIR_DISTANCE`
    to its partner's takes the partner's complementary hue.

    Args:
        labels: ``{name: label value}`` (``--conf labels``).

    Returns:
        ``{name: (r, g, b)}``.
    """
    ordered = sorted(labels, key=lambda n: (int(labels[n]), n))
    colours = {name: _colour(rank) for rank, name in enumerate(ordered)}
    first_side: dict[str, str] = {}
    for name in ordered:
        mirror = mirror_key(name)
        if mirror is None:
            continue
        partner = first_side.setdefault(mirror[1], name)
        if partner != name and _distance(colours[name], colours[partner]) < PAIR_DISTANCE:
            h, lightness, s = colorsys.rgb_to_hls(*(c / 255 for c in colours[partner]))
            colours[name] = tuple(  # type: ignore[assignment]
                int(round(255 * c)) for c in colorsys.hls_to_rgb((h + 0.5) % 1.0, lightness, max(s, 0.6))
            )
    return colours


def series_description(source: str, names: list[str]) -> str:
    """``"<source>: <structures>"`` as a DICOM LO (structures beyond 64 characters counted: ``+3 more``)."""
    shown: list[str] = []
    for i, name in enumerate(names):
        rest = len(names) - i - 1
        candidate = f"{source}: {', '.join([*shown, name])}" + (f" +{rest} more" if rest else "")
        if len(candidate) > _LO and shown:
            return _lo(f"{source}: {', '.join(shown)} +{len(names) - len(shown)} more")
        shown.append(name)
    return _lo(f"{source}: {', '.join(shown)}")


@dataclass(frozen=True)
class SegIdentity:
    """Who made a SEG's segments.

    Args:
        algorithm_type: ``MANUAL`` (a person drew or approved it: ground truth), ``SEMIAUTOMATIC``
            (a model's result a person edited) or ``AUTOMATIC`` (a model's result as it came).
        algorithm_name: the model and its weights (required unless ``MANUAL``), at most 64 characters.
        source: what the series description names first (default: the algorithm name, or ``Label``).
        details: ``ContentDescription``: more about the weights (preset, size), at most 64 characters.
        creator: ``ContentCreatorName``: the application that wrote the SEG.

    Raises:
        ValueError: an unknown type, or a model's result without an algorithm name.
    """

    algorithm_type: str = "MANUAL"
    algorithm_name: str = ""
    source: str = ""
    details: str = ""
    creator: str = CREATOR

    def __post_init__(self):
        kind = str(self.algorithm_type).upper()
        if kind not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type {self.algorithm_type!r} must be one of {', '.join(ALGORITHM_TYPES)}.")
        if kind != "MANUAL" and not str(self.algorithm_name).strip():
            raise ValueError(f"An {kind} segmentation needs algorithm_name (the model and weights that made it).")
        object.__setattr__(self, "algorithm_type", kind)
        object.__setattr__(self, "algorithm_name", _lo(self.algorithm_name))

    @classmethod
    def for_model(cls, model: str, info: Mapping[str, Any], algorithm_type: str = "AUTOMATIC") -> SegIdentity:
        """The identity of a model's result, from what the server says of its weights.

        Args:
            model: the model's name (e.g. ``icl_sam2``).
            info: ``SegmentationService.model_info()``: ``checkpoint`` (path or None), ``untrained``,
                ``model_version`` (a digest of the loaded weights), ``preset``, ``image_size``;
                ``seed`` (of untrained weights) when known.
            algorithm_type: ``AUTOMATIC`` (as the model gave it) or ``SEMIAUTOMATIC`` (edited since).

        Returns:
            ``algorithm_name`` ``"ICL-SAM2 icl_sam2 model.pt 1a2b3c4d5e6f"`` (``UNTRAINED`` for initial
            weights), ``details`` with the preset and image size.
        """
        version = str(info.get("model_version") or "")[:12]
        if info.get("untrained") or not info.get("checkpoint"):
            weights = "UNTRAINED" + (f" seed {info['seed']}" if info.get("seed") is not None else "")
        else:
            weights = os.path.basename(str(info["checkpoint"]))
        name = " ".join(p for p in (CREATOR, model, weights, version) if p)
        details = f"{model}: weights {weights}" + (f" ({version})" if version else "")
        if info.get("preset"):
            details += f", preset {info['preset']} at {info.get('image_size')} px"
        return cls(algorithm_type, name, source=f"{CREATOR} {model}", details=_lo(details))

    @property
    def description_source(self) -> str:
        return self.source or (self.algorithm_name if self.algorithm_type != "MANUAL" else "Label")


def seg_metainfo(
    segments: list[tuple[int, str]],
    labels: Mapping[str, int],
    identity: SegIdentity | None = None,
    series_number: int = 300,
    series_description_text: str | None = None,
) -> dict[str, Any]:
    """The dcmqi metadata document of a SEG (``itkimage2segimage --inputMetadata``, pydicom-seg's template).

    Args:
        segments: ``[(labelID, structure name)]``: the value each segment has in the image handed
            to the writer (dcmqi: the label value; pydicom-seg's multi-class writer: 1..M), in order.
        labels: every configured ``{name: label value}`` (colours depend on all of them, not only
            the segments present).
        identity: who made the segments (default: a ``MANUAL`` label written by this project).
        series_number: ``SeriesNumber``.
        series_description_text: ``SeriesDescription`` (default: :func:`series_description` of the
            identity's source and the segments' names).

    Raises:
        ValueError: no segment, or a segment name that ``labels`` does not configure.
    """
    identity = identity or SegIdentity()
    if not segments:
        raise ValueError("A SEG needs at least one segment.")
    unknown = [name for _, name in segments if name not in labels]
    if unknown:
        raise ValueError(f"Segments {unknown} are not configured labels {dict(labels)}.")
    colours = segment_colours(labels)
    attributes = []
    for label_id, name in segments:
        attribute = {
            "labelID": int(label_id),
            "SegmentLabel": _lo(name),
            "SegmentDescription": _lo(f"{name} (label value {labels[name]})"),
            "SegmentAlgorithmType": identity.algorithm_type,
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "123037004",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure",
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": "91723000",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure",
            },
            "recommendedDisplayRGBValue": list(colours[name]),
        }
        if identity.algorithm_type != "MANUAL":
            attribute["SegmentAlgorithmName"] = identity.algorithm_name
        attributes.append(attribute)
    description = series_description_text or series_description(
        identity.description_source, [name for _, name in segments]
    )
    return {
        "ContentCreatorName": identity.creator,
        "ClinicalTrialSeriesID": CREATOR,
        "ClinicalTrialTimePointID": "1",
        "ClinicalTrialCoordinatingCenterName": CREATOR,
        "SeriesDescription": _lo(description),
        "SeriesNumber": str(int(series_number)),
        "InstanceNumber": "1",
        "BodyPartExamined": "",
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": _lo(identity.details or description),
        "segmentAttributes": [attributes],
    }
