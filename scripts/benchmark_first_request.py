"""First-request latency with automatic scoring on: MONAI Label's scoring schedule against the app's.

    python scripts/benchmark_first_request.py --output first_request.json
    python scripts/benchmark_first_request.py --variants "['immediate:512','idle:512']" --volumes 8

For each ``scoring:image_size`` variant the real server starts (Hiera-tiny by default, random
weights, CPU; ``MONAI_LABEL_AUTO_UPDATE_SCORING`` true, MONAI Label's default) on a phantom study
of ``volumes`` volumes, one labelled. As soon as ``/info`` answers the client times the first
in-context segmentation of an unlabelled volume (the first request), then asks Next Sample three
times, then times a first click on another volume; at the end it counts the scoring runs the
server started. ``--conf scoring immediate`` is MONAI Label's own behaviour (a run at start-up and
one per Next Sample, at the server's priority: "before"); ``idle`` is the app's default ("after":
no run at start-up, runs only when idle and when the scores changed, at idle CPU priority).

The CPU (model name, bfloat16 flags) and the load average before each run are printed and written;
a run on a machine whose load average exceeds half its cores is labelled LOADED.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import fire
import requests

from icl_sam2.servers import MonaiLabelServer
from model_core.io.phantoms import PHANTOM_LABELS, write_phantom_study
from model_core.modeling.precision import cpu_bf16_capability


def _post(url: str, **kwargs) -> tuple[float, requests.Response]:
    start = time.perf_counter()
    response = requests.post(url, timeout=3600, **kwargs)
    return round(time.perf_counter() - start, 2), response


def _machine() -> dict:
    cpu = cpu_bf16_capability()
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return {
        "processor": cpu["processor"],
        "amx_bf16": cpu["amx_bf16"],
        "avx512_bf16": cpu["avx512_bf16"],
        "cores": cores,
        "load_average": round(load, 2),
        "loaded": load > cores / 2,
    }


def run_variant(
    studies: Path, work: Path, scoring: str, image_size: int, preset: str, device: str, click: list[int]
) -> dict:
    """One server start: the first request, three Next Samples, a first click, the scoring runs started."""
    row = {"scoring": scoring, "image_size": image_size, "preset": preset, "device": device, **_machine()}
    server = MonaiLabelServer(
        studies,
        {
            "preset": preset,
            "image_size": str(image_size),
            "device": device,
            "labels": json.dumps(dict(PHANTOM_LABELS)),
            "window": "[0, 1]",
            "checkpoint": str(work / "none.pt"),
            "scoring": scoring,
        },
        work / f"server_{scoring}_{image_size}.log",
        env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"},
        timeout=600,
    )
    try:
        row["first_request_s"], response = _post(f"{server.url}/infer/icl_sam2", params={"image": "case1"}, data={})
        assert response.status_code == 200, response.text[:500]
        for _ in range(3):
            _, response = _post(f"{server.url}/activelearning/random", json={})
            assert response.status_code == 200, response.text[:500]
        row["click_after_next_samples_s"], response = _post(
            f"{server.url}/infer/icl_sam2_interactive",
            params={"image": "case2"},
            data={"params": json.dumps({"foreground": [click], "label": "blob"})},
        )
        assert response.status_code == 200, response.text[:500]
        runs = requests.get(f"{server.url}/scoring/", params={"all": "true"}, timeout=60)
        row["scoring_runs"] = len(runs.json()) if runs.status_code == 200 else 0
    finally:
        server.stop()
    return row


def main(
    variants=("immediate:512", "idle:512", "idle:256"),
    preset: str = "sam2.1_hiera_tiny",
    volumes: int = 6,
    shape=(96, 96, 24),
    device: str = "cpu",
    output: str | None = None,
) -> list[dict]:
    """Args:
    variants: ``scoring:image_size`` entries (scoring: immediate, idle or off).
    preset: the network preset served.
    volumes: phantom volumes in the study (one labelled; the others are what scoring segments).
    shape: ``(i, j, k)`` of each volume.
    device: ``cpu`` or ``cuda``.
    output: optional JSON file for the rows.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        write_phantom_study(studies, tuple(shape), cases=int(volumes), labelled=1)
        for entry in variants:
            scoring, size = str(entry).split(":")
            centre = [int(n) // 2 for n in shape]
            rows.append(run_variant(studies, Path(tmp), scoring, int(size), preset, device, centre))
            print(json.dumps(rows[-1]), flush=True)
    machine = rows[0] if rows else _machine()
    loaded = any(r["loaded"] for r in rows)
    print(
        f"\nFirst request with automatic scoring on: {preset}, {volumes} volumes of {shape[0]}x{shape[1]}x{shape[2]}, "
        f"{device}; CPU {machine['processor']} ({machine['cores']} cores; AMX-BF16 {machine['amx_bf16']}, "
        f"AVX512-BF16 {machine['avx512_bf16']})"
    )
    if loaded:
        print(f"LOADED MACHINE: load averages {[r['load_average'] for r in rows]} on {machine['cores']} cores")
    print(
        f"  {'scoring':<10} {'size':>5} {'first in-context (s)':>21} {'click after Next Samples (s)':>29} {'runs':>5}"
    )
    for r in rows:
        print(
            f"  {r['scoring']:<10} {r['image_size']:>5} {r['first_request_s']:>21.2f} "
            f"{r['click_after_next_samples_s']:>29.2f} {r['scoring_runs']:>5}"
        )
    if output:
        Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    fire.Fire(main)
