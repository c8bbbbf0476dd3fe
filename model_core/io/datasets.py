"""Build a Medical Segmentation Decathlon datalist for a dataset folder in a known layout.

:func:`make_datalist` builds the datalist of a folder in one of the layouts below;
:func:`~model_core.io.datalist.write_datalist` writes it atomically.
:func:`model_core.io.transforms.merge_labels` applies a datalist's ``label_merge`` to a label volume.
``icl-sam2 datalist`` is the command line over :func:`make_datalist`::

    icl-sam2 datalist --dataset_dir /data/kits23/dataset --preset kits23 --output datalist.json
    icl-sam2 datalist --dataset_dir /data/Task01_BrainTumour --preset msd --channel 0 --output b.json
    icl-sam2 datalist --dataset_dir /data/own --preset generic --labels '{"kidney": 1}' --output g.json
    icl-sam2 datalist --dataset_dir /data --preset json --datalist medsam2.json --output out.json

The output reads with :func:`monai.data.load_decathlon_datalist` (paths are relative
to the output file's folder unless ``--relative false``)::

    {
      "name": "kits23", "preset": "kits23",
      "labels": {"kidney": 1},                 # class name -> class value in the label the model sees
      "label_merge": {"1": [1, 2]},            # only when source values must be remapped (below)
      "modality": {"0": "FLAIR", ...},         # MSD only, when dataset.json has it
      "channel": 0,                            # only with --channel
      "num_training": 391, "num_validation": 98, "num_test": 0, "seed": 0, ...
      "training":   [{"image": "case_00000/imaging.nii.gz", "label": "case_00000/segmentation.nii.gz"}, ...],
      "validation": [...],
      "test":       [{"image": ...}, ...]      # may have no "label"
    }

Presets (folder layouts):

=========  ==========================================================================
kits23     ``DIR/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz`` (``DIR`` may also
           be the kits23 repository, whose cases lie in ``DIR/dataset``).
btcv       ``DIR/imagesTr/img0001.nii.gz`` + ``DIR/labelsTr/label0001.nii.gz``, or
           ``DIR/img`` + ``DIR/label`` (also under ``DIR/Training``); unlabelled
           ``DIR/imagesTs`` (or ``DIR/Testing/img``) go to ``test``.
msd        an MSD task folder: ``DIR/dataset.json`` lists ``training`` (image and
           label) and ``test`` (images); macOS ``._`` files are skipped.
generic    ``DIR/images/<name>`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) with
           ``DIR/labels/<name>`` (or ``<stem>_seg``/``<stem>_label``), or
           ``DIR/<case>/image.<ext>`` with ``label.<ext>`` or ``seg.<ext>`` beside it.
           Images without a label go to ``test``.
json       an existing datalist (``--datalist``; its relative paths are read against
           ``--dataset_dir``, default the datalist's folder), ``"seg"`` accepted for
           ``"label"`` as in the Medical-SAM2 fork; written back normalised.
=========  ==========================================================================

**Label merges.** KiTS23 labels are 1 kidney, 2 tumour, 3 cyst. As in the ICL
research code, kidney and tumour become one class and cysts background, so the
datalist says ``"labels": {"kidney": 1}`` and ``"label_merge": {"1": [1, 2]}``.
A consumer must remap every label volume before use: a voxel whose source value
is listed under class ``c`` becomes ``c``; every other voxel (here value 3, cyst)
becomes 0. :func:`model_core.io.transforms.merge_labels` does exactly that. ``--labels`` takes the same
form for other datasets: ``'{"kidney": [1, 2]}'`` writes a merge, ``'{"kidney": 1}'``
keeps the values as they are.

**Multi-channel images.** MSD tasks such as BraTS and prostate store modalities in
a 4th dimension. Pick one with ``--channel N`` (each entry then carries
``"channel": N``; the loader must take ``image[..., N]``); without it a 4D image
raises a ``ValueError`` listing the modalities. Only the first image's header is
read to check this.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from model_core.io.datalist import IMAGE_EXTENSIONS, labels_from_msd, normalise_entry
from model_core.io.files import split_extension
from model_core.io.validation import as_bool

__all__ = [
    "BTCV_LABELS",
    "KITS23_LABELS",
    "KITS23_LABEL_MERGE",
    "KITS23_SOURCE_LABELS",
    "LABEL_MERGE_RULE",
    "PRESETS",
    "make_datalist",
]


PRESETS = ("kits23", "btcv", "msd", "generic", "json")


KITS23_SOURCE_LABELS = {"kidney": 1, "tumor": 2, "cyst": 3}


KITS23_LABELS = {"kidney": 1}


KITS23_LABEL_MERGE = {"1": [1, 2]}


LABEL_MERGE_RULE = (
    "remap each label volume before use: a voxel whose source value is listed under class c becomes c; "
    "every other voxel becomes 0 (background)"
)


BTCV_LABELS = {
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "portal_and_splenic_veins": 10,
    "pancreas": 11,
    "right_adrenal_gland": 12,
    "left_adrenal_gland": 13,
}


Case = dict[str, Any]  # {"image": Path, "label": Path | None, ...extra keys kept from a json datalist}


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and split_extension(path.name, IMAGE_EXTENSIONS)[1] != ""


def _first_existing(candidates: list[Path]) -> Path | None:
    for path in candidates:
        if path.is_file():
            return path
    return None


def _parse_labels(labels: Any) -> tuple[dict[str, int], dict[str, list[int]] | None]:
    """``--labels`` (a JSON string or a dict) to ``(labels, label_merge)``.

    ``{"kidney": 1, "tumor": 2}`` keeps the values; ``{"kidney": [1, 2]}`` (any list) numbers the classes
    1..K in the given order and returns the merge that maps source values onto them.
    """
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as e:
            raise ValueError(f"--labels {labels!r} is not valid JSON ({e}): pass e.g. '{{\"kidney\": 1}}'") from None
    if not isinstance(labels, dict) or not labels:
        raise ValueError(
            f"--labels must be a non-empty mapping of class name to value, e.g. '{{\"kidney\": 1}}'; got {labels!r}"
        )

    def _values(name: str, value: Any) -> list[int]:
        vals = value if isinstance(value, (list, tuple)) else [value]
        if not vals or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in vals):
            raise ValueError(
                f"--labels[{name!r}] = {value!r}: a class value must be a positive integer "
                f"(or a list of them to merge source values), e.g. '{{\"kidney\": [1, 2]}}'"
            )
        return [int(v) for v in vals]

    parsed = {str(name): _values(str(name), value) for name, value in labels.items()}
    if not any(isinstance(v, (list, tuple)) for v in labels.values()):
        return {name: vals[0] for name, vals in parsed.items()}, None
    names = list(parsed)
    return {name: i + 1 for i, name in enumerate(names)}, {str(i + 1): parsed[name] for i, name in enumerate(names)}


def _read_label_values(path: Path) -> list[int]:
    """Sorted unique nonzero values of one label volume (nibabel for NIfTI, itk otherwise)."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        data = np.asanyarray(nib.load(str(path)).dataobj)
    else:
        import itk

        data = itk.array_view_from_image(itk.imread(str(path)))
    values = np.unique(data)
    return [int(v) for v in values if v != 0]


