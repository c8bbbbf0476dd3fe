"""The main job on built-in defaults: the bundle end to end, through ``python -m monai.bundle``.

    icl-sam2 demo                 # the quick start's main job
    icl-sam2 demo --steps 300     # a quick look (low Dice)

1. data: phantom volumes (``bundle/data/phantoms``) and, when Debian's mricron-data is
   installed, a small real T1 MRI study with AAL regions (``bundle/data/mricron``);
2. training: ``monai.bundle run training`` with the tiny preset on the phantoms,
   validating on held-out phantoms after each epoch (best-Dice ``model.pt``);
3. evaluation: ``train.json + evaluate.json`` on the held-out phantoms, for the
   untrained and the trained model (Dice, NSD at 2 mm, HD95 in mm);
4. inference: ``inference.json`` on the test phantoms, label maps and confidence JSON
   in ``bundle/outputs/inference``;
5. real MRI: in-context evaluation of the same model on the brain study (the model
   has seen phantoms only, so this shows the pipeline on real data, not accuracy).

Every step is a bundle command, printed before it runs, so each can be rerun by hand.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from model_core.io.mricron import make_study as make_mricron_study
from model_core.io.phantoms import write_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]

TRAIN = "bundle/configs/train.json"
EVALUATE = "['bundle/configs/train.json','bundle/configs/evaluate.json']"
INFER = "['bundle/configs/train.json','bundle/configs/inference.json']"


def phantom_training_args(steps: int, epochs: int) -> list[str]:
    """The training recipe of the phantoms (``train.json`` overrides): the demo's and the tests' trained model.

    Args:
        steps: training iterations (batches of 2 episodes), split evenly into ``epochs`` (validation points).
    """
    episodes = max(2 * int(steps) // int(epochs), 2)
    return [
        *("--train_encoder", "all", "--learning_rate", "3e-4", "--encoder_learning_rate", "3e-4"),
        *("--grad_clip", "1.0", "--num_support", "3", "--num_query", "4", "--objects_per_episode", "3"),
        *("--batch_size", "2", "--episodes_per_epoch", str(episodes), "--max_epochs", str(epochs)),
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


def _bundle(*args: str) -> float:
    """Run ``python -m monai.bundle run ...`` from the repository root; returns its duration in seconds."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    print("\n$ " + shlex.join(["python", *cmd[1:]]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
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


def _table(title: str, results: dict[str, dict[str, dict[str, float]]], class_names: list[str]) -> None:
    print(f"\n{title}")
    print(f"  {'model':<10} {'class':<14} {'Dice':>6} {'NSD':>6} {'HD95 mm':>8}")
    for model, summary in results.items():
        keys = [k for k in summary["val_mean_dice"] if k != "mean"] + ["mean"]
        for key in keys:
            label = class_names[int(key[5:])] if key.startswith("class") else "mean"
            values = [summary[m].get(key, float("nan")) for m in ("val_mean_dice", "val_nsd", "val_hd95")]
            print(f"  {model:<10} {label:<14} {values[0]:6.3f} {values[1]:6.3f} {values[2]:8.2f}")


def main(
    steps: int = 2000, epochs: int = 10, image_size: int = 96, bundle_root: str = "bundle", real_data: bool = True
) -> None:
    """Args:
    steps: training iterations (batches of 2 episodes).
    epochs: validation points along the way (steps are split evenly).
    image_size: model input size of the tiny preset.
    bundle_root: where data, models and outputs go (``data/``, ``models/``, ``outputs/``).
    real_data: also run on mricron-data's brain MRI when it is installed.
    """
    root = Path(bundle_root).resolve()
    phantoms = root / "data" / "phantoms" / "datalist.json"
    if not phantoms.exists():
        write_phantom_dataset(str(phantoms.parent), train=8, validation=3, test=2, shape=(24, image_size, image_size))
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
        "--datalist_file",
        str(phantoms),
        "--classes",
        json.dumps(sorted(classes.values())),
        "--intensity#window",
        "[0,1]",
    ]
    train_seconds = _bundle(
        "training",
        "--config_file",
        TRAIN,
        *phantom_args,
        "--output_dir",
        str(outputs / "train"),
        *phantom_training_args(steps, epochs),
    )
    names = [n for n, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    results = {}
    # evaluation and inference load models/model.pt, the best-Dice weights of training (the bundle's convention)
    for model, checkpoint in (("untrained", "$None"), ("trained", str(models / "model.pt"))):
        metrics = outputs / f"eval_{model}"
        _bundle("--config_file", EVALUATE, *phantom_args, "--checkpoint", checkpoint, "--output_dir", str(metrics))
        results[model] = _summary(metrics)
    infer_dir = outputs / "inference"
    _bundle(
        "--config_file",
        INFER,
        *phantom_args,
        "--query_key",
        "test",
        "--output_dir",
        str(infer_dir),
        "--class_names",
        json.dumps(classes),
    )
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
        _bundle(
            "--config_file",
            EVALUATE,
            *common,
            "--datalist_file",
            str(study),
            "--modality",
            "MRI",
            "--classes",
            json.dumps(list(regions.values())),
            "--output_dir",
            str(metrics),
        )
        real = ({"trained": _summary(metrics)}, list(regions))

    print(
        f"\n=== ICL-SAM2 bundle demo: tiny preset, {image_size} px, {steps} steps in {epochs} epochs, "
        f"trained in {train_seconds / 60:.1f} min ==="
    )
    _table("Held-out phantoms (in-context, support: one training volume)", results, names)
    print(f"\nLabel maps and confidence of the test phantoms: {infer_dir}")
    for path in sorted(infer_dir.glob("*_confidence.json")):
        print(f"  {path.name}: {json.loads(path.read_text())['confidence']}")
    if real is not None:
        _table("Real T1 MRI (Colin27 + AAL regions; the model has seen phantoms only)", *real)
    elif real_data:
        print(f"\nReal MRI skipped: {skipped}")
    print(f"\nModels: {models}  Metrics: {outputs}")
