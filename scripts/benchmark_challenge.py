"""LiteMedSAM at the CVPR 2024 laptop challenge's pace: seconds per 3D case through ``icl-sam2 challenge infer``.

    # 5 generated cases, structures over 40 to 80 slices of 256 x 256, on 2 cores; the median per configuration
    PYTHONPATH=$PWD python scripts/benchmark_challenge.py --cores 2 --output challenge.json
    # a quick check: one short case, two configurations
    PYTHONPATH=$PWD python scripts/benchmark_challenge.py --cases 1 --extent 4,4 --configs torch:1,onnxruntime:2

Cases come from :func:`model_core.medsam_lite.phantom_cases.write_phantom_cases` (the challenge's
npz form: ``imgs`` uint8 ``(D, H, W)``, one 3D box per case from its ground truth, ``gts`` beside).
Each configuration ``backend:batch[:step]`` runs the real command in its own process,

    icl-sam2 challenge infer --input_dir imgs --output_dir segs --encoder_backend BACKEND --encoder_batch_size BATCH \
        --slice_step STEP

(``taskset`` to the first ``cores`` CPUs and as many threads, when ``--cores`` is given), whose
``timing.csv`` holds each case's wall time from reading its npz to its written result, the model
loaded and warmed up (export and compilation happen before the first case; ``auto`` measures
once per machine and caches its choice). Per configuration the table gives the median, mean
and largest seconds per case, the mean DSC against the ground truth and the smallest Dice
against the first configuration (the slow path, ``torch:1`` by default): a faster encoder must
not change the answers; a ``slice_step`` above 1 fills slices by interpolation, and the two
Dice columns say what that costs. The CPU is named; ``--output`` writes the table as JSON.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fire
import numpy as np

from model_core.io.files import atomic_path
from model_core.medsam_lite.model import dice
from model_core.medsam_lite.phantom_cases import write_phantom_cases
from model_core.modeling.precision import cpu_bf16_capability

ROOT = Path(__file__).resolve().parents[1]


def _infer(imgs: Path, segs: Path, backend: str, batch: int, step: int, precision: str, cores: int | None) -> dict:
    command = [sys.executable, "-m", "icl_sam2", "challenge", "infer", "--input_dir", str(imgs)]
    command += ["--output_dir", str(segs), "--encoder_backend", backend, "--encoder_batch_size", str(batch)]
    command += ["--precision", precision, "--slice_step", str(step)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if cores:
        command = ["taskset", "-c", f"0-{int(cores) - 1}", *command]
        env.update(OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(segs / "timing.csv") as f:
        return {row["case"]: float(row["seconds"]) for row in csv.DictReader(f) if row["status"] == "ok"}


def main(
    cases: int = 5,
    extent: str | tuple = (40, 80),
    size: int = 256,
    configs: str | tuple = "torch:1,auto:1,auto:4,auto:1:2,auto:1:3",
    precision: str = "auto",
    cores: int | None = None,
    seed: int = 0,
    workdir: str | None = None,
    output: str | None = None,
) -> dict:
    """Args:
    cases, extent, size, seed: the generated cases (``extent``: ``lo,hi`` slices the structure spans).
    configs: comma-separated ``backend:batch`` or ``backend:batch:step`` (``encoder_backend``,
        ``encoder_batch_size`` and ``slice_step``, default 1); the first is the reference the others' answers
        are compared with.
    precision: ``--precision`` of the command (``auto``: bf16 where the CPU has it, which lets ``auto`` weigh the
        bfloat16 backends); the first configuration always runs in fp32 (the slow path).
    cores: run on the first N CPUs only (``taskset``), N threads; default all.
    workdir: keep the cases and results here (default: a temporary folder).
    output: JSON file to write.
    """
    lo, hi = (int(v) for v in (extent.split(",") if isinstance(extent, str) else extent))
    entries = [c.strip() for c in (configs.split(",") if isinstance(configs, str) else configs) if c.strip()]
    parsed = []
    for entry in entries:
        backend, *numbers = entry.split(":")
        if len(numbers) not in (1, 2) or not all(n.isdigit() and int(n) >= 1 for n in numbers):
            raise ValueError(
                f"configs entries are backend:batch or backend:batch:step (e.g. auto:4, auto:1:3), got {entry!r}."
            )
        parsed.append((backend, int(numbers[0]), int(numbers[1]) if len(numbers) == 2 else 1))
    if not parsed:
        raise ValueError("configs names no configuration.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir or tmp)
        write_phantom_cases(folder, cases=cases, extent=(lo, hi), size=size, seed=seed)
        truth = {p.stem: np.load(p)["gts"] > 0 for p in sorted((folder / "gts").glob("*.npz"))}
        depths = {name: int(mask.shape[0]) for name, mask in truth.items()}
        spans = {name: int(mask.any(axis=(1, 2)).sum()) for name, mask in truth.items()}
        rows, reference = [], None
        for i, (backend, batch, step) in enumerate(parsed):
            segs = folder / f"segs_{i}_{backend}_{batch}_{step}"
            seconds = _infer(folder / "imgs", segs, backend, batch, step, "fp32" if i == 0 else precision, cores)
            answers = {name: np.load(segs / f"{name}.npz")["segs"] > 0 for name in truth}
            reference = reference or answers
            times = [seconds[name] for name in truth]
            rows.append(
                {
                    "config": f"{backend}:{batch}" + (f":{step}" if step > 1 else ""),
                    "precision": "fp32" if i == 0 else precision,
                    "seconds_per_case": {name: seconds[name] for name in truth},
                    "median_s": statistics.median(times),
                    "mean_s": statistics.mean(times),
                    "max_s": max(times),
                    "dsc_vs_truth_mean": statistics.mean(dice(answers[n], truth[n]) for n in truth),
                    "dice_vs_reference_min": min(dice(answers[n], reference[n]) for n in truth),
                }
            )
    cpu = cpu_bf16_capability()
    report = {
        "cpu": {k: cpu[k] for k in ("processor", "amx_bf16", "avx512_bf16")},
        "cores": cores or os.cpu_count(),
        "cases": {name: {"slices": depths[name], "structure_slices": spans[name]} for name in truth},
        "size": size,
        "rows": rows,
    }
    print(
        f"\nCPU: {cpu['processor']} (AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}, AVX512-BF16 "
        f"{'yes' if cpu['avx512_bf16'] else 'no'}), {report['cores']} cores; {len(truth)} cases of {size}x{size}, "
        f"structures over {min(spans.values())}-{max(spans.values())} slices of {min(depths.values())}-"
        f"{max(depths.values())}; seconds per case from icl-sam2 challenge infer's timing.csv"
    )
    header = (
        f"{'backend:batch[:step]':<22}{'precision':>10}{'median s':>10}{'mean s':>9}{'max s':>8}{'DSC':>7}"
        f"{'Dice vs 1st':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['config']:<22}{r['precision']:>10}{r['median_s']:>10.2f}{r['mean_s']:>9.2f}{r['max_s']:>8.2f}"
            f"{r['dsc_vs_truth_mean']:>7.3f}{r['dice_vs_reference_min']:>13.4f}"
        )
    if output:
        with atomic_path(output) as tmp_file, open(tmp_file, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {output}")
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
