"""``icl-sam2 brain-atlas``: in-context segmentation learned from one real T1 brain, measured on held-out structures.

    icl-sam2 brain-atlas --output_dir runs/brain                      # data, training, evaluation, table
    icl-sam2 brain-atlas --output_dir runs/brain --checkpoint runs/brain/models/model_final.pt   # evaluation only

1. data (:func:`model_core.io.brain_atlases.write_brain_study`): Colin27 T1 from Debian's mricron-data with
   five label sets, three training views; ten AAL structures held out (both hemispheres of caudate,
   putamen, thalamus, hippocampus, precentral gyrus), never labelled in training, nor any training label
   that overlaps them;
2. training: ``monai.bundle run training`` with ``train.json + brain_atlas.json`` (the tiny preset, every
   part trained, no validation pass: held-out structures need their own support), printed before it runs;
3. per held-out structure (support = 3 labelled axial slices spread over it, query = its other slices
   from 5 below it to 5 above): the bundle's evaluation (``train.json + evaluate.json``: Dice, NSD at
   2 mm); the interactive protocol (``train.json + protocol.json``) in three modes: ``interactive`` (box
   on the middle slice, 5 clicks), ``in_context`` (support, then 5 clicks) and ``medsam_lite`` (the
   challenge's 3D box); and LiteMedSAM with the structure's tight box on every query slice that has it;
4. the table (printed, and ``brain_atlas.json`` with every number, the settings, the machine and the times).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from icl_sam2.protocol import run_protocol
from model_core.io.brain_atlases import HELDOUT, HELDOUT_VALUE, LABEL_SETS, write_brain_study
from model_core.io.datalist import load_datalist, write_datalist
from model_core.io.files import atomic_path
from model_core.io.transforms import load_case
from model_core.medsam_lite.atlas import slice_box_masks
from model_core.medsam_lite.challenge import dsc_nsd
from model_core.medsam_lite.model import LiteMedSAM
from model_core.modeling.inputs import as_slices

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
TRAIN = [str(CONFIGS / "train.json"), str(CONFIGS / "brain_atlas.json")]
EVALUATE = [str(CONFIGS / "train.json"), str(CONFIGS / "brain_atlas.json"), str(CONFIGS / "evaluate.json")]
MODES = ("interactive", "in_context", "medsam_lite")


def machine() -> dict[str, Any]:
    """The CPU (model name, bf16 flags), cores and torch threads: every timing is read against these."""
    model, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = sorted({f for f in line.split(":", 1)[1].split() if "bf16" in f or f == "amx_tile"})
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "bf16_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _train(study: Path, root: Path, steps: int, epochs: int, image_size: int, device: str) -> tuple[Path, float]:
    classes = json.loads(study.read_text())["classes"]
    episodes = max(2 * int(steps) // int(epochs), 2)  # batches of 2 episodes
    command = [
        sys.executable,
        *("-m", "monai.bundle", "run", "training", "--config_file", json.dumps(TRAIN)),
        *("--bundle_root", str(root), "--ckpt_dir", str(root / "models"), "--output_dir", str(root / "train")),
        *("--datalist_file", str(study), "--classes", json.dumps(classes).replace(" ", "")),
        *("--image_size", str(image_size), "--episodes_per_epoch", str(episodes), "--max_epochs", str(epochs)),
        *("--device", f"$torch.device('{device}')"),
    ]
    shown = [c if len(c) < 200 else f"'<{len(classes)} classes from {study.name}>'" for c in command[1:]]
    print("\n$ " + shlex.join(["python", *shown]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return root / "models" / "model_final.pt", time.perf_counter() - start


def _bundle_metrics(folder: Path) -> dict[str, float]:
    """The mean of each metric MONAI's MetricsSaver wrote (``<metric>_summary.csv``)."""
    out = {}
    for name, key in (("val_mean_dice", "dice"), ("val_nsd", "nsd"), ("val_hd95", "hd95")):
        with open(folder / f"{name}_summary.csv") as f:
            rows = list(csv.reader(f))
        header = rows[0]
        mean = [r for r in rows[1:] if r and r[0] == "mean"] or rows[1:2]
        out[key] = float(mean[0][header.index("mean")])
    return out


