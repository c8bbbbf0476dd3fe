"""A datalist's labelled volumes as a COCO dataset of 2D slices, and the check that it says the same as the labels.

Fine-tuning code written for natural images (the MS-lesion SAM seeds, detectron2, SAM's own fine-tuning
recipes) reads COCO: PNG images and instance annotations. :func:`export_coco` writes one COCO file per
datalist split; :func:`verify_coco` decodes its annotations with ``pycocotools`` and compares them with
the label volumes voxel for voxel. ``icl-sam2 coco export|verify`` is the command line over both.

pycocotools has the COCO format, RLE encoding and polygon rasterisation but nothing that turns a
volume into slices or a mask into polygons (``skimage.measure.find_contours`` does the latter); MONAI
loads and orients the volumes exactly as the bundle's preprocessing does. This module is the glue.

**Layout** (``OUT`` is ``output_dir``)::

    OUT/annotations/instances_<split>.json      one COCO file per split (written last, atomically)
    OUT/<split>/<vvvv>_<name>_<axis>_<kkkk>.png  8-bit grayscale slices; file_name is relative to OUT

**Geometry.** Volumes are loaded with MONAI and oriented to RAS (``Orientationd``, as the bundle does):
a lossless permutation and flip of the voxel array, never a resampling, so every PNG pixel is one voxel.
``axis`` picks the RAS axis the slices are cut across: ``sagittal`` (0), ``coronal`` (1) or ``axial`` (2,
default). A slice keeps the other two RAS axes in order as (rows, columns), the layout the model sees
(:func:`model_core.modeling.inputs.as_slices`).

**Image records** carry the standard ``id``, ``file_name``, ``width``, ``height`` and, to map back:
``volume`` (the id in the top-level ``volumes`` list), ``volume_name``, ``slice_index`` (in the RAS
grid), ``axis``, ``source_axis`` and ``source_slice_index`` (the same slice in the file's own voxel
array), ``image_file`` and ``label_file`` (the original files). The image id itself decodes too:
``id = volume * 100000 + slice_index`` (volumes numbered from 1).

**Intensities** are scaled to [0, 1] by the project's rule (:func:`model_core.io.transforms.intensity_scaling`:
a fixed window for CT, per-volume percentiles for MRI; defaults as in ``bundle/configs/train.json``)
and stored as ``round(255 * x)``. Never a raw cast.

**Annotations.** One category per entry of the datalist's ``labels`` mapping, with the label value as
category id (``label_merge`` is applied first, as in training). Each annotation is one connected region
(8-connected, in the slice) of one label in one slice (``instances="region"``, default: lesions become
instances, as the MS-lesion seeds use them), or all voxels of one label in one slice
(``instances="label"``). ``segmentation`` is compressed RLE (``encoding="rle"``, default; exact) or
polygons (``encoding="polygon"``: outer and hole contours at pixel precision; COCO merges a
polygon list by union, so holes are filled and polygons are lossy where a region has holes).
``area`` and ``bbox`` are those of the true region; ``iscrowd`` is 0.

A label value that is no category is an error by default (a datalist's ``labels`` usually lists every
value; a stray one is a mistake). ``unlisted="background"`` treats such values as background instead, for
datalists that name a few structures of a larger atlas (the Colin27 + AAL study names 4 of 116 regions);
:func:`verify_coco` applies the same rule, recorded in the file's ``info``.

By default only slices with foreground are written (``include_empty`` writes every slice).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from model_core.export.coco_data import (
    ENCODINGS,
    INSTANCES,
    UNLISTED,
    VolumeLoader,
    choice,
    parse_axis,
    parse_pair,
    parse_splits,
    read_categories,
    read_datalist,
    read_label_merge,
    source_slice,
    split_entries,
)
from model_core.io.files import atomic_path, volume_stem
from model_core.io.transforms import intensity_scaling
from model_core.io.validation import as_bool

__all__ = ["IMAGE_ID_STRIDE", "export_coco", "image_id", "verify_coco"]

#: RAS axis names and indices
#: image id = volume id * stride + slice index
IMAGE_ID_STRIDE = 100_000


def image_id(volume: int, slice_index: int) -> int:
    """The COCO image id of slice ``slice_index`` of volume ``volume`` (numbered from 1)."""
    return int(volume) * IMAGE_ID_STRIDE + int(slice_index)


# ----------------------------------------------------------------------------- validation


# ----------------------------------------------------------------------------- loading


# ----------------------------------------------------------------------------- encoding


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Pixel-precise polygons of a 2D mask in COCO coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``)."""
    from skimage import measure

    polygons = []
    # padding closes contours at the border; level 0.5 runs between pixel centres, so +0.5 puts it on COCO's grid
    for contour in measure.find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
        contour = measure.approximate_polygon(contour, tolerance=0)  # drop collinear points only (exact)
        xy = np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1)
        if len(xy) >= 3:
            polygons.append([round(float(v), 2) for v in xy.ravel()])
    return polygons


