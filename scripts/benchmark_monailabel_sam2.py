"""First and follow-up click against MONAI Label's built-in SAM2 task (``monailabel.sam2.infer.Sam2InferTask``, 3D),
same architecture, same size, same weights, same clicks, through the real servers and client.

    python scripts/benchmark_monailabel_sam2.py                                   # Hiera-tiny at 512, trains first
    python scripts/benchmark_monailabel_sam2.py --preset tiny --image_size 64     # the trained tiny model's setup
    python scripts/benchmark_monailabel_sam2.py --checkpoint bundle/models/model.pt --preset tiny --image_size 96
    python scripts/benchmark_monailabel_sam2.py --preset tiny --image_size 96 --shape 512,512,160   # CT-sized

Weights that segment the study: ``--checkpoint``, or a model trained on phantoms through the
bundle (:func:`icl_sam2.demo.train_phantom_model`, ``--train_steps``, kept under ``--cache_dir``
and reused). A stopping pass is only honest with weights whose object score knows where the
structure ends, so each answer's Dice against the phantom's truth is reported beside its time.

The built-in task gets the same architecture as a YAML (``model_core.modeling.presets.preset_config``,
the preset as sam2 ships it, at ``--image_size``) and the same weights as ``{"model": state_dict}`` in
its model folder (so its download is skipped; ``MONAI_SAM_MODEL_PT``/``MONAI_SAM_MODEL_CFG`` name
the files). It casts grey levels to 8 bits (no intensity scaling), so the study is written with
intensities in [0, 255] and this project's app reads them with ``--conf window [0, 255]``: both
models see the same slices. The study: three phantom volumes of ``--shape``, one labelled; the
clicks: on ``--label`` in ``case2``, the first on the middle slice of its extent, the follow-up
two slices away (:func:`model_core.io.phantoms.structure_click`); the follow-up is timed ``--repeats``
times (the median is reported), the first click once, then the follow-up's clicks are sent again
``--repeats`` times: this app answers them with no model work, so that row is what a request costs
around the model, the floor under any follow-up. Rows: the built-in task (it
tracks forward from the click only), this app with its default stopping pass, and this app with
``--conf stop_after_absent 0`` (the full pass). One table is printed and, with ``--output``, written
as JSON; the CPU is named in both.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.metrics import compute_dice
from monailabel.client import MONAILabelClient
from omegaconf import OmegaConf

from icl_sam2.demo import train_phantom_model
from icl_sam2.servers import MonaiLabelServer
from model_core.io.phantoms import PHANTOM_LABELS, phantom_study_case, structure_click, write_phantom_study
from model_core.modeling.checkpoint import read_state_dict
from model_core.modeling.precision import cpu_bf16_capability
from model_core.modeling.presets import preset_config

APP_MAIN = """
import os
from monailabel.interfaces.app import MONAILabelApp
from monailabel.sam2.infer import Sam2InferTask


class BuiltinSam2App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="builtin-sam2")

    def init_infers(self):
        return {"sam2": Sam2InferTask(self.model_dir, dimension=3, labels={"structure": 1})}
"""

CASE = 2  # the volume clicked (case0 is the labelled one)


def _prepare_builtin(folder: Path, preset: str, image_size: int, checkpoint: str) -> dict[str, str]:
    """The built-in task's app folder: main.py, the architecture's YAML and the weights in its model folder."""
    (folder / "model").mkdir(parents=True)
    (folder / "main.py").write_text(APP_MAIN)
    yaml_name, weights_name = f"{preset}_{image_size}.yaml", f"{preset}_{image_size}.pt"
    model = preset_config(preset, int(image_size), video_predictor_settings=False)  # the YAML as sam2 ships it
    model["_target_"] = "sam2.modeling.sam2_base.SAM2Base"  # its builder makes it a SAM2VideoPredictor
    OmegaConf.save(OmegaConf.create({"model": model}), folder / "model" / yaml_name)
    state_dict, _ = read_state_dict(checkpoint)
    torch.save({"model": state_dict}, folder / "model" / weights_name)
    base = "https://huggingface.co/facebook/unreachable-here/resolve/main"
    return {"MONAI_SAM_MODEL_PT": f"{base}/{weights_name}", "MONAI_SAM_MODEL_CFG": f"{base}/{yaml_name}"}


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks (MONAI's ``compute_dice``)."""
    both = [torch.from_numpy(np.ascontiguousarray(a))[None, None].float() for a in (pred, truth)]
    return round(float(compute_dice(*both, include_background=True, ignore_empty=False)), 4)