def _evaluate_bundle(datalist: Path, checkpoint: Path, image_size: int, folder: Path, device: str) -> dict[str, float]:
    workflow = ConfigWorkflow(
        config_file=EVALUATE,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        datalist_file=str(datalist),
        checkpoint=str(checkpoint),
        classes=[HELDOUT_VALUE],
        image_size=image_size,
        output_dir=str(folder),
        device=f"$torch.device('{device}')",
        num_support_slices=64,  # every slice of the support file (its few labelled slices)
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return _bundle_metrics(folder)


def _slice_boxes(entry: dict[str, Any], model: LiteMedSAM) -> dict[str, float]:
    """LiteMedSAM with a tight box on every query slice that has the structure; DSC and NSD on the query volume
    (loaded by the protocol's preprocessing, so the same voxels are scored)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "brain_atlas.json"), str(CONFIGS / "protocol.json")])
    item = load_case(entry, parser.get_parsed_content("protocol#preprocessing"))
    volume, label = as_slices(item["image"]).float(), as_slices(item["label"]).round().long().numpy() == HELDOUT_VALUE
    spacing = np.linalg.norm(np.asarray(item["image"].affine)[:3, :3], axis=0)
    mask = slice_box_masks(model, volume.numpy(), label)
    dsc, nsd = dsc_nsd(label.astype(np.uint8), mask.astype(np.uint8), (spacing[2], spacing[0], spacing[1]))
    return {"dsc": dsc, "nsd": nsd}


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(np.mean(v)) if v else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(rows: dict[str, dict[str, Any]]) -> list[str]:
    columns = (
        ("ICL bundle Dice", "icl_dice"),
        ("ICL NSD", "icl_nsd"),
        ("MedSAM 3D box Dice", "medsam_box3d_dsc"),
        ("NSD", "medsam_box3d_nsd"),
        ("MedSAM box/slice Dice", "medsam_slice_boxes_dsc"),
        ("NSD", "medsam_slice_boxes_nsd"),
        ("box+5 clicks DSC", "interactive_final_dsc"),
        ("clicks to 0.9", "interactive_clicks_to_0.9"),
        ("ICL+5 clicks DSC", "in_context_final_dsc"),
        ("clicks to 0.9", "in_context_clicks_to_0.9"),
    )
    lines = ["| structure | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for _, k in columns) + " |")
    return lines


def main(
    output_dir: str = "runs/brain_atlas",
    steps: int = 3000,
    epochs: int = 6,
    image_size: int = 128,
    heldout: Sequence[str] = HELDOUT,
    label_sets: Sequence[str] = tuple(LABEL_SETS),
    views: Sequence[str] = ("full", "zoom", "mirror"),
    num_support: int = 3,
    margin: int = 5,
    num_clicks: int = 5,
    checkpoint: str | None = None,
    evaluate: Sequence[str] | None = None,
    baselines: bool = True,
    device: str = "cpu",
) -> None:
    """Write the data, train (unless ``checkpoint`` is given), evaluate every held-out structure, print the table.

    Args:
        output_dir: data (``data/``), models (``models/``), evaluations and ``brain_atlas.json`` go here.
        steps, epochs: training iterations (batches of 2 episodes) and the epochs they are split into.
        image_size: model input size (the tiny preset).
        heldout, label_sets, views, num_support, margin: the data (:func:`write_brain_study`).
        num_clicks: corrective clicks of the protocol.
        checkpoint: evaluate these weights instead of training (the same ``image_size``).
        evaluate: evaluate only these of the held-out structures (default all).
        baselines: also run LiteMedSAM (3D box and per-slice boxes; most of the evaluation's time on a CPU).
        device: ``cpu`` or ``cuda``.
    """
    started = time.perf_counter()
    root = Path(output_dir).resolve()
    t0 = time.perf_counter()
    study = root / "data" / "datalist.json"
    settings = {
        "heldout": list(heldout),
        "label_sets": list(label_sets),
        "views": list(views),
        "num_support": num_support,
        "margin": margin,
    }
    written = json.loads(study.read_text()).get("settings", {}) if study.is_file() else {}
    if any(written.get(k) != v for k, v in settings.items()):  # written earlier with these settings: reused
        study = Path(write_brain_study(str(root / "data"), heldout, label_sets, views, num_support, margin))
    data_seconds = time.perf_counter() - t0
    info = json.loads(study.read_text())
    unknown = sorted(set(evaluate or ()) - set(heldout))
    if unknown:
        raise ValueError(f"--evaluate {unknown}: not held out ({list(heldout)}).")
    print(f"data: {study} ({len(info['classes'])} training classes, {len(info['training'])} training volumes)")
    train_seconds = None
    if checkpoint is None:
        weights, train_seconds = _train(study, root, steps, epochs, image_size, device)
    else:
        weights = Path(checkpoint).resolve()
    medsam = LiteMedSAM.from_package(device=device) if baselines else None
    modes = MODES if baselines else MODES[:2]
    rows: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {"bundle_evaluation": 0.0, "slice_boxes": 0.0, **{m: 0.0 for m in MODES}}
    for entry in info["heldout"]:
        name = entry["name"]
        if evaluate and name not in evaluate:
            continue
        folder = root / "eval" / name
        absolute = {part: {k: str(study.parent / v) for k, v in entry[part].items()} for part in ("support", "query")}
        split = write_datalist(
            {"training": [absolute["support"]], "validation": [absolute["query"]]}, folder / "datalist.json"
        )
        split_entries = load_datalist(str(split), "validation")
        row: dict[str, Any] = {
            "support_slices": entry["support_slices"],
            "query_slices": [entry["query_slices"][0], entry["query_slices"][-1]],
        }
        t0 = time.perf_counter()
        bundle = _evaluate_bundle(split, weights, image_size, folder / "bundle", device)
        seconds["bundle_evaluation"] += time.perf_counter() - t0
        row.update(icl_dice=bundle["dice"], icl_nsd=bundle["nsd"], icl_hd95=bundle["hd95"])
        if medsam is not None:
            t0 = time.perf_counter()
            boxes = _slice_boxes(split_entries[0], medsam)
            seconds["slice_boxes"] += time.perf_counter() - t0
            row.update(medsam_slice_boxes_dsc=boxes["dsc"], medsam_slice_boxes_nsd=boxes["nsd"])
        for mode in modes:
            t0 = time.perf_counter()
            summary = run_protocol(
                {
                    "datalist_file": str(split),
                    "support_datalist_file": str(split),
                    "checkpoint": None if mode == "medsam_lite" else str(weights),
                    "output_dir": str(folder),
                    "protocol#output_dir": str(folder),
                    "classes": [HELDOUT_VALUE],
                    "image_size": image_size,
                    "protocol#mode": mode,
                    "protocol#num_clicks": num_clicks,
                    "num_support_slices": 64,
                    "device": f"$torch.device('{device}')",
                },
                extra_configs=[str(CONFIGS / "brain_atlas.json")],
            )
            seconds[mode] += time.perf_counter() - t0
            if summary["failed"]:
                raise RuntimeError(f"{name}, {mode}: {summary['failed_cases']}")
            key = "medsam_box3d" if mode == "medsam_lite" else mode
            row[f"{key}_dsc_per_step"] = summary["DSC"]["per_step"]
            row[f"{key}_nsd_per_step"] = summary["NSD"]["per_step"]
            row[f"{key}_dsc"], row[f"{key}_nsd"] = summary["DSC"]["per_step"][0], summary["NSD"]["per_step"][0]
            row[f"{key}_final_dsc"], row[f"{key}_final_nsd"] = summary["DSC"]["final"], summary["NSD"]["final"]
            row[f"{key}_dsc_auc"], row[f"{key}_nsd_auc"] = summary["DSC"]["auc"], summary["NSD"]["auc"]
            reach = summary["clicks_to_dsc_0.9"]
            row[f"{key}_clicks_to_0.9"] = reach["median_when_reached"] if reach["reached"] else "not reached"
            row[f"{key}_seconds_per_interaction"] = summary["seconds_per_interaction"]
        rows[name] = row
        print(f"{name}: " + json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)
    numeric = {k for r in rows.values() for k, v in r.items() if isinstance(v, float)}
    mean = {k: _mean([r.get(k) for r in rows.values()]) for k in sorted(numeric)}
    within = {mode: sum(1 for r in rows.values() if r[f"{mode}_clicks_to_0.9"] != "not reached") for mode in MODES[:2]}
    mean["interactive_clicks_to_0.9"] = f"{within['interactive']}/{len(rows)} reached"
    mean["in_context_clicks_to_0.9"] = f"{within['in_context']}/{len(rows)} reached"
    result = {
        "settings": {
            **info["settings"],
            "steps": steps,
            "epochs": epochs,
            "image_size": image_size,
            "preset": "tiny",
            "checkpoint": str(weights),
            "num_clicks": num_clicks,
            "device": device,
        },
        "machine": machine(),
        "seconds": {
            "data": round(data_seconds, 1),
            "training": None if train_seconds is None else round(train_seconds, 1),
            **{k: round(v, 1) for k, v in seconds.items()},
            "total": round(time.perf_counter() - started, 1),
        },
        "structures": rows,
        "mean": mean,
    }
    with atomic_path(root / "brain_atlas.json", suffix=".json") as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n=== Held-out structures of the Colin27 T1 ({len(rows)}), tiny preset at {image_size} px ===")
    print("\n".join(_table({**rows, "mean": mean})))
    m = result["machine"]
    print(f"\n{m['cpu']} ({m['cores']} cores, bf16 flags {m['bf16_flags'] or 'none'}); seconds: {result['seconds']}")
    print(f"Every number: {root / 'brain_atlas.json'}")