def _annotations(label_slice: np.ndarray, categories: dict[str, int], instances: str, encoding: str):
    """Yield ``(category_id, segmentation, area, bbox)`` for one label slice ``(H, W)``."""
    import pycocotools.mask as mask_utils

    for value in sorted(categories.values()):
        mask = label_slice == value
        if not mask.any():
            continue
        if instances == "region":
            regions, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
            parts = [regions == i for i in range(1, n + 1)]
        else:
            parts = [mask]
        for part in parts:
            rle = mask_utils.encode(np.asfortranarray(part.astype(np.uint8)))
            area, bbox = int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]
            if encoding == "rle":
                segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = _polygons(part)
            yield value, segmentation, area, bbox


def _write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array, mode="L").save(tmp)


def _write_json(content: dict, path: Path) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- export


def export_coco(
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    splits: str | Sequence[str] = "training",
    axis: str | int = "axial",
    encoding: str = "rle",
    instances: str = "region",
    include_empty: bool | str = False,
    modality: str = "CT",
    window: Sequence[float] = (-200.0, 300.0),
    percentiles: Sequence[float] = (0.5, 99.5),
    labels: dict | str | None = None,
    unlisted: str = "error",
) -> dict[str, dict[str, Any]]:
    """Write the labelled volumes of a datalist as COCO datasets of PNG slices (this module's docstring).

    Args:
        datalist: MSD-style datalist JSON (relative paths start from its folder); its ``labels`` name
            the categories and its ``label_merge``, if any, is applied to every label first.
        output_dir: folder to write to (created).
        splits: datalist keys to export, a list or comma-separated string; one COCO file each.
        axis: ``axial`` (default), ``coronal``, ``sagittal``, or the RAS index 2, 1, 0.
        encoding: ``rle`` (exact) or ``polygon`` (holes filled).
        instances: ``region`` (one annotation per connected region per label per slice) or
            ``label`` (one per label per slice).
        include_empty: also write slices without foreground (with no annotations).
        modality, window, percentiles: intensity scaling, as :func:`model_core.io.transforms.intensity_scaling`
            (the bundle's ``modality`` and ``intensity`` settings; ``window=(0, 1)`` for the phantoms).
        labels: categories ``{"name": value}`` (dict or JSON) instead of the datalist's ``labels``.
        unlisted: what a label value that is no category means: ``error`` (default) or ``background``.

    Returns:
        Per split: ``{"json": path, "volumes": n, "images": n, "annotations": n, "categories": n}``.

    Raises:
        ValueError: naming the field: missing datalist or split, an entry without ``label``, a non-integer
            label, a label value that is no category, an unknown axis, encoding or instances, a bad window.
    """

    datalist = str(Path(datalist).expanduser().resolve())
    content = read_datalist(datalist)
    split_names = parse_splits(splits)
    axis_name, axis_index = parse_axis(axis)
    encoding = choice(encoding, "encoding", ENCODINGS)
    instances = choice(instances, "instances", INSTANCES)
    include_empty = as_bool(include_empty, "include_empty")
    unlisted = choice(unlisted, "unlisted", UNLISTED)
    categories = read_categories(content, labels, datalist)
    label_merge = read_label_merge(content, datalist)
    window, percentiles = (
        parse_pair(window, "window", "(-200, 300)"),
        parse_pair(percentiles, "percentiles", "(0.5, 99.5)"),
    )
    intensity = intensity_scaling(modality, window=window, percentiles=percentiles)  # checks modality and ranges
    output = Path(output_dir).expanduser().resolve()
    per_split = {split: split_entries(datalist, split) for split in split_names}  # every split checked before writing
    loader = VolumeLoader(label_merge, intensity)

    summary: dict[str, dict[str, Any]] = {}
    volume_id = 0
    for split, entries in per_split.items():
        coco: dict[str, Any] = {
            "info": {
                "description": f"{content.get('name') or Path(datalist).stem} {split}, {axis_name} slices",
                "datalist": datalist,
                "split": split,
                "axis": axis_name,
                "orientation": "RAS",
                "encoding": encoding,
                "instances": instances,
                "include_empty": include_empty,
                "unlisted": unlisted,
                "label_merge": {str(k): v for k, v in (label_merge or {}).items()} or None,
                "intensity": {
                    "modality": str(modality),
                    "window": [float(v) for v in window],
                    "percentiles": [float(v) for v in percentiles],
                    "png": "round(255 * scaled)",
                },
                "image_id": f"volume * {IMAGE_ID_STRIDE} + slice_index",
            },
            "volumes": [],
            "images": [],
            "annotations": [],
            "categories": [
                {"id": value, "name": name, "supercategory": "label"}
                for name, value in sorted(categories.items(), key=lambda kv: kv[1])
            ],
        }
        for index, entry in enumerate(entries):
            volume_id += 1
            where = f"Entry {index} of {split!r} in {datalist!r}"
            label, original_affine = loader.label(entry, where)
            unknown = sorted(set(np.unique(label).tolist()) - {0, *categories.values()})
            if unknown and unlisted == "background":
                label[~np.isin(label, list(categories.values()))] = 0
            elif unknown:
                raise ValueError(
                    f'{where}: "label" {entry["label"]!r} holds values {unknown} that are no category '
                    f'(labels: {categories}); add them to "labels" or a "label_merge", or pass '
                    f"unlisted='background'"
                )
            image = loader.image(entry, where)
            if image.shape != label.shape:
                raise ValueError(f"{where}: image {image.shape} and label {label.shape} differ after loading")
            if label.shape[axis_index] >= IMAGE_ID_STRIDE:
                raise ValueError(
                    f"{where}: {label.shape[axis_index]} slices along {axis_name}; at most "
                    f"{IMAGE_ID_STRIDE - 1} fit an image id"
                )
            source_axis, flipped = source_slice(original_affine, axis_index)
            name = volume_stem(entry["image"])
            coco["volumes"].append(
                {
                    "id": volume_id,
                    "name": name,
                    "split": split,
                    "index": index,
                    "image_file": str(entry["image"]),
                    "label_file": str(entry["label"]),
                    "shape": list(label.shape),
                    "axis": axis_name,
                    "source_axis": source_axis,
                }
            )
            n = label.shape[axis_index]
            for k in range(n):
                label_slice = np.take(label, k, axis=axis_index)
                found = list(_annotations(label_slice, categories, instances, encoding))
                if not found and not include_empty:
                    continue
                file_name = f"{split}/{volume_id:04d}_{name}_{axis_name}_{k:04d}.png"
                _write_png(np.ascontiguousarray(np.take(image, k, axis=axis_index)), output / file_name)
                img_id = image_id(volume_id, k)
                coco["images"].append(
                    {
                        "id": img_id,
                        "file_name": file_name,
                        "height": int(label_slice.shape[0]),
                        "width": int(label_slice.shape[1]),
                        "volume": volume_id,
                        "volume_name": name,
                        "slice_index": k,
                        "axis": axis_name,
                        "source_axis": source_axis,
                        "source_slice_index": n - 1 - k if flipped else k,
                        "image_file": str(entry["image"]),
                        "label_file": str(entry["label"]),
                    }
                )
                for category_id, segmentation, area, bbox in found:
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": img_id,
                            "category_id": category_id,
                            "segmentation": segmentation,
                            "area": area,
                            "bbox": bbox,
                            "iscrowd": 0,
                        }
                    )
        json_path = output / "annotations" / f"instances_{split}.json"
        _write_json(coco, json_path)  # last: a COCO file never points at images not yet written
        summary[split] = {
            "json": str(json_path),
            "volumes": len(coco["volumes"]),
            "images": len(coco["images"]),
            "annotations": len(coco["annotations"]),
            "categories": len(coco["categories"]),
        }
    return summary