def _image_channels(path: Path) -> int | None:
    """Number of channels (size of the 4th dimension) from a NIfTI header, 1 for 3D; ``None`` if not NIfTI."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None

    shape = nib.load(str(path)).header.get_data_shape()  # header only: no voxel data is read
    return int(shape[3]) if len(shape) >= 4 else 1


def _check_channel(first_image: Path, channel: int | None, modality: dict | None) -> None:
    n = _image_channels(first_image)
    names = ", ".join(f"{k}: {v}" for k, v in (modality or {}).items()) or "not named in the dataset"
    if channel is None:
        if n is not None and n > 1:
            raise ValueError(
                f"images are 4D with {n} channels ({first_image.name}; modalities: {names}): "
                f"pass --channel N to pick one, e.g. --channel 0"
            )
        return
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise ValueError(f"--channel={channel!r} must be a non-negative integer (the index in the 4th dimension)")
    if n == 1:
        raise ValueError(
            f"--channel {channel} was given but the images are 3D ({first_image.name}): leave --channel out"
        )
    if n is not None and channel >= n:
        raise ValueError(
            f"--channel {channel} is out of range: {first_image.name} has {n} channels "
            f"(modalities: {names}); pass 0..{n - 1}"
        )


def _missing_label(image: Path, expected: str) -> ValueError:
    return ValueError(f"image {image} has no label: expected {expected}; add the label or remove the image")


def _collect_kits23(root: Path) -> list[Case]:
    if not list(root.glob("case_*")) and (root / "dataset").is_dir():
        root = root / "dataset"  # the kits23 repository itself
    pattern = str(root / "case_*" / "imaging.nii.gz")
    case_dirs = sorted(p for p in root.glob("case_*") if p.is_dir())
    without_image = [p.name for p in case_dirs if not (p / "imaging.nii.gz").is_file()]
    if case_dirs and len(without_image) == len(case_dirs):
        raise ValueError(
            f"no cases found: {pattern} matches nothing ({len(case_dirs)} case folders lack "
            f"imaging.nii.gz; run kits23's download script first)"
        )
    if without_image:
        raise ValueError(
            f"{len(without_image)} case folders lack imaging.nii.gz (first: {without_image[0]}); "
            f"finish the download or remove them"
        )
    cases = []
    for d in case_dirs:
        label = d / "segmentation.nii.gz"
        if not label.is_file():
            raise _missing_label(d / "imaging.nii.gz", str(label))
        cases.append({"image": d / "imaging.nii.gz", "label": label})
    if not cases:
        raise ValueError(f"no cases found in {root}: searched {pattern}")
    return cases


def _collect_btcv(root: Path) -> list[Case]:
    layouts = [("imagesTr", "labelsTr"), ("img", "label"), ("Training/img", "Training/label")]
    tests = ["imagesTs", "Testing/img"]
    searched = [str(root / img / "img*.nii.gz") for img, _ in layouts]
    for img_dir, lab_dir in layouts:
        images = sorted(p for p in (root / img_dir).glob("img*.nii.gz") if _is_image_file(p))
        if not images:
            continue
        cases: list[Case] = []
        for image in images:
            label = root / lab_dir / ("label" + image.name[len("img") :])
            if not label.is_file():
                raise _missing_label(image, str(label))
            cases.append({"image": image, "label": label})
        for test_dir in tests:
            cases += [
                {"image": p, "label": None} for p in sorted((root / test_dir).glob("img*.nii.gz")) if _is_image_file(p)
            ]
        return cases
    raise ValueError(f"no cases found in {root}: searched {', '.join(searched)}")


def _collect_msd(root: Path) -> tuple[list[Case], dict[str, Any]]:
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise ValueError(
            f"{root} has no dataset.json: an MSD task folder (e.g. Task03_Liver) holds dataset.json, "
            f"imagesTr/, labelsTr/ and imagesTs/"
        )
    with open(meta_path) as f:
        meta = json.load(f)

    def listed_image(entry, what: str) -> Path | None:
        """An image named by dataset.json, resolved and checked; None for macOS resource forks."""
        image_rel = entry["image"] if isinstance(entry, dict) else entry
        if Path(str(image_rel)).name.startswith("._"):
            return None
        image = (root / image_rel).resolve()
        if not image.is_file():
            raise ValueError(
                f"{meta_path} lists {what}{image_rel} but {image} does not exist; re-extract the task folder"
            )
        return image

    cases: list[Case] = []
    if "training" in meta:
        for entry in meta["training"]:
            image = listed_image(entry, "")
            if image is None:
                continue
            label_rel = (
                normalise_entry(entry, f"a training entry of {meta_path}").get("label")
                if isinstance(entry, dict)
                else None
            )
            if not label_rel or not (root / label_rel).is_file():
                raise _missing_label(image, str(root / label_rel) if label_rel else 'a "label" entry in dataset.json')
            cases.append({"image": image, "label": (root / label_rel).resolve()})
        pattern = f'the "training" list of {meta_path}'
    else:  # nnU-Net v2 style dataset.json: no lists, scan the folders
        pattern = str(root / "imagesTr" / "*.nii.gz")
        for image in sorted((root / "imagesTr").glob("*.nii.gz")):
            if not _is_image_file(image):
                continue
            label = root / "labelsTr" / image.name
            if not label.is_file():
                raise _missing_label(image, str(label))
            cases.append({"image": image, "label": label})
    if not cases:
        raise ValueError(f"no cases found in {root}: searched {pattern}")

    if "test" in meta:
        for entry in meta["test"]:
            image = listed_image(entry, "test image ")
            if image is not None:
                cases.append({"image": image, "label": None})
    else:
        tests = sorted(p for p in (root / "imagesTs").glob("*.nii.gz") if _is_image_file(p))
        cases += [{"image": p, "label": None} for p in tests]
    return cases, meta


def _collect_generic(root: Path) -> list[Case]:
    exts = "{" + ",".join(IMAGE_EXTENSIONS) + "}"
    cases: list[Case] = []
    image_dir, label_dir = root / "images", root / "labels"
    for image in sorted(p for p in image_dir.glob("*") if _is_image_file(p)) if image_dir.is_dir() else []:
        stem, _ = split_extension(image.name, IMAGE_EXTENSIONS)
        label = _first_existing(
            [label_dir / image.name]
            + [label_dir / f"{stem}{suffix}{ext}" for suffix in ("", "_seg", "_label") for ext in IMAGE_EXTENSIONS]
        )
        cases.append({"image": image, "label": label})
    if not cases:
        for case_dir in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")):
            image = _first_existing([case_dir / f"image{ext}" for ext in IMAGE_EXTENSIONS])
            if image is None:
                continue
            beside = [case_dir / f"{stem}{ext}" for stem in ("label", "seg") for ext in IMAGE_EXTENSIONS]
            label = _first_existing(beside)
            cases.append({"image": image, "label": label})
    if not cases:
        raise ValueError(
            f"no cases found in {root}: searched {image_dir}/*{exts} (labels in {label_dir}/) and "
            f"{root}/*/image{exts} (with label or seg beside it)"
        )
    return cases


def _collect_json(root: Path | None, datalist: str | os.PathLike | None) -> tuple[list[Case], dict[str, Any], bool]:
    """Cases of an existing datalist; the bool says whether it already had a validation or test split to keep."""
    if not datalist:
        raise ValueError("--preset json needs --datalist path/to/datalist.json (the datalist to normalise)")
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise ValueError(f"datalist {path} does not exist: pass the path of an existing JSON datalist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"datalist {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not any(isinstance(data.get(k), list) for k in ("training", "validation", "test")):
        raise ValueError(
            f'datalist {path} has no "training", "validation" or "test" list: '
            f'expected MSD form {{"training": [{{"image": ..., "label": ...}}]}}'
        )
    base = root if root is not None else path.parent
    cases: list[Case] = []
    for split in ("training", "validation", "test"):
        for i, entry in enumerate(data.get(split) or []):
            entry = normalise_entry(entry, f"{path}: {split}[{i}]")
            image = Path(base, entry["image"]).resolve()
            if Path(image).name.startswith("._"):
                continue
            if not image.is_file():
                raise ValueError(
                    f"{path}: {split}[{i}] image {entry['image']} not found at {image}; "
                    f"pass --dataset_dir as the folder its paths are relative to"
                )
            label = entry.get("label")
            if label is not None:
                label = Path(base, label).resolve()
                if not label.is_file():
                    raise _missing_label(image, f"{entry['label']} at {label}")
            elif split != "test":
                raise _missing_label(image, f'a "label" (or "seg") in {split}[{i}] of {path}')
            entry.update(image=image, label=label, _split=split)
            cases.append(entry)
    if not cases:
        raise ValueError(f"no cases found in datalist {path}: its training, validation and test lists are empty")
    has_splits = bool(data.get("validation")) or any(c["_split"] == "test" and c["label"] for c in cases)
    return cases, data, has_splits


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value!r} is out of range: pass a fraction in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to train on: "
            f"their sum must be below 1"
        )


def _split(cases: list[Case], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Case]]:
    labelled = sorted((c for c in cases if c["label"] is not None), key=lambda c: str(c["image"]))
    unlabelled = [c for c in cases if c["label"] is None]
    order = list(range(len(labelled)))
    random.Random(seed).shuffle(order)
    n = len(labelled)
    n_test = int(math.floor(test_fraction * n + 0.5))
    n_val = int(math.floor(val_fraction * n + 0.5))
    test = [labelled[i] for i in order[:n_test]]
    val = [labelled[i] for i in order[n_test : n_test + n_val]]
    train = [labelled[i] for i in order[n_test + n_val :]]
    key = lambda c: str(c["image"])  # noqa: E731
    return {
        "training": sorted(train, key=key),
        "validation": sorted(val, key=key),
        "test": sorted(test, key=key) + sorted(unlabelled, key=key),
    }


def _format_path(path: Path, base: Path, relative: bool) -> str:
    path = Path(path).resolve()
    return Path(os.path.relpath(path, base)).as_posix() if relative else path.as_posix()


def make_datalist(
    dataset_dir: str | os.PathLike | None,
    preset: str,
    output: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    relative: bool | str = True,
    channel: int | None = None,
    labels: dict | str | None = None,
    datalist: str | os.PathLike | None = None,
    name: str | None = None,
) -> dict:
    """Build the datalist of a dataset folder.

    Args:
        dataset_dir: the dataset folder (for ``json``: the folder the datalist's relative paths start from;
            ``None`` means the datalist's own folder).
        preset: folder layout, one of ``kits23``, ``btcv``, ``msd``, ``generic``, ``json`` (this module's docstring).
        output: where the datalist will be written; relative paths start from its folder
            (``None``: from ``dataset_dir``). Nothing is written here: see :func:`write_datalist`.
        val_fraction: share of the labelled cases for ``validation``, in [0, 1).
        test_fraction: share of the labelled cases for ``test`` (unlabelled cases always go there), in [0, 1).
        seed: the split's random seed (same seed and files, same split).
        relative: paths relative to the output's folder (default) or absolute.
        channel: for 4D (multi-modality) images, the index in the 4th dimension to use; recorded in every entry.
        labels: class names to values, a dict or JSON string (``{"kidney": 1}``; a list value,
            ``{"kidney": [1, 2]}``, merges source values). Default: the preset's names, or for ``generic``
            the nonzero values of the first label volume as ``label_<v>``.
        datalist: for ``preset="json"``, the datalist to normalise. If it already has a validation (or a
            labelled test) split, its splits are kept; otherwise its cases are split like a folder's.
        name: dataset name recorded in the output (default: MSD's ``name``, else the folder's name).

    Returns:
        The datalist dict (``name``, ``preset``, ``labels``, counts, ``training``, ``validation``, ``test``, ...).

    Raises:
        ValueError: unknown preset, missing folder, no cases, an image without a label in a labelled preset,
            fractions out of range, a 4D image without ``channel``, or an empty training split.
    """
    preset = str(preset).lower()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: pass one of {', '.join(PRESETS)}")
    relative = as_bool(relative, "relative")
    _check_fractions(val_fraction, test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an integer")

    root = None
    if dataset_dir is not None and str(dataset_dir) != "":
        root = Path(dataset_dir).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"dataset folder {root} does not exist (or is not a folder): pass --dataset_dir DIR")
    elif preset != "json":
        raise ValueError(f"preset {preset!r} needs --dataset_dir DIR (the dataset folder)")

    meta: dict[str, Any] = {}
    label_merge: dict[str, list[int]] | None = None
    modality: dict | None = None
    keep_splits = False
    default_name = root.name if root is not None else None
    if preset == "kits23":
        cases = _collect_kits23(root)
        class_labels, label_merge = dict(KITS23_LABELS), {k: list(v) for k, v in KITS23_LABEL_MERGE.items()}
    elif preset == "btcv":
        cases = _collect_btcv(root)
        class_labels = dict(BTCV_LABELS)
    elif preset == "msd":
        cases, meta = _collect_msd(root)
        class_labels = labels_from_msd(meta.get("labels"), str(root / "dataset.json")) if labels is None else None
        modality = meta.get("modality") or meta.get("channel_names")
        default_name = meta.get("name") or default_name
    elif preset == "generic":
        cases = _collect_generic(root)
        class_labels = None
    else:
        cases, meta, keep_splits = _collect_json(root, datalist)
        default_name = meta.get("name") or (default_name if dataset_dir is not None else Path(datalist).stem)
        modality = meta.get("modality")
        class_labels = None
        if labels is None and meta.get("labels"):
            class_labels = labels_from_msd(meta["labels"], str(datalist))
            label_merge = meta.get("label_merge")

    if labels is not None:
        class_labels, label_merge = _parse_labels(labels)
    if class_labels is None:
        first = next((c["label"] for c in cases if c["label"] is not None), None)
        if first is None:
            raise ValueError(
                f"no case has a label, so the training split would be empty ({len(cases)} unlabelled "
                f"images); add labels (see the preset's layout) or use another preset"
            )
        values = _read_label_values(first)
        if not values:
            raise ValueError(
                f"the first label volume {first} has no nonzero voxels, so no label names can be "
                f"inferred: pass --labels '{{\"name\": 1}}'"
            )
        class_labels = {f"label_{v}": v for v in values}

    if not any("channel" in c for c in cases) or channel is not None:
        _check_channel(cases[0]["image"], channel, modality)

    if keep_splits:
        splits = {s: [c for c in cases if c["_split"] == s] for s in ("training", "validation", "test")}
    else:
        splits = _split(cases, val_fraction, test_fraction, seed)
    if not splits["training"]:
        n_labelled = sum(c["label"] is not None for c in cases)
        raise ValueError(
            f"the training split is empty: {n_labelled} of {len(cases)} cases have labels and "
            f"val_fraction={val_fraction}, test_fraction={test_fraction} took them all; "
            f"lower the fractions or add labelled cases"
        )

    base = Path(output).expanduser().resolve().parent if output is not None else (root or Path.cwd())

    def entry(case: Case) -> dict:
        out = {k: v for k, v in case.items() if k not in ("image", "label", "_split")}
        out = {
            "image": _format_path(case["image"], base, relative),
            **({"label": _format_path(case["label"], base, relative)} if case["label"] is not None else {}),
            **out,
        }
        if channel is not None:
            out["channel"] = int(channel)
        return out

    result: dict[str, Any] = {"name": name or default_name, "preset": preset}
    if meta.get("description"):
        result["description"] = meta["description"]
    result["labels"] = class_labels
    if label_merge:
        result["label_merge"] = label_merge
        result["label_merge_rule"] = LABEL_MERGE_RULE
    if preset == "kits23":
        result["source_labels"] = dict(KITS23_SOURCE_LABELS)
    if modality:
        result["modality"] = modality
    if channel is not None:
        result["channel"] = int(channel)
    result.update(
        paths="relative to this file's folder" if relative else "absolute",
        seed=int(seed),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        num_training=len(splits["training"]),
        num_validation=len(splits["validation"]),
        num_test=len(splits["test"]),
        training=[entry(c) for c in splits["training"]],
        validation=[entry(c) for c in splits["validation"]],
        test=[entry(c) for c in splits["test"]],
    )
    return result
