"""In-context segmentation of volume files: the library behind ``icl-sam2 segment`` and ``icl-sam2 support``.

The bundle's ``inference.json`` segments a datalist inside one Ignite evaluator: one unreadable
query stops the run, ``SaveImaged`` writes files in place, and a support set is a datalist. A user
with a few files needs: support pairs checked before anything runs (each label on its image's grid,
its values named), a support memory built once and saved with what it is tied to, every query
segmented even when another one is broken, outputs whole or absent, DICOM input answered with a
DICOM SEG, and a picture. This module is that, over the same parts as the bundle: its
preprocessing, support preprocessing and postprocessing (:func:`~model_core.workflows.configs.load_bundle_parser`),
:func:`~model_core.workflows.inferers.build_support`, :class:`~model_core.workflows.inferers.InContextInferer`
and :class:`~model_core.predictor.VolumePredictor` (no second inference path).

What a saved support file is tied to (:data:`SUPPORT_TIES`): the model (preset, image size and the
weights, by the network's fingerprint), the labels (names and values), the intensity rule
(modality, CT window, MRI percentiles) and the channel mode. A later run that differs in any of them
is refused, naming it; settings not given are taken from the file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from tqdm import tqdm

from model_core.io.dicom import label_to_dicom_seg
from model_core.io.files import atomic_path, split_extension
from model_core.io.pictures import MontageRow, montage_png
from model_core.io.seg_metadata import SegIdentity
from model_core.io.transforms import channel_argmax, intensity_scaling
from model_core.io.validation import InputError, check_image_volume, check_label_volume, preprocess_checked_image
from model_core.io.volumes import VolumeSource, find_volumes
from model_core.modeling.checkpoint import checkpoint_record, load_checkpoint
from model_core.modeling.inputs import CHANNEL_MODES
from model_core.modeling.memory import MemoryPolicy, SupportMemory
from model_core.modeling.precision import resolve_precision
from model_core.modeling.presets import PRESETS
from model_core.workflows.configs import load_bundle_parser
from model_core.workflows.handlers import is_terminal
from model_core.workflows.inferers import InContextInferer, build_support

__all__ = ["DEFAULTS", "SUPPORT_TIES", "InContextSegmenter", "QueryResult", "parse_support_pairs"]

#: settings used when neither the command, a support file nor the checkpoint's record gives them
DEFAULTS: dict[str, Any] = {
    "preset": "sam2.1_hiera_tiny",
    "image_size": 512,
    "modality": "CT",
    "window": [-200.0, 300.0],
    "percentiles": [0.5, 99.5],
    "channel_mode": "replicate",
}
#: what a saved support memory is tied to, besides the weights (checked when it is loaded)
SUPPORT_TIES = ("preset", "image_size", "labels", "modality", "window", "percentiles", "channel_mode")
SUPPORT_FORMAT = "icl_sam2.support_file/1"
#: every label value (the support labels' values that ``labels`` does not name count as background)
ANY_LABEL = range(1, 65536)
#: rows at most in a ``--preview`` montage (one per query)
PREVIEW_ROWS = 12
PREVIEW_CELL = 128


@dataclass
class QueryResult:
    """What became of one query.

    Attributes:
        source: the query.
        ok: whether its outputs were written.
        error: why not (one line naming the file and what to do).
        outputs: ``{"label", "confidence", "seg"}`` paths written.
        confidence: ``{structure: confidence in [0, 1]}``.
        voxels: ``{structure: voxels labelled}``.
        note: something the user should know (e.g. no DICOM SEG for an empty result).
        seconds: time spent on it.
    """

    source: VolumeSource
    ok: bool = False
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)
    voxels: dict[str, int] = field(default_factory=dict)
    note: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """A JSON-able record of the result."""
        out = {"query": self.source.path, "ok": self.ok, "seconds": round(self.seconds, 2)}
        if self.ok:
            out.update(outputs=self.outputs, confidence=self.confidence, voxels=self.voxels)
        else:
            out["error"] = self.error
        if self.note:
            out["note"] = self.note
        return out


def parse_support_pairs(pairs: str | Sequence[str]) -> list[dict[str, str]]:
    """``"image:label"`` strings (one, a list, or several joined by commas) as datalist entries.

    Raises:
        InputError: an entry without both an image and a label.
    """
    items = [pairs] if isinstance(pairs, str) else list(pairs)
    entries = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            image, sep, label = part.rpartition(":")
            if not sep or not image or not label:
                raise InputError(
                    f"Support entry {part!r} is not IMAGE:LABEL; give each support volume with its label map, "
                    "e.g. --support ct.nii.gz:ct_label.nii.gz, or a support file written by `icl-sam2 support`."
                )
            entries.append({"image": image, "label": label})
    if not entries:
        raise InputError("The support set is empty: give at least one IMAGE:LABEL pair or a support file.")
    return entries


def _is_support_file(support: str | Sequence[str]) -> bool:
    """A single existing file that is not a pair and not a volume: a saved support memory."""
    if not isinstance(support, str) or ":" in support or "," in support:
        return False
    return os.path.isfile(support) and not split_extension(os.path.basename(support))[1]


def _labels(labels: dict | str | None) -> dict[str, int] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError as e:
            raise InputError(
                f'--labels {labels!r} is not JSON; give {{"name": value}}, e.g. \'{{"kidney": 1}}\'.'
            ) from e
    if not isinstance(labels, dict) or not labels:
        raise InputError(f'--labels must be a non-empty {{"name": value}} map, got {labels!r}.')
    out = {}
    for name, value in labels.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or int(value) != value
            or not 0 < value < 65536
        ):
            raise InputError(f"--labels gives {name!r} the value {value!r}; label values are integers 1..65535.")
        out[str(name)] = int(value)
    if len(set(out.values())) != len(out):
        raise InputError(f"--labels {out} gives two structures the same value; each needs its own.")
    return out


class InContextSegmenter:
    """Segment volume files in context of a support set, with the bundle's transforms and inferer.

    Every setting left None is taken, in this order, from a saved support file
    (:meth:`load_support`), the checkpoint's record of how it was trained, then :data:`DEFAULTS`.

    Args:
        bundle_dir: the MONAI bundle whose configs define pre- and postprocessing.
        labels: ``{structure: label value}`` to segment.
        preset, image_size: the network (:func:`~model_core.modeling.presets.build_icl_sam2`).
        checkpoint: weights to load (None: the preset's initial weights, which segment nothing useful).
        device: ``cpu``, ``cuda``... (None: CUDA when available).
        precision: ``fp32``, ``bf16`` or ``auto`` (:mod:`model_core.modeling.precision`).
        modality, window, percentiles: the intensity rule (CT window in HU, MRI percentiles), as the bundle.
        channel_mode: ``replicate`` or ``2.5d``, as the model was trained.
        memory_policy: ``recent``, ``scored`` (:class:`~model_core.modeling.memory.MemoryPolicy`).
        num_support_slices: support slices per structure.
    """

    def __init__(
        self,
        bundle_dir: str,
        labels: dict | str | None = None,
        preset: str | None = None,
        image_size: int | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        precision: str = "auto",
        modality: str | None = None,
        window: Sequence[float] | None = None,
        percentiles: Sequence[float] | None = None,
        channel_mode: str | None = None,
        memory_policy: str = "recent",
        num_support_slices: int = 3,
    ):
        self.bundle_dir = bundle_dir
        given = {
            "labels": _labels(labels),
            "preset": preset,
            "image_size": None if image_size is None else int(image_size),
            "modality": None if modality is None else str(modality).upper(),
            "window": None if window is None else [float(v) for v in window],
            "percentiles": None if percentiles is None else [float(v) for v in percentiles],
            "channel_mode": channel_mode,
            "checkpoint": None if checkpoint is None else os.path.abspath(checkpoint),
        }
        if preset is not None and preset not in PRESETS:
            raise InputError(f"--preset {preset!r} is unknown; use one of {sorted(PRESETS)}.")
        #: what the command gave (None: not given)
        self.given = given
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.precision = resolve_precision(precision, self.device)
        except ValueError as e:
            raise InputError(f"--precision: {e}") from e
        self.policy = MemoryPolicy(memory_policy)
        self.num_support_slices = int(num_support_slices)
        self.settings: dict[str, Any] | None = None  # resolved by _resolve
        #: things the user should know that are not errors (e.g. support label values left out)
        self.notes: list[str] = []
        self._network = None
        self._parser = None

    # ------------------------------------------------------------------ settings
    def _resolve(self, support_settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Fill what was not given from the support file, then the checkpoint's record, then :data:`DEFAULTS`."""
        if self.settings is not None:
            return self.settings
        given = dict(self.given)
        if given["checkpoint"] is None and support_settings and support_settings.get("checkpoint"):
            given["checkpoint"] = support_settings["checkpoint"]
        record: dict[str, Any] = {}
        if given["checkpoint"]:
            try:
                record = checkpoint_record(given["checkpoint"])
            except ValueError as e:
                raise InputError(f"--checkpoint: {e}") from e
        settings: dict[str, Any] = {}
        for key in (*SUPPORT_TIES, "checkpoint"):
            for source in (given, support_settings or {}, record, DEFAULTS):
                if source.get(key) is not None:
                    settings[key] = source[key]
                    break
            else:
                settings[key] = None
        if not settings["labels"]:
            raise InputError("--labels is missing: name the structures to segment, e.g. --labels '{\"kidney\": 1}'.")
        settings["image_size"] = int(settings["image_size"])
        self.settings = settings
        return settings

    @property
    def labels(self) -> dict[str, int]:
        return self._resolve()["labels"]

    @property
    def classes(self) -> list[int]:
        return sorted(self.labels.values())

    def _bundle(self):
        if self._parser is None:
            s = self._resolve()
            overrides = {
                "preset": s["preset"],
                "image_size": s["image_size"],
                "classes": self.classes,
                "modality": s["modality"],
                "intensity#window": s["window"],
                "intensity#percentiles": s["percentiles"],
                "channel_mode": s["channel_mode"],
                "precision": self.precision,
                "device": f"$torch.device('{self.device}')",
            }
            try:  # the rules the configs would apply, checked here so a mistake is one line, not a traceback
                intensity_scaling(s["modality"], s["window"], s["percentiles"])
            except ValueError as e:
                raise InputError(f"The intensity rule: {e}") from e
            if s["channel_mode"] not in CHANNEL_MODES:
                raise InputError(f"--channel_mode {s['channel_mode']!r} is unknown; use one of {list(CHANNEL_MODES)}.")
            parser = load_bundle_parser(self.bundle_dir, "inference.json", overrides)
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.support_preprocessing = parser.get_parsed_content("train#preprocessing")
            post = parser.get_parsed_content("postprocessing")
            # the bundle's postprocessing ends with SaveImaged; outputs are written here, atomically
            self.postprocessing = Compose([t for t in post.transforms if type(t).__name__ != "SaveImaged"])
            self._parser = parser
        return self._parser

    @property
    def network(self):
        """The network with the checkpoint's weights (built on first use)."""
        if self._network is None:
            parser = self._bundle()
            checkpoint = self._resolve()["checkpoint"]
            with torch.random.fork_rng(devices=[]):  # initial weights: the same at every run
                torch.manual_seed(0)
                network = parser.get_parsed_content("network")
            if checkpoint:
                load_checkpoint(network, checkpoint)
            self._network = network.eval()
        return self._network

    # ------------------------------------------------------------------ support
    def _identity(self) -> SegIdentity:
        """Who made the SEGs: the model, its weights file and their digest, as the app's SEGs name them."""
        settings, network = self._resolve(), self.network
        info = {
            "checkpoint": settings["checkpoint"],
            "untrained": not settings["checkpoint"],
            "model_version": network.weights_version,
            "preset": settings["preset"],
            "image_size": settings["image_size"],
        }
        return SegIdentity.for_model("icl-sam2 segment", info)

    def support_from_files(self, pairs: str | Sequence[str]) -> SupportMemory:
        """Check the support pairs and encode them into a support memory (its :attr:`~SupportMemory.settings` set).

        Values a support label holds that ``labels`` does not name count as background (a map of many
        structures can serve as the support of one); each is reported in :attr:`notes`.

        Raises:
            InputError: a missing or unreadable file, a label off its image's grid or not a label map
                (non-integer values), a value of ``labels`` that no support label holds, an empty support set.
        """
        entries = parse_support_pairs(pairs)
        settings = self._resolve()
        present: set[int] = set()
        for entry in entries:
            for key in ("image", "label"):
                if not os.path.exists(entry[key]):
                    raise InputError(f"Support {key} {entry[key]} does not exist; check the path.")
            sources = find_volumes([entry["image"]])
            if sources[0].error:
                raise InputError(f"Support image: {sources[0].error}")
            try:
                if not sources[0].is_dicom:
                    check_image_volume(entry["image"], what=f"support image {entry['image']}")
                # any label value passes here: the ones --labels does not name are left out below
                values = check_label_volume(
                    entry["label"], entry["image"], ANY_LABEL, what=f"support label {entry['label']}"
                )
            except ValueError as e:
                raise InputError(str(e)) from e
            unnamed = sorted(set(values) - set(self.classes))
            if unnamed:
                self.notes.append(
                    f"support label {entry['label']} also holds values {unnamed[:10]}, which --labels does not "
                    "name: they count as background"
                )
            present |= set(values)
        missing = {n: v for n, v in settings["labels"].items() if v not in present}
        if missing:
            raise InputError(
                f"--labels names {missing}, which no support label holds ({[e['label'] for e in entries]}); "
                "give the label values the support labels use, or label those structures on a support volume."
            )
        network = self.network
        memory = build_support(
            network,
            entries,
            self.support_preprocessing,
            self.classes,
            self.num_support_slices,
            channel_mode=settings["channel_mode"],
        )
        memory.settings = {
            **{key: settings[key] for key in SUPPORT_TIES},
            "checkpoint": settings["checkpoint"],
            "support": [{k: os.path.abspath(v) for k, v in e.items()} for e in entries],
            "num_support_slices": self.num_support_slices,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "format": SUPPORT_FORMAT,
        }
        return memory

    def save_support(self, memory: SupportMemory, path: str) -> str:
        """Write a support memory (with its settings) to ``path``, whole or not at all."""
        with atomic_path(path) as tmp:
            memory.save(tmp)
        return path

    def load_support(self, path: str) -> SupportMemory:
        """Read a support file and check that this run matches what it is tied to (:data:`SUPPORT_TIES`, weights).

        Raises:
            InputError: not a support file, or a setting or the weights differ (the message names which).
        """
        try:
            memory = SupportMemory.load(path)
        except Exception as e:
            raise InputError(f"{path} is not a support file written by `icl-sam2 support` ({e}).") from e
        saved = memory.settings
        if saved.get("format") != SUPPORT_FORMAT:
            raise InputError(f"{path} holds a support memory without its settings; rebuild it with `icl-sam2 support`.")
        for key in SUPPORT_TIES:
            if self.given.get(key) is not None and self.given[key] != saved.get(key):
                raise InputError(
                    f"{path} was built for {key} {saved.get(key)!r}, not {self.given[key]!r}: leave --{key} out to use "
                    f"the file's, or rebuild it for this run with `icl-sam2 support`."
                )
        settings = self._resolve(saved)
        if memory.object_ids != self.classes:
            raise InputError(f"{path} holds structures {memory.object_ids}, not {self.classes}; rebuild it.")
        ours = self.network.architecture
        for key in ("preset", "image_size", "hidden_dim", "mem_dim", "num_maskmem"):
            if memory.architecture.get(key) != ours.get(key):
                raise InputError(
                    f"{path} was built by a model with {key} {memory.architecture.get(key)!r}, this run's has "
                    f"{ours.get(key)!r}: use the model it was built with, or rebuild it with `icl-sam2 support`."
                )
        if memory.architecture.get("weights") != ours.get("weights"):
            raise InputError(
                f"{path} was built with other weights (checkpoint {saved.get('checkpoint')!r}); this run loads "
                f"{settings['checkpoint']!r}: pass the checkpoint it was built with, or rebuild it with "
                "`icl-sam2 support`."
            )
        return memory

    def support(self, support: str | Sequence[str]) -> SupportMemory:
        """A support file's memory (:meth:`load_support`) or the pairs' (:meth:`support_from_files`)."""
        if _is_support_file(support):
            return self.load_support(str(support))
        return self.support_from_files(support)

    # ------------------------------------------------------------------ queries
    def _segment(self, source: VolumeSource, support: SupportMemory, output_dir: str) -> tuple[QueryResult, Any]:
        start = time.perf_counter()
        result = QueryResult(source)
        network = self.network
        try:  # read once, its voxels checked as they are read (a NaN query would give a meaningless label)
            item = preprocess_checked_image(source.path, self.preprocessing)
        except InputError as e:
            raise InputError(f"{source.path}: {e} Check the file, or convert it to NIfTI.") from e
        image = item["image"]
        inferer = InContextInferer(support, policy=self.policy, channel_mode=self._resolve()["channel_mode"])
        depth = int(image.shape[-1])
        terminal = is_terminal(sys.stderr)
        with tqdm(
            total=depth, desc=source.name, unit="slice", file=sys.stderr, disable=not terminal, leave=False
        ) as bar:
            probabilities = inferer(image[None].to(self.device), network, on_slice=lambda z: bar.update())[0].cpu()
        pred = MetaTensor(
            probabilities, meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations)
        )
        label = self.postprocessing({"image": image, "pred": pred})["pred"]
        array = np.asarray(torch.as_tensor(label)[0]).astype(np.int16)  # (I, J, K), the query's own grid
        affine = np.asarray(torch.as_tensor(label.affine), dtype=np.float64)
        names = {v: k for k, v in self.labels.items()}
        result.confidence = {
            names[c]: round(float(v), 4) for c, v in zip(support.object_ids, inferer.last_confidence[0])
        }
        result.voxels = {name: int((array == value).sum()) for value, name in names.items()}
        paths = {
            "label": os.path.join(output_dir, f"{source.name}_seg.nii.gz"),
            "confidence": os.path.join(output_dir, f"{source.name}_confidence.json"),
        }
        if source.is_dicom and any(result.voxels.values()):
            paths["seg"] = os.path.join(output_dir, f"{source.name}_seg.dcm")
        elif source.is_dicom:
            result.note = "no structure was found, so no DICOM SEG was written (a SEG holds at least one segment)"
        with contextlib.ExitStack() as stack:  # every output renamed into place only once all are written
            tmp = {
                key: stack.enter_context(atomic_path(path, suffix=".nii.gz" if key == "label" else ""))
                for key, path in paths.items()
            }
            nib.save(nib.Nifti1Image(array, affine), tmp["label"])
            if "seg" in tmp:
                label_to_dicom_seg(
                    tmp["label"],
                    source.series_files,
                    {n: v for n, v in self.labels.items() if result.voxels[n]},
                    tmp["seg"],
                    identity=self._identity(),
                )
            record = {
                "image": source.path,
                "label": paths["label"],
                "confidence": result.confidence,
                "voxels": result.voxels,
                "model": {k: self._resolve()[k] for k in ("preset", "image_size", "checkpoint")},
            }
            with open(tmp["confidence"], "w") as f:
                json.dump(record, f, indent=2)
        result.ok, result.outputs = True, paths
        result.seconds = time.perf_counter() - start
        preview = MontageRow(
            source.name,
            _small(torch.as_tensor(image[0]).float().numpy(), nearest=False),
            _small(_model_grid(probabilities, self.classes), nearest=True),
        )
        return result, preview

    def segment_all(
        self,
        inputs: str | Sequence[str],
        support: SupportMemory,
        output_dir: str,
        preview: str | None = None,
    ) -> list[QueryResult]:
        """Segment every query the inputs name; a broken one is reported and the others still run.

        Args:
            inputs: files, DICOM series folders, or folders of them (:func:`~model_core.io.volumes.find_volumes`).
            support: from :meth:`support`.
            output_dir: where ``<name>_seg.nii.gz``, ``<name>_confidence.json`` (and for DICOM ``<name>_seg.dcm``) go.
            preview: a PNG montage of the queries' slices with each structure's contour (one row per query,
                at most :data:`PREVIEW_ROWS`).

        Returns:
            One :class:`QueryResult` per query, in order.
        """
        sources = find_volumes([inputs] if isinstance(inputs, str) else list(inputs))
        results, rows, names = [], [], {}
        for source in sources:
            result = QueryResult(source, error=source.error)
            if source.error is None and source.name in names:
                result.error = (
                    f"{source.path} would write the same outputs as {names[source.name]} ({source.name}_seg.nii.gz); "
                    "rename one of them or segment them into different --output folders."
                )
            if result.error is None:
                names[source.name] = source.path
                try:
                    result, row = self._segment(source, support, output_dir)
                    if len(rows) < PREVIEW_ROWS:
                        rows.append(row)
                except Exception as e:  # reported, and the batch goes on
                    message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                    result.error = message if source.path in message else f"{source.path}: {message}"
            results.append(result)
        if preview and rows:
            montage_png(rows, preview, self.labels, cell=PREVIEW_CELL)
        return results


def _model_grid(probabilities: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """``(K + 1, H, W, D)`` probabilities to an ``(H, W, D)`` label map of the class values (the preview's)."""
    index = channel_argmax(probabilities)[0].numpy()
    return np.asarray([0, *classes], dtype=np.int16)[index]


def _small(volume: np.ndarray, nearest: bool) -> np.ndarray:
    """``(H, W, D)`` reduced in-plane to at most the preview's cell size (what a montage keeps per query)."""
    step = max(volume.shape[0] // PREVIEW_CELL, volume.shape[1] // PREVIEW_CELL, 1)
    if step == 1:
        return np.asarray(volume)
    if nearest:
        return np.asarray(volume[::step, ::step])
    h, w = (volume.shape[0] // step) * step, (volume.shape[1] // step) * step
    return volume[:h, :w].reshape(h // step, step, w // step, step, -1).mean((1, 3))
