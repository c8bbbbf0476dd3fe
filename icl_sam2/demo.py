"""The main job on built-in defaults: the bundle end to end, through ``python -m monai.bundle``, with pictures.

    icl-sam2 demo                 # the quick start's main job
    icl-sam2 demo --steps 100     # a quick look (low Dice)

1. data: phantom volumes (``bundle/data/phantoms``) and, when Debian's mricron-data is
   installed, a small real T1 MRI study with AAL regions (``bundle/data/mricron``);
2. training: ``monai.bundle run training`` with the tiny preset on the phantoms, validating on
   held-out phantoms before training and after each epoch (best-Dice ``model.pt``; the curve in
   ``outputs/train/training_curve.json``);
3. the untrained and the trained model, each in one bundle run (``train.json + evaluate.json +
   inference.json``): Dice, NSD at 2 mm and HD95 on the test phantoms (never used for training or
   model selection), and their label maps with per-structure confidence;
4. real MRI: in-context evaluation of the same model on the brain study (the model has seen
   phantoms only, so this shows the pipeline on real data, not accuracy);
5. pictures: test slices with predicted and true contours before and after training
   (``outputs/demo_montage.png``) and the training curve (``outputs/training_curve.png``).

Every step is a bundle command, printed before it runs, so each can be rerun by hand. The time of each
step, the CPU and the figures go to ``outputs/demo_summary.json``.
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

import nibabel as nib
import numpy as np
import torch

from model_core.io.mricron import make_study as make_mricron_study
from model_core.io.phantoms import write_phantom_dataset
from model_core.io.pictures import MontageRow, montage_png, training_curve_png
from model_core.modeling.precision import cpu_bf16_capability

ROOT = Path(__file__).resolve().parents[1]

TRAIN = "bundle/configs/train.json"
#: training data-parallel over CPU processes (``torch.distributed.run``, gloo)
TRAIN_PARALLEL = "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']"
EVALUATE = "['bundle/configs/train.json','bundle/configs/evaluate.json']"
EVALUATE_AND_INFER = "['bundle/configs/train.json','bundle/configs/evaluate.json','bundle/configs/inference.json']"
#: one bundle run evaluates a model on the test phantoms and writes their label maps
BOTH_RUNS = "['$@validate#evaluator.run()','$@evaluator.run()']"

#: the phantoms of the demo: volumes per split and their shape ``(D, H, W)``. 16 training volumes, not 8:
#: at the same steps the model generalises to new phantoms instead of learning its few by heart (1200 steps,
#: the same 3 test phantoms: Dice 0.924 with 16 against 0.808 with 8, where one case fell to 0.61)
PHANTOMS = {"train": 16, "validation": 3, "test": 3, "shape": (24, 96, 96)}
#: the demo's defaults: training iterations, validation points, model input size
STEPS, EPOCHS, IMAGE_SIZE = 1200, 10, 96
#: the demo's learning-rate warm-up, train.json's 5% of the steps. How well a run ends depends on when it leaves an
#: early plateau (validation Dice 0.25-0.30), which varies with the phantoms' seed and the CPU's arithmetic. A
#: quarter was tried and left out: held-out Dice on phantoms of seeds 0-4 (1200 steps at 96 px, one run each, AMD
#: EPYC) 0.930 / 0.896 / 0.942 / 0.933 / 0.588 against 0.938 / 0.844 / 0.932 / 0.842 / 0.878 with 5%: more runs
#: above 0.9, but one never left the plateau (docs/measurements.md, 2026-12-05).
WARMUP_FRACTION = 0.05


def phantom_training_args(
    steps: int, epochs: int, processes: int = 1, warmup_fraction: float = WARMUP_FRACTION
) -> list[str]:
    """The training recipe of the phantoms (``train.json`` overrides): the demo's and the tests' trained model.

    ``precision fp32``: on the tiny preset at 64 px bfloat16 autocast is slower on CPUs that have it
    (overhead, not arithmetic, dominates such small layers) and it trains another model, so the result
    would depend on the machine.

    ``loss#weight_dice 5`` (SAM2's recipe, the bundle's default, weighs focal loss 20 to Dice 1): a network
    that starts from random weights, as the tiny preset does, first learns from the focal term that empty masks
    cost little, and stayed there for about 800 of 2000 steps (validation Dice 0.03, 0.03, 0.11, 0.33 after 200,
    400, 600 and 800 steps); with Dice weighed 5 the same run reached 0.23, 0.59, 0.84, 0.89. SAM2's own
    weights, which already segment, keep the bundle's default.

    Args:
        steps: training iterations (batches of 2 episodes), split evenly into ``epochs`` (validation points).
        processes: 1, or 2 data-parallel processes of 1 episode each (:func:`training_processes`): the same
            batch of 2 episodes, the same number of iterations.
        warmup_fraction: the share of the steps over which the learning rate rises (the recipe's, and why:
            :data:`WARMUP_FRACTION`).
    """
    if int(processes) not in (1, 2):
        raise ValueError(f"processes must be 1 or 2 (a batch of 2 episodes split over them), got {processes}.")
    episodes = max(2 * int(steps) // int(epochs), 2)
    return [
        *("--train_encoder", "all", "--learning_rate", "3e-4", "--encoder_learning_rate", "3e-4"),
        *("--grad_clip", "1.0", "--num_support", "3", "--num_query", "4", "--objects_per_episode", "3"),
        *("--loss#weight_dice", "5.0", "--warmup_fraction", str(float(warmup_fraction))),
        *("--batch_size", str(2 // int(processes)), "--episodes_per_epoch", str(episodes), "--max_epochs", str(epochs)),
        *("--precision", "fp32"),
    ]


def train_phantom_model(
    folder: str | os.PathLike,
    preset: str = "tiny",
    image_size: int = 64,
    steps: int = 400,
    epochs: int = 2,
    shape: tuple[int, int, int] | None = None,
    cases: tuple[int, int, int] = (6, 2, 2),
    seed: int = 0,
    train_encoder: str | None = None,
    overrides: dict[str, str] | None = None,
) -> str:
    """Weights that segment phantoms: ``monai.bundle run training`` with :func:`phantom_training_args`, once.

    A folder that already holds ``models/model.pt`` is reused as it is; otherwise the phantoms and
    the model are made in a staging folder beside it, renamed into place when training succeeded
    (so an interrupted run leaves nothing half-made). The benchmarks use it for weights that
    segment their study at their own preset and size (timings and Dice of a stopping pass
    mean nothing with random weights).

    Args:
        folder: where ``phantoms/`` and ``models/model.pt`` go.
        preset, image_size: the network trained.
        steps, epochs: see :func:`phantom_training_args`.
        shape: ``(D, H, W)`` of the phantoms (default: 16 slices of ``min(image_size, 128)`` pixels; the
            bundle resizes slices to ``image_size``).
        cases: training, validation and test phantoms.
        train_encoder: ``train.json``'s choice (default: ``all`` up to 128 px, ``frozen`` above, where
            training the image encoder on a CPU takes hours rather than minutes).
        overrides: more ``train.json`` settings, ``{"num_query": "2"}`` (they win).

    Returns:
        The checkpoint's path.
    """
    folder = Path(folder)
    checkpoint = folder / "models" / "model.pt"
    if checkpoint.is_file():
        return str(checkpoint)
    if folder.exists():
        raise ValueError(f"{folder} exists but holds no models/model.pt; delete it to train the phantom model again.")
    work = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    side = min(int(image_size), 128)
    train, validation, test = cases
    data = write_phantom_dataset(
        str(work / "phantoms"), train, validation, test, tuple(shape or (16, side, side)), seed=seed
    )
    recipe = phantom_training_args(steps, epochs)
    settings = dict(zip(recipe[0::2], recipe[1::2]))  # --key value pairs
    settings["--train_encoder"] = train_encoder or ("all" if int(image_size) <= 128 else "frozen")
    settings.update({f"--{key}": str(value) for key, value in (overrides or {}).items()})
    _bundle(
        *("training", "--config_file", TRAIN, "--bundle_root", str(work), "--ckpt_dir", str(work / "models")),
        *("--output_dir", str(work / "out"), "--datalist_file", data, "--preset", preset),
        *("--image_size", str(int(image_size)), "--intensity#window", "[0,1]"),
        *("--classes", json.dumps(sorted(json.loads(Path(data).read_text())["labels"].values()))),
        *(item for pair in settings.items() for item in pair),
    )
    os.rename(work, folder)
    return str(checkpoint)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container or ``taskset`` narrows it), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def training_processes(requested: int | None = None) -> int:
    """Processes of the demo's training: 2 data-parallel ones on a CPU with 2 or more cores, else 1.

    At the demo's size the network's layers are too small for two threads to share one step well:
    on a 2-core AMD EPYC a step of 2 episodes takes 0.525 s in one process of 2 threads, and 0.36 s
    in 2 processes of 1 thread and 1 episode each that average their gradients (gloo,
    ``multi_gpu_train.json``), the same batch and recipe. With a GPU, one process.
    """
    if requested is not None:
        if int(requested) not in (1, 2):  # checked before any work (phantom_training_args would refuse it later)
            raise ValueError(f"--processes must be 1 or 2 (a batch of 2 episodes split over them), got {requested}.")
        return int(requested)
    return 2 if not torch.cuda.is_available() and usable_cores() >= 2 else 1


def _bundle(*args: str, processes: int = 1) -> float:
    """Run ``python -m monai.bundle run ...`` from the repository root; returns its duration in seconds.

    With ``processes`` > 1 the run goes through ``torch.distributed.run`` on this machine, each process
    given an equal share of the cores (``OMP_NUM_THREADS``).
    """
    env, launch = dict(os.environ), []
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(usable_cores() // processes, 1))
        launch = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={processes}"]
    cmd = [sys.executable, *launch, "-m", "monai.bundle", "run", *args]
    shown = shlex.join(["python", *cmd[1:]])
    print("\n$ " + (f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {shown}" if launch else shown), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    return time.perf_counter() - start


def _summary(metrics_dir: Path) -> dict[str, dict[str, float]]:
    """``{metric: {class: mean over cases}}`` from MONAI MetricsSaver's ``*_summary.csv`` files."""
    out: dict[str, dict[str, float]] = {}
    for name in ("val_mean_dice", "val_nsd", "val_hd95"):
        with open(metrics_dir / f"{name}_summary.csv") as f:
            rows = list(csv.reader(f))
        header = rows[0]
        out[name] = {row[0]: float(row[header.index("mean")]) for row in rows[1:]}
    return out