# ----------------------------------------------------------------------------- verify


def verify_coco(
    coco_json: str | os.PathLike, datalist: str | os.PathLike | None = None, max_mismatches: int = 100
) -> dict[str, Any]:
    """Decode a COCO file written by :func:`export_coco` and compare it with the label volumes voxel for voxel.

    Every slice of every volume is compared, including slices the export left out (they must be empty).
    A voxel mismatches for category ``c`` when the annotations of ``c`` cover it and the label is not ``c``,
    or the other way round; label values that are no category count under ``"value <v>"`` (unless the
    export was made with ``unlisted="background"``: then they are background, as there).

    Args:
        coco_json: the ``instances_<split>.json`` to check.
        datalist: the datalist it was made from (default: the one recorded in its ``info``); its entries
            of the recorded split must still name the recorded label files.
        max_mismatches: how many per-slice mismatch records to list (all are counted).

    Returns:
        ``{"ok", "split", "volumes", "slices", "voxels", "mismatched_voxels", "iou": {category: IoU over all
        voxels}, "mismatches": [{"volume", "volume_name", "slice_index", "image_id", "category", "voxels"}],
        "mismatch_records": total}``.

    Raises:
        ValueError: the file is not an export of this module, the datalist no longer matches it, a label
            is not integer, or an annotation names an unknown image or category.
    """
    from pycocotools.coco import COCO

    coco_json = str(Path(coco_json).expanduser().resolve())
    if not os.path.isfile(coco_json):
        raise ValueError(f"coco_json={coco_json!r} does not exist: pass an annotations/instances_<split>.json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress; callers print JSON
            coco = COCO(coco_json)
    except Exception as e:
        raise ValueError(f"coco_json={coco_json!r} cannot be read by pycocotools ({type(e).__name__}: {e})") from e
    info, volumes = coco.dataset.get("info") or {}, coco.dataset.get("volumes")
    if not volumes or "split" not in info or "axis" not in info:
        raise ValueError(
            f'coco_json={coco_json!r} has no "volumes" list or info.split/info.axis: '
            f"only files written by export_coco (icl-sam2 coco export) can be verified"
        )
    datalist = str(Path(datalist or info.get("datalist", "")).expanduser().resolve())
    content = read_datalist(datalist)
    split, (axis_name, axis_index) = info["split"], parse_axis(info["axis"])
    label_merge = read_label_merge(content, datalist)
    entries = split_entries(datalist, split)
    loader = VolumeLoader(label_merge)
    categories = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    for ann in coco.dataset.get("annotations", []):
        if ann["image_id"] not in coco.imgs:
            raise ValueError(f'annotation {ann["id"]} names image_id {ann["image_id"]}, which is not in "images"')
        if ann["category_id"] not in categories:
            raise ValueError(
                f"annotation {ann['id']} names category_id {ann['category_id']}, which is not in "
                f'"categories" ({sorted(categories)})'
            )

    images_by_slice = {(img["volume"], img["slice_index"]): img for img in coco.dataset["images"]}
    mismatches: list[dict[str, Any]] = []
    n_records = n_slices = n_voxels = n_bad = 0
    inter = dict.fromkeys(categories.values(), 0)
    union = dict.fromkeys(categories.values(), 0)
    for volume in volumes:
        index = volume["index"]
        where = f"Entry {index} of {split!r} in {datalist!r}"
        if index >= len(entries) or os.path.abspath(entries[index]["label"]) != os.path.abspath(volume["label_file"]):
            found = entries[index]["label"] if index < len(entries) else "nothing"
            raise ValueError(
                f"{where} is {found!r}, but {coco_json!r} was made from {volume['label_file']!r}: "
                f"pass the datalist it was exported from"
            )
        label, _ = loader.label(entries[index], where)
        if info.get("unlisted") == "background":  # as the export did: values that are no category are background
            label[~np.isin(label, list(categories))] = 0
        if list(label.shape) != list(volume["shape"]):
            raise ValueError(f"{where}: label shape {list(label.shape)} differs from the exported {volume['shape']}")
        for k in range(label.shape[axis_index]):
            truth = np.take(label, k, axis=axis_index)
            decoded = {c: np.zeros(truth.shape, bool) for c in categories}
            img = images_by_slice.get((volume["id"], k))
            if img is not None:
                if (img["height"], img["width"]) != truth.shape:
                    raise ValueError(
                        f"image {img['id']} is {img['height']}x{img['width']} but slice {k} of "
                        f"{volume['label_file']!r} is {truth.shape[0]}x{truth.shape[1]}"
                    )
                for ann in coco.imgToAnns.get(img["id"], []):
                    decoded[ann["category_id"]] |= coco.annToMask(ann).astype(bool)
            n_slices += 1
            n_voxels += truth.size
            wrong = np.zeros(truth.shape, bool)
            diffs = []
            for c, mask in decoded.items():
                diff = mask != (truth == c)
                inter[categories[c]] += int((mask & (truth == c)).sum())
                union[categories[c]] += int((mask | (truth == c)).sum())
                diffs.append((categories[c], diff))
            for v in sorted(set(np.unique(truth).tolist()) - {0, *categories}):
                diffs.append((f"value {v}", truth == v))
            for name, diff in diffs:
                if diff.any():
                    wrong |= diff
                    n_records += 1
                    if len(mismatches) < max_mismatches:
                        mismatches.append(
                            {
                                "volume": volume["id"],
                                "volume_name": volume["name"],
                                "slice_index": k,
                                "image_id": image_id(volume["id"], k),
                                "category": name,
                                "voxels": int(diff.sum()),
                            }
                        )
            n_bad += int(wrong.sum())
    iou = {name: (inter[name] / union[name] if union[name] else 1.0) for name in inter}
    return {
        "ok": n_bad == 0,
        "coco_json": coco_json,
        "split": split,
        "axis": axis_name,
        "encoding": info.get("encoding"),
        "volumes": len(volumes),
        "slices": n_slices,
        "voxels": n_voxels,
        "mismatched_voxels": n_bad,
        "iou": iou,
        "mismatch_records": n_records,
        "mismatches": mismatches,
    }