def _infer(client, model: str, params: dict, points: list[list[int]]) -> tuple[float, str, dict]:
    """One request through the REST API: its seconds, the label file, the task's info."""
    start = time.perf_counter()
    label_file, info = client.infer(model, f"case{CASE}", {**params, "foreground": points})
    seconds = time.perf_counter() - start
    return seconds, label_file, json.loads(info) if isinstance(info, (bytes, str)) else info


def _task_seconds(info: dict) -> float | None:
    """Seconds inside the task (ours: `seconds` of its info; the built-in's: `latencies.total`); the rest of a
    request's seconds is MONAI Label's request handling, the result file and the client."""
    return info.get("seconds", (info.get("latencies") or {}).get("total"))


def _clicks(client, model: str, params: dict, clicks: list[list[int]], truth: np.ndarray, repeats: int) -> list[dict]:
    """A first click and a follow-up (both clicks), each timed through the REST API and scored against the truth,
    then the follow-up's clicks sent again (timed ``repeats`` times, the median reported).

    The follow-up is timed ``repeats`` times, each after going back to the first click alone, and its median
    reported (one follow-up of a quarter of a second varies by a tenth of a second between runs); the first
    click is timed once, as it is met: cold. Each answer keeps its ``mask`` (the image's voxels) until the
    agreement of the two tasks is measured.
    """
    answers = []
    for points in (clicks[:1], clicks):
        seconds, label_file, info = _infer(client, model, params, points)
        mask = np.asarray(nib.load(label_file).dataobj) > 0
        if mask.shape != truth.shape:
            raise ValueError(f"The answer of {model} is {mask.shape}, the image {truth.shape}.")
        answers.append(
            {
                "seconds": round(seconds, 3),
                "task_seconds": _task_seconds(info),
                "dice": _dice(mask, truth),
                "encoded": info.get("encoded_slices"),
                "propagated": info.get("propagated_slices"),
                "mask": mask,
            }
        )
    times = [(answers[1]["seconds"], answers[1]["task_seconds"])]
    for _ in range(repeats - 1):
        _infer(client, model, params, clicks[:1])  # back to the first click: the same follow-up again
        seconds, _, info = _infer(client, model, params, clicks)
        times.append((round(seconds, 3), _task_seconds(info)))
    answers[1]["seconds_each"] = [t[0] for t in times]
    answers[1]["seconds"] = round(float(np.median(answers[1]["seconds_each"])), 3)
    if all(t[1] is not None for t in times):
        answers[1]["task_seconds"] = round(float(np.median([t[1] for t in times])), 3)
    # the same clicks again: ours answers them without model work (mode "unchanged"), so its time is what a request
    # costs around the model (MONAI Label's route, the label file, the client), the floor of any follow-up
    again = [_infer(client, model, params, clicks) for _ in range(repeats)]
    answers.append(
        {
            "seconds_each": [round(t[0], 3) for t in again],
            "seconds": round(float(np.median([t[0] for t in again])), 3),
            "task_seconds": None
            if any(_task_seconds(t[2]) is None for t in again)
            else round(float(np.median([_task_seconds(t[2]) for t in again])), 3),
            "mode": again[-1][2].get("mode"),
            "propagated": again[-1][2].get("propagated_slices"),
        }
    )
    return answers


