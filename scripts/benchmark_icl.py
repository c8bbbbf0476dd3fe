#!/usr/bin/env python
"""Benchmark in-context segmentation of a volume: model_core against Meta's ``SAM2VideoPredictor``.

What is measured, for one preset at random weights (``torch.manual_seed``) on one device:

- **Ours**: :meth:`InContextSAM2.build_support_memory` on ``S`` support slices with
  ``K`` objects, then :meth:`VolumePredictor.init_state` and
  ``propagate(direction="forward")`` over a ``D``-slice query volume, collecting
  every slice's logits into a ``(K, D, H, W)`` float32 CPU tensor.
- **Reference**: :func:`model_core.reference.reference_in_context`, i.e. the same
  support slices given to ``SAM2VideoPredictor.add_new_mask`` (one object at a
  time) and the query slices tracked by ``propagate_in_video``, with the same
  weights on the same inputs, in the same process.

For each side: wall time (``time.perf_counter``, best of ``repeats`` timed runs after
``warmup`` untimed ones), slices per second (``D / time``) and peak memory above
the pre-run baseline (so the weights of the two models, both resident, are not
counted). On CUDA the peak is ``torch.cuda.max_memory_allocated`` (stats reset
before each run); on CPU it is the peak resident set size, sampled with psutil
every 5 ms in a background thread (freed heap memory is handed back to the OS
with ``malloc_trim`` before each run where glibc provides it). Memory is the
largest peak over the timed runs.

Both sides must compute the same thing (model_core's ``recent`` policy is SAM2's
memory rule), so the script also reports the largest absolute logit difference
and the IoU of the binarised masks (``logits > 0``), and prints
``masks agree: yes`` when that IoU is at least 0.999 (or both are empty).

The inputs are the library's phantoms (:func:`model_core.io.phantoms.make_phantom`): the
support slices come from one volume, the query from another; object ``k`` is the
structure with label ``k + 1`` (blob, tube, block).
``--precision`` sets model_core's precision (``fp32``, ``bf16`` or ``auto``, see
:mod:`model_core.modeling.precision`); the reference runs in float32 without autocast, as
Meta's predictor runs on CPU, unless ``--reference_precision bf16`` (bfloat16 autocast, as sam2's
``benchmark.py`` runs its compiled predictor on a GPU).
With ``bf16`` the logits are not expected to match the reference bit for bit; the mask
IoU says how close they are.
``--compile max-autotune`` compiles ours as sam2's ``vos_optimized=True`` compiles its predictor
(:mod:`model_core.modeling.compile`) and ``--reference vos`` builds Meta's predictor that way
(``SAM2VideoPredictorVOS``); the warm-up runs pay the compilation. ``--compile_backend eager``
runs the same compiled code path on a CPU in seconds (no code generation): the smoke run of
``scripts/benchmark_gpu.sh``.
Nothing here asserts on timings; the last line printed is a JSON record for CI logs.

Example:
    python scripts/benchmark_icl.py --depth 32 --support 4 --objects 2 \\
        --image_size 512 --preset sam2.1_hiera_tiny --device cpu --warmup 1
    python scripts/benchmark_icl.py --depth 16 --support 2 --objects 2 --warmup 0 --precision bf16
    python scripts/benchmark_icl.py --device cuda --precision bf16 --compile max-autotune --reference vos \\
        --reference_precision bf16 --depth 64 --warmup 2 --repeats 3
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import threading
import time
from typing import Any, Callable

# Silence the predictor's tqdm progress bar. tqdm reads TQDM_* variables when it is
# imported, and importing torch already imports it, so this must come first.
os.environ.setdefault("TQDM_DISABLE", "1")

import fire
import numpy as np
import psutil
import torch

from model_core.io.phantoms import PHANTOM_LABELS, make_phantom

AGREE_IOU = 0.999


# ---------------------------------------------------------------- data
def make_inputs(
    size: int, depth: int, num_support: int, num_objects: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support slices of one phantom volume and a query volume from another (:mod:`model_core.io.phantoms`).

    Object ``k`` is the phantom structure with label value ``k + 1`` (blob, tube, block). The
    support slices are spread evenly over the slices of a ``max(16, S)``-slice phantom that show
    every object (or, failing that, any object).

    Args:
        size: image size (the model's).
        depth: D, query slices.
        num_support: S, support slices.
        num_objects: K, objects, 1 to 3.
        seed: phantom seed (the query uses ``seed``, the support volume ``seed + 1``).

    Returns:
        ``(support_images (S,3,H,W) float32 in [0, 1], support_masks (S,K,H,W) bool, query (D,3,H,W) float32)``.
    """
    if not 1 <= num_objects <= len(PHANTOM_LABELS):
        raise ValueError(
            f"objects={num_objects}: the phantom has {len(PHANTOM_LABELS)} structures "
            f"({', '.join(PHANTOM_LABELS)}); pass 1 to {len(PHANTOM_LABELS)}."
        )
    values = sorted(PHANTOM_LABELS.values())[:num_objects]
    query, _ = make_phantom((depth, size, size), seed=seed)
    volume, label = make_phantom((max(16, num_support), size, size), seed=seed + 1)
    masks = np.stack([label == v for v in values], axis=1)  # (D', K, H, W)
    shown = masks.any(axis=(2, 3))  # (D', K)
    candidates = np.flatnonzero(shown.all(axis=1))
    if len(candidates) < num_support:
        candidates = np.flatnonzero(shown.any(axis=1))
    picks = candidates[np.linspace(0, len(candidates) - 1, num_support).round().astype(int)]

    def rgb(slices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(slices))[:, None].expand(-1, 3, -1, -1).contiguous()

    return rgb(volume[picks]), torch.from_numpy(masks[picks]), rgb(query)