def _case_dice(metrics_dir: Path) -> dict[str, list[float]]:
    """``{image file name: [Dice per class]}`` from MetricsSaver's ``val_mean_dice_raw.csv``."""
    out = {}
    with open(metrics_dir / "val_mean_dice_raw.csv") as f:
        rows = [row[0].split("\t") if len(row) == 1 else row for row in csv.reader(f)]
    for row in rows[1:]:
        out[os.path.basename(row[0])] = [float(v) for v in row[1:-1]]  # the last column is the mean
    return out


def _table(title: str, results: dict[str, dict[str, dict[str, float]]], class_names: list[str]) -> None:
    print(f"\n{title}")
    print(f"  {'model':<10} {'class':<14} {'Dice':>6} {'NSD':>6} {'HD95 mm':>8}")
    for model, summary in results.items():
        keys = [k for k in summary["val_mean_dice"] if k != "mean"] + ["mean"]
        for key in keys:
            label = class_names[int(key[5:])] if key.startswith("class") else "mean"
            values = [summary[m].get(key, float("nan")) for m in ("val_mean_dice", "val_nsd", "val_hd95")]
            print(f"  {model:<10} {label:<14} {values[0]:6.3f} {values[1]:6.3f} {values[2]:8.2f}")


def _montage(datalist: Path, outputs: Path, names: list[str], labels: dict[str, int], path: Path) -> str:
    """Test phantoms before and after training: slices with predicted (solid) and true (dotted) contours."""
    folder = datalist.parent
    rows = []
    for case in json.loads(datalist.read_text())["test"][:2]:
        image = np.asarray(nib.load(str(folder / case["image"])).dataobj)
        truth = np.asarray(nib.load(str(folder / case["label"])).dataobj)
        stem = case["image"][: -len(".nii.gz")]
        for model in ("untrained", "trained"):
            run = outputs / f"{model}_model"
            predicted = np.asarray(nib.load(str(run / f"{stem}_seg.nii.gz")).dataobj)
            dice = _case_dice(run).get(case["image"], [])
            scores = ", ".join(f"{n} {d:.2f}" for n, d in zip(names, dice))
            rows.append(MontageRow(f"{stem}, {model}: Dice {scores}", image, predicted, truth))
    return montage_png(rows, path, labels, slices=6, cell=96)