def main(
    preset: str = "sam2.1_hiera_tiny",
    image_size: int = 512,
    shape=(256, 256, 64),
    checkpoint: str | None = None,
    train_steps: int = 300,
    cache_dir: str = "~/.cache/icl_sam2_benchmarks",
    label: str = "blob",
    precision: str = "fp32",
    output: str | None = None,
    repeats: int = 5,
) -> None:
    """Prints one table; with ``output`` the same figures go to a JSON file.

    Args:
        preset, image_size: the architecture both sides run.
        shape: ``(i, j, k)`` of each volume of the study.
        checkpoint: weights of ``preset`` at ``image_size`` (default: train them on phantoms, once).
        train_steps: training iterations when no checkpoint is given (see ``icl_sam2.demo.train_phantom_model``).
        cache_dir: where trained weights are kept between runs.
        label: the phantom structure clicked (blob, tube or block).
        precision: this app's ``--conf precision``. fp32 by default: the built-in task computes in float32 on a
            CPU (its bfloat16 autocast is for CUDA only), so both sides do the same arithmetic. The app's own
            default, ``auto``, is bf16 on CPUs with AMX-BF16 or AVX512-BF16: on a 2-core AMD EPYC with
            AVX512-BF16 it made a first click of Hiera-tiny at 512 px 1.4x faster, and one of the tiny preset at
            96 px 1.3x slower.
        output: optional JSON file for the result.
        repeats: how many times the follow-up is timed (the median is reported).
    """
    if int(repeats) < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}.")
    if label not in PHANTOM_LABELS:
        raise ValueError(f"--label must be one of {sorted(PHANTOM_LABELS)}, got {label!r}.")
    shape = tuple(int(v) for v in shape)
    trained = checkpoint is None
    if trained:
        folder = Path(cache_dir).expanduser() / f"{preset}_{int(image_size)}_{int(train_steps)}steps"
        checkpoint = train_phantom_model(folder, preset, int(image_size), int(train_steps))
    checkpoint = str(Path(checkpoint).resolve())
    truth = phantom_study_case(CASE, shape)[1] == PHANTOM_LABELS[label]
    clicks = [structure_click(truth, 1), structure_click(truth, 1, offset=2)]
    extent = np.nonzero(truth.reshape(-1, shape[2]).any(0))[0]
    cpu = cpu_bf16_capability()
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantom_study(tmp / "studies", shape, scale=255.0)
        env = _prepare_builtin(tmp / "app", preset, image_size, checkpoint)
        server = MonaiLabelServer(
            tmp / "studies", {}, tmp / "builtin.log", app=tmp / "app", env={**env, "HOME": str(tmp)}
        )  # its JPEG cache goes under $HOME/.cache
        try:
            client = MONAILabelClient(server.url, tmpdir=str(tmp / "client"))
            rows["builtin"] = _clicks(client, "sam2", {"device": "cpu"}, clicks, truth, int(repeats))
        finally:
            server.stop()
        for name, extra in (("ours", {}), ("ours_full_pass", {"stop_after_absent": "0"})):
            conf = {
                "preset": preset,
                "image_size": str(image_size),
                "device": "cpu",
                "window": "[0, 255]",
                "labels": json.dumps(dict(PHANTOM_LABELS)),
                "checkpoint": checkpoint,
                "precision": precision,
                **extra,
            }
            server = MonaiLabelServer(tmp / "studies", conf, tmp / f"{name}.log")
            try:
                client = MONAILabelClient(server.url, tmpdir=str(tmp / f"client_{name}"))
                rows[name] = _clicks(client, "icl_sam2_interactive", {"label": label}, clicks, truth, int(repeats))
            finally:
                server.stop()
    builtin, ours = rows["builtin"], rows["ours"]
    # where both track forward from the click with the same weights (the built-in stops there), they should agree
    forward = slice(clicks[0][2], None)
    agreement = _dice(builtin[0]["mask"][..., forward], rows["ours_full_pass"][0]["mask"][..., forward])
    for answers in rows.values():
        for answer in answers:
            answer.pop("mask", None)
    result = {
        "cpu": {k: cpu[k] for k in ("processor", "amx_bf16", "avx512_bf16")},
        "torch_threads": torch.get_num_threads(),
        "preset": preset,
        "image_size": int(image_size),
        "precision": {"builtin": "fp32", "ours": precision},
        "shape": list(shape),
        "checkpoint": checkpoint,
        "trained_here": {"steps": int(train_steps)} if trained else None,
        "follow_up_repeats": int(repeats),
        "structure": {"label": label, "slices": [int(extent[0]), int(extent[-1])], "clicks": clicks},
        **{name: {"first_click": r[0], "follow_up": r[1], "same_clicks_again": r[2]} for name, r in rows.items()},
        "builtin_vs_ours_from_the_click_on": agreement,
        "speedup": {
            "first_click": round(builtin[0]["seconds"] / ours[0]["seconds"], 2),
            "follow_up": round(builtin[1]["seconds"] / ours[1]["seconds"], 2),
        },
    }
    _print(result)
    if output:
        Path(output).write_text(json.dumps(result, indent=2))