# ---------------------------------------------------------------- measurement
def _trim_heap() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc), so RSS peaks are comparable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler:
    """Peak RSS of this process during a ``with`` block, sampled in a background thread."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self.baseline = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def increase_mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def _measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Run ``fn`` once; return its result, wall seconds and peak memory (MiB above baseline)."""
    _trim_heap()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return out, seconds, peak
    with _RssSampler() as sampler:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, sampler.increase_mib


def _bench(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """``warmup`` untimed runs, then ``repeats`` timed ones: best time, largest memory peak, last output."""
    for _ in range(warmup):
        fn()
    times, peaks, out = [], [], None
    for _ in range(repeats):
        out, seconds, peak = _measure(fn, device)
        times.append(seconds)
        peaks.append(peak)
    return {"output": out, "seconds": min(times), "all_seconds": times, "peak_mib": max(peaks)}


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max abs logit difference and IoU of binarised masks of two ``(K, D, H, W)`` logit tensors."""
    a, b = ours > 0, ref > 0
    inter = int((a & b).sum())
    union = int((a | b).sum())
    iou = inter / union if union else 1.0
    per_object = []
    for k in range(ours.shape[0]):
        u = int((a[k] | b[k]).sum())
        per_object.append(int((a[k] & b[k]).sum()) / u if u else 1.0)
    return {
        "max_abs_logit_diff": float((ours - ref).abs().max()),
        "mask_iou": iou,
        "mask_iou_per_object": per_object,
        "foreground_voxels_ours": int(a.sum()),
        "foreground_voxels_reference": int(b.sum()),
        "masks_agree": bool(union == 0 or iou >= AGREE_IOU),
    }


# ---------------------------------------------------------------- CLI
def main(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int | None = None,
    depth: int | str | tuple = 32,
    support: int = 4,
    objects: int = 2,
    device: str | None = None,
    warmup: int = 1,
    repeats: int = 1,
    seed: int = 0,
    encoder_batch_size: int | None = None,
    precision: str = "fp32",
    compile: str = "off",
    compile_backend: str = "inductor",
    reference: str = "plain",
    reference_precision: str = "fp32",
    encoder_backend: str = "torch",
) -> dict[str, Any]:
    """Time in-context segmentation of a generated volume, model_core vs ``SAM2VideoPredictor``.

    Args:
        preset: a model_core preset (e.g. ``sam2.1_hiera_tiny``, ``tiny``).
        image_size: model input size H = W (default: the preset's, 512 or 128 for ``tiny``).
        depth: D, slices of the query volume; several (``16,64,256``) run one after the other in this
            process, each with its warm-up, so a compiled model compiles once (one JSON line per depth).
        support: S, support slices.
        objects: K, objects segmented at once (1 to 3: the phantom's blob, tube, block).
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: cuda if available, else cpu).
        warmup: untimed runs of each side before timing.
        repeats: timed runs of each side (the best time is reported).
        seed: seed of the weights (``torch.manual_seed``) and of the data generator.
        encoder_batch_size: slices per image-encoder batch of model_core (default: 8 on
            CUDA, 1 on CPU; the predictor always encodes one frame at a time).
        precision: model_core's precision, ``fp32`` (default), ``bf16`` or ``auto`` (bf16 where
            the device computes it natively).
        compile: ours under ``torch.compile`` (:mod:`model_core.modeling.compile`): ``off`` (default),
            ``default``, ``reduce-overhead`` or ``max-autotune`` (sam2's ``vos_optimized`` mode).
        compile_backend: ``torch.compile``'s backend for ours and for the ``vos`` reference
            (``inductor``; ``eager`` for a quick CPU check of the compiled code path).
        reference: ``plain`` (``SAM2VideoPredictor``) or ``vos`` (``build_sam2_video_predictor(...,
            vos_optimized=True)``: Meta's compiled predictor).
        reference_precision: ``fp32`` (default) or ``bf16`` (the reference under bfloat16 autocast, as
            sam2's own ``benchmark.py`` runs it).
        encoder_backend: ours' image-encoder backend (:mod:`model_core.modeling.encoders`).

    Returns:
        The JSON record (also printed as the last line), or one per depth.
    """
    from model_core.modeling.compile import compile_network
    from model_core.modeling.precision import autocast, cpu_bf16_capability, resolve_precision
    from model_core.modeling.presets import PRESETS, build_icl_sam2
    from model_core.predictor import VolumePredictor
    from model_core.reference import build_reference_predictor, reference_in_context

    depths = [
        int(d)
        for d in (
            str(depth).strip("()[] ").split(",")
            if isinstance(depth, str)
            else (depth if isinstance(depth, (list, tuple)) else [depth])
        )
    ]
    if min(depths) < 1 or int(support) < 1 or not 1 <= int(objects) <= len(PHANTOM_LABELS):
        raise ValueError(
            f"depth and support must be at least 1 and objects 1 to {len(PHANTOM_LABELS)} "
            f"(the phantom's structures: {', '.join(PHANTOM_LABELS)})."
        )
    if int(repeats) < 1 or int(warmup) < 0:
        raise ValueError("repeats must be at least 1 and warmup at least 0.")
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(sorted(PRESETS))}.")
    support, objects, warmup, repeats = map(int, (support, objects, warmup, repeats))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    resolved = resolve_precision(precision, dev)
    if reference not in ("plain", "vos") or reference_precision not in ("fp32", "bf16"):
        raise ValueError(
            f"reference must be plain or vos and reference_precision fp32 or bf16, got {reference!r}, "
            f"{reference_precision!r}."
        )

    torch.manual_seed(seed)
    # the reference is built from the float32 weights (the network's precision only sets autocast)
    model = build_icl_sam2(
        preset,
        image_size=image_size,
        device=dev,
        encoder_batch_size=encoder_batch_size,
        precision=resolved,
        encoder_backend=encoder_backend,
    )
    compile_network(model, compile, backend=compile_backend)
    predictor = build_reference_predictor(model, vos_optimized=reference == "vos", compile_backend=compile_backend)
    size = model.image_size
    records = []
    for depth in depths:  # one process for every depth: a compiled model compiles once
        sup_images, sup_masks, query = make_inputs(size, depth, support, objects, seed)

        def run_ours(sup_images=sup_images, sup_masks=sup_masks, query=query, depth=depth) -> torch.Tensor:
            memory = model.build_support_memory(sup_images, sup_masks)
            ours = VolumePredictor(model)
            state = ours.init_state(query, memory)
            out = torch.zeros(objects, depth, size, size, dtype=torch.float32)
            for z, logits in ours.propagate(state, direction="forward"):
                out[:, z] = logits[:, 0].float().cpu()
            return out

        def run_reference(sup_images=sup_images, sup_masks=sup_masks, query=query) -> torch.Tensor:
            with autocast(reference_precision, dev):  # sam2's benchmark.py runs its predictor under bf16 autocast
                return reference_in_context(predictor, sup_images, sup_masks, query).float().cpu()

        ours = _bench(run_ours, dev, warmup, repeats)
        ref = _bench(run_reference, dev, warmup, repeats)
        check = compare(ours["output"], ref["output"])

        def side(r: dict[str, Any], depth=depth) -> dict[str, Any]:
            return {
                "seconds": r["seconds"],
                "all_seconds": r["all_seconds"],
                "slices_per_s": depth / r["seconds"],
                "peak_mib": r["peak_mib"],
            }

        record = {
            "preset": preset,
            "image_size": size,
            "depth": depth,
            "support": support,
            "objects": objects,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "warmup": warmup,
            "repeats": repeats,
            "seed": seed,
            "encoder_batch_size": model.encoder_batch_size,
            "precision": resolved,
            "precision_requested": precision,
            "reference_precision": reference_precision,
            "compile": model.compiled,
            "compile_backend": compile_backend if model.compiled != "off" or reference == "vos" else None,
            "reference_predictor": "SAM2VideoPredictorVOS" if reference == "vos" else "SAM2VideoPredictor",
            "encoder_backend": model.describe_encoder(),
            "cpu_bf16": {k: cpu_bf16_capability()[k] for k in ("amx_bf16", "avx512_bf16", "processor")},
            "memory_measure": "cuda max_memory_allocated above baseline"
            if dev.type == "cuda"
            else "peak RSS above baseline",
            "ours": side(ours),
            "reference": side(ref),
            "time_ratio_reference_over_ours": ref["seconds"] / ours["seconds"],
            "memory_ratio_reference_over_ours": (ref["peak_mib"] / ours["peak_mib"]) if ours["peak_mib"] > 0 else None,
            **check,
        }
        _print_table(record)
        print(json.dumps(record))
        records.append(record)
    return records[0] if len(records) == 1 else records


def _print_table(r: dict[str, Any]) -> None:
    """Human-readable summary of a benchmark record."""
    print()
    print(
        f"preset {r['preset']} | image size {r['image_size']} | D={r['depth']} S={r['support']} K={r['objects']} "
        f"| device {r['device']} ({r['device_name']}, {r['torch_threads']} threads) "
        f"| warmup {r['warmup']}, best of {r['repeats']}"
    )
    cpu = r["cpu_bf16"]
    print(
        f"precision: ours {r['precision']} (asked {r['precision_requested']}), reference {r['reference_precision']} "
        f"| CPU {cpu['processor']}: AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}, "
        f"AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}"
    )
    header = f"{'':<30}{'wall time (s)':>15}{'slices/s':>12}{'peak mem (MiB)':>17}"
    print(header)
    print("-" * len(header))
    ours = f"ours ({r['precision']}{', compiled' if r['compile'] != 'off' else ''})"
    for name, key in ((ours, "ours"), (r["reference_predictor"], "reference")):
        s = r[key]
        print(f"{name:<30}{s['seconds']:>15.3f}{s['slices_per_s']:>12.2f}{s['peak_mib']:>17.1f}")
    mem_ratio = r["memory_ratio_reference_over_ours"]
    mem_text = "n/a" if mem_ratio is None else f"{mem_ratio:.2f}x"
    print(f"{'reference / ours':<30}{r['time_ratio_reference_over_ours']:>14.2f}x{'':>12}{mem_text:>17}")
    print(
        f"max |logit diff| {r['max_abs_logit_diff']:.3g} | mask IoU {r['mask_iou']:.5f} "
        f"(per object {', '.join(f'{v:.4f}' for v in r['mask_iou_per_object'])}) "
        f"| foreground voxels ours {r['foreground_voxels_ours']}, reference {r['foreground_voxels_reference']}"
    )
    print(f"masks agree: {'yes' if r['masks_agree'] else 'no'}")


if __name__ == "__main__":
    # fire would print the returned record again; the JSON line above is the record
    fire.Fire(main, serialize=lambda _: None)
