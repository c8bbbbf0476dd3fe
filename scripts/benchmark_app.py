"""Latency and Dice of the MONAI Label app through the real server and client, on a 256 x 256 x 64 phantom study.

    python scripts/benchmark_app.py                                    # tiny at 64 and Hiera-tiny at 512, CPU
    python scripts/benchmark_app.py --presets "['tiny:64']" --checkpoints "{'tiny:64': 'model.pt'}"
    python scripts/benchmark_app.py --presets "['sam2.1_hiera_tiny:512']" --device cuda

Each preset runs with weights that segment the study: ``--checkpoints`` names them per entry, else a
model is trained on phantoms through the bundle (:func:`icl_sam2.demo.train_phantom_model`,
``--train_steps``, kept under ``--cache_dir`` and reused; the tiny preset at 64 px is then the
tests' trained tiny model). A pass that stops where the structure ends is fast only if it stops
at the right place, so every answer's Dice against the phantom's truth stands beside its time,
with the slices encoded and propagated.

The server is started on a study of three volumes (one labelled) and the client times:
in-context segmentation of ``case1`` (every structure; Dice averaged over them), a first
interactive click on ``--label`` in ``case2`` (middle slice of its extent; its slices are
encoded as propagation reaches them) and a follow-up click two slices away (incremental).
A second server runs the exact mode (``--conf stop_after_absent 0 incremental false``): the
full pass over the volume for the first click, and every click replayed over it for the
follow-up. One table is printed and, with ``--output``, written as JSON; the CPU is named in both.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice
from monailabel.client import MONAILabelClient

from icl_sam2.demo import train_phantom_model
from icl_sam2.servers import MonaiLabelServer
from model_core.io.phantoms import PHANTOM_LABELS, phantom_study_case, structure_click, write_phantom_study
from model_core.modeling.precision import cpu_bf16_capability


def _dice(label_file: str, truth: np.ndarray, values: dict[str, int]) -> float:
    """Mean Dice over ``values`` (``{name: value}``) of an answer against the truth label map, in the image's voxels."""
    pred = np.asarray(nib.load(label_file).dataobj).round().astype(np.int64)
    if pred.shape != truth.shape:
        raise ValueError(f"The answer {label_file} is {pred.shape}, the image {truth.shape}.")
    scores = []
    for value in values.values():
        pair = [torch.from_numpy(np.ascontiguousarray(a == value))[None, None].float() for a in (pred, truth)]
        scores.append(float(compute_dice(*pair, include_background=True, ignore_empty=False)))
    return round(float(np.mean(scores)), 4)


def _timed(client, model: str, image: str, params: dict, truth: np.ndarray, values: dict[str, int]) -> dict:
    start = time.perf_counter()
    label_file, info = client.infer(model, image, params)
    seconds = time.perf_counter() - start
    info = json.loads(info) if isinstance(info, (bytes, str)) else info
    return {
        "seconds": round(seconds, 3),
        "dice": _dice(label_file, truth, values),
        "encoded": info["encoded_slices"],
        "propagated": info.get("propagated_slices"),
        "mode": info.get("mode"),
    }


