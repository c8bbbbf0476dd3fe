"""Encoder and decoder times on CPU: torch fp32, torch bf16 autocast and onnxruntime, for SAM2 and LiteMedSAM.

    python scripts/benchmark_onnx.py --output onnx_benchmark.json
    python scripts/benchmark_onnx.py --models sam2 --preset tiny --image_size 128 --runs 3

One image (batch 1) and one box prompt; each figure is the median of ``runs`` timed runs
after ``warmup`` untimed ones. SAM2 runs a model_core preset with random weights (the
speed does not depend on them); LiteMedSAM its shipped weights at 256 px. torch bf16 is
timed only where the CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16) unless
``--bf16 force``; elsewhere the table says "not supported on this CPU". Prints one table;
``--output`` also writes the figures as JSON.
"""

from __future__ import annotations

import json
import tempfile

import fire
import torch

from model_core.export.onnx import medsam_lite_slice_path, sam2_prompts, sam2_slice_path
from model_core.export.runtime import time_slice_path
from model_core.io.files import atomic_path
from model_core.modeling.precision import cpu_bf16_capability

BACKENDS = ("torch fp32", "torch bf16", "onnxruntime")


def _cell(result: dict, part: str, backend: str) -> str:
    times = result[part]
    value = times.get(backend, times.get(f"{backend} (emulated)"))
    if value is None:
        return result["skipped"].get(backend, "-")
    return f"{value:.1f}" + (" (emulated)" if f"{backend} (emulated)" in times else "")


def main(
    models: str | tuple = "sam2,medsam_lite",
    preset: str = "sam2.1_hiera_tiny",
    image_size: int = 512,
    runs: int = 10,
    warmup: int = 2,
    bf16: str = "native",
    threads: int | None = None,
    output: str | None = None,
    workdir: str | None = None,
) -> None:
    """Args:
    models: comma-separated, from ``sam2`` and ``medsam_lite``.
    preset, image_size: the SAM2 model (random weights).
    runs, warmup: timed and untimed runs per figure (the median is reported).
    bf16: ``native`` (time bf16 only where the CPU has it), ``force`` (also emulated) or ``off``.
    threads: CPU threads for torch and onnxruntime alike (default: each library's own).
    output: JSON file to write.
    workdir: where the ONNX files go (default: a temporary folder, removed after).
    """
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m.strip()]
    unknown = [m for m in names if m not in ("sam2", "medsam_lite")]
    if unknown or not names:
        raise ValueError(f"models must name sam2 and/or medsam_lite, got {models!r}.")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or tmp
        for name in names:
            if name == "sam2":
                from model_core.modeling.presets import build_icl_sam2

                torch.manual_seed(0)
                path = sam2_slice_path(build_icl_sam2(preset, image_size=image_size), name=preset)
                size = path.image_size
                prompts = sam2_prompts(box=[size * 0.25, size * 0.3, size * 0.7, size * 0.8])
            else:
                path = medsam_lite_slice_path()
                prompts = {"boxes": torch.tensor([[64.0, 76.8, 179.2, 204.8]])}
            results[path.name] = time_slice_path(
                path, folder, prompts, runs=runs, warmup=warmup, bf16=bf16, threads=threads
            )
            results[path.name].pop("files")
    capability = cpu_bf16_capability()
    report = {"cpu": capability, "results": results}
    print(
        f"\nCPU: {capability['processor']} (bf16 native: {capability['bf16']}), "
        f"torch threads {torch.get_num_threads()}, median of {runs} runs after {warmup} warm-up, ms"
    )
    header = f"{'model':<26}{'part':<9}" + "".join(f"{b:>28}" for b in BACKENDS) + f"{'ORT speed-up':>14}"
    print(header)
    print("-" * len(header))
    for model, result in results.items():
        for part, label in (("encoder_ms", "encoder"), ("decoder_ms", "decoder")):
            speedup = result[part]["torch fp32"] / result[part]["onnxruntime"]
            cells = "".join(f"{_cell(result, part, b):>28}" for b in BACKENDS)
            print(f"{model + ' @' + str(result['image_size']):<26}{label:<9}{cells}{speedup:>13.2f}x")
    for model, result in results.items():
        print(
            f"{model}: onnxruntime vs torch fp32 logits, max abs diff {result['max_abs_logit_diff_onnx_vs_torch']:.2e}"
        )
    if output:
        with atomic_path(output) as tmp_file, open(tmp_file, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {output}")


if __name__ == "__main__":
    fire.Fire(main)