def _print(result: dict) -> None:
    cpu = result["cpu"]
    s = result["structure"]
    print(
        f"\nCPU {cpu['processor']} (AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}, AVX512-BF16 "
        f"{'yes' if cpu['avx512_bf16'] else 'no'}), {result['torch_threads']} torch threads; "
        f"{result['preset']} at {result['image_size']} px, weights {result['checkpoint']}; precision: built-in "
        f"{result['precision']['builtin']}, ours {result['precision']['ours']}"
    )
    shape = "x".join(map(str, result["shape"]))
    print(
        f"study {shape}; {s['label']} on slices {s['slices'][0]}-{s['slices'][1]}; clicks {s['clicks']}; "
        "seconds through the REST API (of which inside the inference task), Dice against the phantom's truth, "
        "[slices encoded / propagated]"
    )
    follow_up = f"follow-up click (median of {result['follow_up_repeats']})"
    print(f"  {'':<36} {'first click':>48} {follow_up:>48}")

    def cell(r: dict) -> str:
        counts = "/".join(f"{'-' if r[k] is None else r[k]:>3}" for k in ("encoded", "propagated"))
        task = "" if r.get("task_seconds") is None else f" ({r['task_seconds']:.2f} in the task)"
        return f"{r['seconds']:>5.2f} s{task}  Dice {r['dice']:.3f} [{counts}]"

    names = {
        "builtin": "MONAI Label Sam2InferTask (3D)",
        "ours": "ICL-SAM2, stops where it ends",
        "ours_full_pass": "ICL-SAM2, full pass",
    }
    for key, name in names.items():
        print(f"  {name:<36} {cell(result[key]['first_click']):>48} {cell(result[key]['follow_up']):>48}")
    sp = result["speedup"]
    print(f"  {'speed-up (built-in / ours)':<36} {sp['first_click']:>47.1f}x {sp['follow_up']:>47.1f}x")
    print(
        f"  first click, slices from the click on (both track them forward, same weights): Dice of the built-in's "
        f"answer against ours (full pass) {result['builtin_vs_ours_from_the_click_on']:.3f}"
    )

    def again(r: dict) -> str:
        task = "" if r.get("task_seconds") is None else f" ({r['task_seconds']:.3f} in the task)"
        return f"{r['seconds']:.3f} s{task}" + (f", {r['mode']}" if r.get("mode") else "")

    print(
        f"  the follow-up's clicks sent again (median of {result['follow_up_repeats']}): "
        + "; ".join(f"{names[key]} {again(result[key]['same_clicks_again'])}" for key in names)
    )
    builtin, ours = result["builtin"]["follow_up"]["seconds"], result["ours"]["same_clicks_again"]["seconds"]
    print(
        f"  10x the built-in's follow-up is {builtin / 10:.3f} s; ours answers the same clicks again, with no model "
        f"work, in {ours:.3f} s ({ours / builtin * 10:.0%} of that)"
    )


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    fire.Fire(main)