def main(
    presets=("tiny:64", "sam2.1_hiera_tiny:512"),
    shape=(256, 256, 64),
    device: str = "cpu",
    checkpoints: dict | None = None,
    train_steps: int = 400,
    cache_dir: str = "~/.cache/icl_sam2_benchmarks",
    label: str = "blob",
    output: str | None = None,
) -> None:
    """Prints one table; with ``output`` the same figures go to a JSON file.

    Args:
        presets: ``preset:image_size`` entries.
        shape: ``(i, j, k)`` of each volume (k: slices).
        device: ``cpu`` or ``cuda``.
        checkpoints: ``{"preset:image_size": path}``; entries without one are trained on phantoms once.
        train_steps: training iterations of a model trained here.
        cache_dir: where trained weights are kept between runs.
        label: the structure clicked (blob, tube or block).
        output: optional JSON file for the rows.
    """
    if label not in PHANTOM_LABELS:
        raise ValueError(f"--label must be one of {sorted(PHANTOM_LABELS)}, got {label!r}.")
    shape = tuple(int(v) for v in shape)
    checkpoints = dict(checkpoints or {})
    truth = {case: phantom_study_case(case, shape)[1] for case in (1, 2)}
    clicked = {label: PHANTOM_LABELS[label]}
    clicks = [structure_click(truth[2], clicked[label]), structure_click(truth[2], clicked[label], offset=2)]
    extent = np.nonzero((truth[2] == clicked[label]).reshape(-1, shape[2]).any(0))[0]
    cpu = cpu_bf16_capability()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        write_phantom_study(studies, shape)
        for entry in presets:
            preset, size = entry.split(":")
            checkpoint = checkpoints.get(entry)
            if checkpoint is None:
                folder = Path(cache_dir).expanduser() / f"{preset}_{int(size)}_{int(train_steps)}steps"
                checkpoint = train_phantom_model(folder, preset, int(size), int(train_steps))
            row = {
                "preset": entry,
                "checkpoint": str(Path(checkpoint).resolve()),
                "trained_here": entry not in checkpoints,
            }
            for exact in (False, True):
                conf = {
                    "preset": preset,
                    "image_size": size,
                    "device": device,
                    "labels": json.dumps(dict(PHANTOM_LABELS)),
                    "window": "[0, 1]",
                    "checkpoint": row["checkpoint"],
                    **({"incremental": "false", "stop_after_absent": "0"} if exact else {}),
                }
                server = MonaiLabelServer(studies, conf, Path(tmp) / f"{preset}_{exact}.log")
                try:
                    client = MONAILabelClient(server.url, tmpdir=f"{tmp}/client")
                    if not exact:
                        row["in_context"] = _timed(client, "icl_sam2", "case1", {}, truth[1], PHANTOM_LABELS)
                    params = {"label": label}
                    first = _timed(
                        client, "icl_sam2_interactive", "case2", {**params, "foreground": clicks[:1]}, truth[2], clicked
                    )
                    follow = _timed(
                        client, "icl_sam2_interactive", "case2", {**params, "foreground": clicks}, truth[2], clicked
                    )
                finally:
                    server.stop()
                if exact:
                    row["first_click_full_pass"], row["follow_up_exact"] = first, follow
                else:
                    row["first_click"], row["follow_up"] = first, follow
            rows.append(row)
    result = {
        "cpu": {k: cpu[k] for k in ("processor", "amx_bf16", "avx512_bf16")},
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "shape": list(shape),
        "structure": {"label": label, "slices": [int(extent[0]), int(extent[-1])], "clicks": clicks},
        "rows": rows,
    }
    _print(result)
    if output:
        Path(output).write_text(json.dumps(result, indent=2))


def _print(result: dict) -> None:
    cpu, s = result["cpu"], result["structure"]
    print(
        f"\nMONAI Label app, {'x'.join(map(str, result['shape']))} volumes, device {result['device']}, CPU "
        f"{cpu['processor']} (AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}, AVX512-BF16 "
        f"{'yes' if cpu['avx512_bf16'] else 'no'}), {result['torch_threads']} torch threads"
    )
    print(
        f"{s['label']} on slices {s['slices'][0]}-{s['slices'][1]}, clicks {s['clicks']}; seconds through the REST "
        "API, Dice against the phantom's truth (in context: mean over the structures), [slices encoded / propagated]"
    )
    columns = {
        "in_context": "in-context",
        "first_click": "first click",
        "follow_up": "follow-up",
        "first_click_full_pass": "first click, full pass",
        "follow_up_exact": "follow-up, exact replay",
    }
    print(f"  {'preset:size':<24}" + "".join(f" {title:>30}" for title in columns.values()))

    def cell(r: dict) -> str:
        counts = "/".join(f"{'-' if r[k] is None else r[k]:>3}" for k in ("encoded", "propagated"))
        return f"{r['seconds']:>7.2f} s  Dice {r['dice']:.3f} [{counts}]"

    for r in result["rows"]:
        print(f"  {r['preset']:<24}" + "".join(f" {cell(r[key]):>30}" for key in columns))
        ratio = r["follow_up"]["seconds"] / r["first_click"]["seconds"]
        speedup = r["first_click_full_pass"]["seconds"] / r["first_click"]["seconds"]
        print(
            f"  {'':<24} follow-up / first click {ratio:.0%}; first click {speedup:.1f}x faster than the full pass; "
            f"weights {r['checkpoint']}"
        )


if __name__ == "__main__":
    fire.Fire(main)