def _phantom_layout(datalist: Path) -> tuple[tuple[int, ...], dict[str, int]] | None:
    """``(D, H, W)`` of the phantoms a datalist lists (files are ``(H, W, D)``) and their count per split,
    None when there are none or they cannot be used as they are (an unreadable datalist, a listed file
    missing): the demo then writes them again, as they are its own generated data."""
    splits = {"train": "training", "validation": "validation", "test": "test"}
    try:
        listed = json.loads(datalist.read_text())
        files = [datalist.parent / case[key] for split in splits.values() for case in listed[split] for key in case]
        if not all(f.is_file() for f in files):
            return None
        h, w, d = nib.load(str(datalist.parent / listed["training"][0]["image"])).shape
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # JSONDecodeError is a ValueError
        return None
    return (d, h, w), {k: len(listed[split]) for k, split in splits.items()}


def machine() -> dict[str, str | bool]:
    """The CPU the figures were measured on (model name, cores, bf16 instructions)."""
    bf16 = cpu_bf16_capability()
    return {
        "processor": bf16["processor"],
        "cores": usable_cores(),
        "avx512_bf16": bf16["avx512_bf16"],
        "amx_bf16": bf16["amx_bf16"],
        "python": platform.python_version(),
    }


def main(
    steps: int = STEPS,
    epochs: int = EPOCHS,
    image_size: int = IMAGE_SIZE,
    bundle_root: str = "bundle",
    real_data: bool = True,
    processes: int | None = None,
) -> None:
    """Args:
    steps: training iterations (batches of 2 episodes).
    epochs: validation points along the way (steps are split evenly).
    image_size: model input size of the tiny preset (the phantoms are written at this size).
    bundle_root: where data, models and outputs go (``data/``, ``models/``, ``outputs/``).
    real_data: also run on mricron-data's brain MRI when it is installed.
    processes: training processes, 1 or 2 (default: :func:`training_processes`).
    """
    processes = training_processes(processes)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    root = Path(bundle_root).resolve()
    phantoms = root / "data" / "phantoms" / "datalist.json"
    shape = (PHANTOMS["shape"][0], image_size, image_size)
    counts = {k: PHANTOMS[k] for k in ("train", "validation", "test")}
    if _phantom_layout(phantoms) != (shape, counts):  # written for another size or an older demo (or not yet)
        write_phantom_dataset(str(phantoms.parent), **counts, shape=shape)
    seconds["data"] = time.perf_counter() - started
    classes = json.loads(phantoms.read_text())["labels"]
    models, outputs = root / "models", root / "outputs"
    common = [
        "--bundle_root",
        str(root),
        "--ckpt_dir",
        str(models),
        "--preset",
        "tiny",
        "--image_size",
        str(image_size),
    ]
    phantom_args = [
        *common,
        *("--datalist_file", str(phantoms), "--classes", json.dumps(sorted(classes.values()))),
        *("--intensity#window", "[0,1]"),
    ]
    seconds["training"] = _bundle(
        "training",
        *("--config_file", TRAIN_PARALLEL if processes > 1 else TRAIN, *phantom_args),
        *("--output_dir", str(outputs / "train"), "--val_at_start", "True"),
        *phantom_training_args(steps, epochs, processes),
        processes=processes,
    )
    names = [n for n, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    results = {}
    # models/model.pt: the best validation Dice of training (the bundle's convention); the test phantoms
    # were used for neither, so these figures are held out
    for model, checkpoint in (("untrained", "$None"), ("trained", str(models / "model.pt"))):
        run = outputs / f"{model}_model"
        seconds[f"{model} model"] = _bundle(
            *("--config_file", EVALUATE_AND_INFER, *phantom_args, "--checkpoint", checkpoint, "--precision", "fp32"),
            *("--validate#datalist_key", "test", "--query_key", "test", "--class_names", json.dumps(classes)),
            *("--output_dir", str(run), "--run", BOTH_RUNS),
        )
        results[model] = _summary(run)
    real, skipped = None, None
    study = None
    if real_data:
        try:
            study = Path(make_mricron_study(str(root / "data" / "mricron")))
        except ValueError as e:  # mricron-data is not installed
            skipped = str(e)
    if study is not None:
        regions = json.loads(study.read_text())["labels"]
        metrics = outputs / "eval_mricron"
        seconds["real MRI"] = _bundle(
            *("--config_file", EVALUATE, *common, "--datalist_file", str(study), "--modality", "MRI"),
            *("--classes", json.dumps(list(regions.values())), "--output_dir", str(metrics), "--precision", "fp32"),
        )
        real = ({"trained": _summary(metrics)}, list(regions))
    pictures = {
        "montage": _montage(phantoms, outputs, names, classes, outputs / "demo_montage.png"),
        "training curve": training_curve_png(outputs / "train" / "training_curve.json", outputs / "training_curve.png"),
    }
    seconds["total"] = time.perf_counter() - started

    print(
        f"\n=== ICL-SAM2 bundle demo: tiny preset, {image_size} px, {steps} steps in {epochs} epochs "
        f"({processes} training process{'es' if processes > 1 else ''}), "
        f"trained in {seconds['training'] / 60:.1f} min, all in {seconds['total'] / 60:.1f} min ==="
    )
    _table("Held-out test phantoms (in-context, support: one training volume)", results, names)
    print(f"\nLabel maps and confidence of the test phantoms: {outputs / 'trained_model'}")
    for path in sorted((outputs / "trained_model").glob("*_confidence.json")):
        print(f"  {path.name}: {json.loads(path.read_text())['confidence']}")
    if real is not None:
        _table("Real T1 MRI (Colin27 + AAL regions; the model has seen phantoms only)", *real)
    elif real_data:
        print(f"\nReal MRI skipped: {skipped}")
    print("\nPictures:")
    for what, path in pictures.items():
        print(f"  {what}: {path}")
    cpu = machine()
    print(f"\nTime per step: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")
    print(f"Machine: {cpu['processor']}, {cpu['cores']} cores, AVX512-BF16 {cpu['avx512_bf16']}, AMX {cpu['amx_bf16']}")
    summary = {
        "settings": {
            **{"steps": steps, "epochs": epochs, "image_size": image_size, "training_processes": processes},
            "phantoms": PHANTOMS,
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": cpu,
        "test_phantoms": results,
        "real_mri": real[0] if real else None,
        "pictures": pictures,
    }
    (outputs / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"Models: {models}  Metrics and label maps: {outputs}  Summary: {outputs / 'demo_summary.json'}")
