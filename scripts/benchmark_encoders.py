"""Image-encoder time per backend (``encoder_backend``) on this CPU, and what ``auto`` chooses.

    PYTHONPATH=$PWD python scripts/benchmark_encoders.py --output encoders.json          # the three models
    PYTHONPATH=$PWD python scripts/benchmark_encoders.py --models tiny --runs 2          # a quick check

Models: ``hiera_tiny_512`` (SAM2.1 Hiera-tiny at 512 px, random weights: the speed does not
depend on them), ``tiny`` (the tiny preset at its 128 px) and ``medsam_lite`` (LiteMedSAM's
TinyViT at 256 px, its shipped weights). Backends (:mod:`model_core.modeling.encoders`):
``torch`` (fp32), ``torch-bf16``, ``onnxruntime``, ``openvino``, ``openvino-bf16``; the bf16
ones only where the CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16), a runtime only
where it is installed; a skipped cell says why.

Per model and backend: milliseconds per slice (median of ``runs`` timed calls of ``batch``
slices after ``warmup`` untimed ones), the first call's seconds (the ONNX export, cached on
disk by weights, and the runtime's compilation happen there), and the largest absolute
difference of the features from torch fp32. ``auto`` is then measured afresh
(``remeasure``: the choice cached for this machine is replaced) for a network in
``--precision`` (``auto``: bf16 where native), and its choice is printed. One table is
printed; ``--output`` writes the figures as JSON. The CPU is named in both.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import fire
import torch

from model_core.export.encoder_choice import AutoImageEncoder, lite_medsam_backend
from model_core.export.encoders import runtime_available, runtime_version
from model_core.io.files import atomic_path
from model_core.medsam_lite.backends import load_package_network
from model_core.modeling.encoders import BF16_ENCODER_BACKENDS, build_encoder_backend, check_encoder_backend
from model_core.modeling.precision import cpu_bf16_capability, resolve_precision
from model_core.modeling.presets import build_icl_sam2

MODELS = {"hiera_tiny_512": ("sam2.1_hiera_tiny", 512), "tiny": ("tiny", 128), "medsam_lite": (None, 256)}
BACKENDS = ("torch", "torch-bf16", "onnxruntime", "openvino", "openvino-bf16")


def _skip_reason(name: str) -> str | None:
    if name in BF16_ENCODER_BACKENDS and not cpu_bf16_capability()["bf16"]:
        return "no native bf16 on this CPU"
    if name.startswith("openvino") and not runtime_available("openvino"):
        return "openvino not installed"
    if name == "onnxruntime" and not runtime_available("onnxruntime"):
        return "onnxruntime not installed"
    return None


def _time(fn: Callable[[], Any], runs: int, warmup: int, slices: int) -> dict[str, Any]:
    with torch.inference_mode():
        start = time.perf_counter()
        out = fn()
        first = time.perf_counter() - start
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return {"ms_per_slice": 1e3 * statistics.median(times) / slices, "first_call_s": first, "output": out}


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _bench_sam2(preset, size, backends, runs, warmup, batch, cache_dir, precision) -> dict[str, Any]:
    torch.manual_seed(0)
    network = build_icl_sam2(preset, image_size=size, encoder_batch_size=batch)  # fp32: the reference
    pixels = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) - 0.45) / 0.23
    cells, reference = {}, None
    for name in backends:
        if _skip_reason(name):
            cells[name] = {"skipped": _skip_reason(name)}
            continue
        backend = build_encoder_backend(name, cache_dir=cache_dir)
        result = _time(lambda backend=backend: backend.encode(network, pixels), runs, warmup, batch)
        out = result.pop("output")
        reference = out if name == "torch" else reference
        cells[name] = {**result, "max_abs_diff_vs_torch_fp32": None if reference is None else _diff(out, reference)}
    network.precision = precision
    auto = AutoImageEncoder(cache_dir=cache_dir, remeasure=True)
    with torch.inference_mode():
        auto.resolve(network)
    return {"backends": cells, "auto": auto.describe(), "auto_precision": network.compute_precision}


def _bench_lite(backends, runs, warmup, batch, cache_dir, precision) -> dict[str, Any]:
    network = load_package_network()
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    cells, reference = {}, None
    for name in backends:
        if _skip_reason(name):
            cells[name] = {"skipped": _skip_reason(name)}
            continue
        backend = lite_medsam_backend(name, network=network, cache_dir=cache_dir, batch_size=batch)
        result = _time(lambda backend=backend: backend.encode(images), runs, warmup, batch)
        out = result.pop("output")
        reference = out if name == "torch" else reference
        cells[name] = {**result, "max_abs_diff_vs_torch_fp32": None if reference is None else _diff([out], [reference])}
    resolved = resolve_precision(precision, "cpu")
    auto = lite_medsam_backend(
        "auto", network=network, precision=resolved, cache_dir=cache_dir, batch_size=batch, remeasure=True
    )
    return {"backends": cells, "auto": auto.describe(), "auto_precision": resolved}


def main(
    models: str | tuple = "hiera_tiny_512,tiny,medsam_lite",
    backends: str | tuple = ",".join(BACKENDS),
    precision: str = "auto",
    runs: int = 5,
    warmup: int = 1,
    batch: int = 1,
    threads: int | None = None,
    cache_dir: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Args:
    models: comma-separated, from ``hiera_tiny_512``, ``tiny``, ``medsam_lite``.
    backends: comma-separated backends to time (default all five).
    precision: the precision ``auto`` chooses for (``auto``: bf16 where native, else fp32).
    runs, warmup: timed and untimed calls per cell (the median is reported).
    batch: slices per call (the exported backends are exported at this batch).
    threads: torch threads (the exported runtimes use as many); default torch's.
    cache_dir: exported encoders and auto's choice (default: ICL_SAM2_CACHE_DIR or ~/.cache/icl-sam2).
    output: JSON file to write.
    """
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise ValueError(f"models must name some of {', '.join(MODELS)}, got {models!r}.")
    chosen = [check_encoder_backend(b) for b in (backends.split(",") if isinstance(backends, str) else backends)]
    if "auto" in chosen or "torch" not in chosen:
        raise ValueError("backends must include torch (the reference) and not auto (always measured).")
    if int(runs) < 1 or int(warmup) < 0 or int(batch) < 1:
        raise ValueError("runs and batch must be at least 1, warmup at least 0.")
    if threads is not None:
        torch.set_num_threads(int(threads))
    results = {}
    for name in names:
        preset, size = MODELS[name]
        if preset is None:
            results[name] = _bench_lite(chosen, int(runs), int(warmup), int(batch), cache_dir, precision)
        else:
            results[name] = _bench_sam2(preset, size, chosen, int(runs), int(warmup), int(batch), cache_dir, precision)
        results[name]["image_size"] = size
    cpu = cpu_bf16_capability()
    report = {
        "cpu": cpu,
        "torch": torch.__version__,
        "onnxruntime": runtime_version("onnxruntime"),
        "openvino": runtime_version("openvino"),
        "threads": torch.get_num_threads(),
        "runs": int(runs),
        "warmup": int(warmup),
        "batch": int(batch),
        "results": results,
    }
    _print_table(report, chosen)
    if output:
        with atomic_path(output) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {output}")
    return report


def _print_table(report: dict[str, Any], backends: list[str]) -> None:
    cpu = report["cpu"]
    print(
        f"\nCPU: {cpu['processor']} (AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}, "
        f"AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}), {report['threads']} threads, batch {report['batch']}, "
        f"median of {report['runs']} runs; ms per slice [first call s; max |diff| vs torch fp32]"
    )
    header = f"{'model':<18}" + "".join(f"{b:>26}" for b in backends) + f"{'auto chooses':>28}"
    print(header)
    print("-" * len(header))
    for model, result in report["results"].items():
        cells = []
        for b in backends:
            c = result["backends"][b]
            if "skipped" in c:
                cells.append(f"{'(' + c['skipped'] + ')':>26}"[-26:])
                continue
            diff = c["max_abs_diff_vs_torch_fp32"]
            cells.append(f"{c['ms_per_slice']:.1f} [{c['first_call_s']:.1f}s; {diff:.0e}]".rjust(26))
        auto = result["auto"]
        choice = f"{auto['chosen']} ({result['auto_precision']})"
        print(f"{model + ' @' + str(result['image_size']):<18}" + "".join(cells) + f"{choice:>28}")


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
