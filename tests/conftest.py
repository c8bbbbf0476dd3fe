"""Test-wide settings: quiet progress bars (sam2's propagate_in_video uses tqdm), and the ``icl-sam2`` command."""

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def icl_sam2_command() -> list[str]:
    """The installed ``icl-sam2`` console command (``scripts/setup.sh`` installs it beside the venv's Python).

    A checkout used without its own install (another worktree sharing a venv) runs the same entry point as
    ``python -m icl_sam2``, which its PYTHONPATH resolves to the checkout.
    """
    installed = shutil.which("icl-sam2", path=str(Path(sys.executable).parent))
    if installed and not os.environ.get("PYTHONPATH"):
        return [installed]
    return [sys.executable, "-m", "icl_sam2"]


#: the trained tiny model's settings (the demo's recipe, icl_sam2.demo.phantom_training_args, at a test's size)
TRAINED_TINY = {
    "image_size": 64,
    "shape": (16, 64, 64),
    "steps": int(os.environ.get("ICL_SAM2_TEST_STEPS", "400")),
    "epochs": 2,
    "train": 6,
    "validation": 2,
    "test": 2,
    "seed": 0,
}


def _trained_tiny_key() -> str:
    """A digest of what the trained weights depend on: the settings, the recipe, the architecture and train.json.

    Not the library's code: a change there that alters the architecture changes the preset's config (and a
    checkpoint of another architecture fails to load, loudly); other edits keep the cached weights valid.
    """
    import hashlib
    import json

    from icl_sam2.demo import phantom_training_args
    from model_core.modeling.presets import preset_config

    root = Path(__file__).resolve().parents[1]
    t = TRAINED_TINY
    parts = [sorted(t.items()), phantom_training_args(t["steps"], t["epochs"]), preset_config("tiny", t["image_size"])]
    digest = hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode())
    digest.update((root / "bundle" / "configs" / "train.json").read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> dict:
    """The tiny preset trained on phantoms through the bundle (``monai.bundle run training``, the demo's recipe).

    Shared by the tests that need weights which segment (stopping at a structure's end, corrective clicks, Dice
    against truth). Kept under ``ICL_SAM2_TEST_CACHE`` (default ``~/.cache/icl_sam2_tests``) by a digest of the
    library, the configs and the settings, so a rerun on unchanged code trains nothing; CI trains once.

    Returns:
        ``{"checkpoint", "datalist", "labels" {name: value}, "image_size", "root"}`` (files in the phantom folder).
    """
    import json
    import subprocess

    from icl_sam2.demo import TRAIN, phantom_training_args
    from model_core.io.phantoms import write_phantom_dataset

    cache = Path(os.environ.get("ICL_SAM2_TEST_CACHE", Path.home() / ".cache" / "icl_sam2_tests"))
    root = cache / f"trained_tiny_{_trained_tiny_key()}"
    checkpoint = root / "models" / "model.pt"
    datalist = root / "phantoms" / "datalist.json"
    if not checkpoint.is_file():
        work = tmp_path_factory.mktemp("trained_tiny")
        t = TRAINED_TINY
        data = write_phantom_dataset(
            str(work / "phantoms"),
            train=t["train"],
            validation=t["validation"],
            test=t["test"],
            shape=t["shape"],
            seed=t["seed"],
        )
        labels = json.loads(Path(data).read_text())["labels"]
        command = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            TRAIN,
            "--bundle_root",
            str(work),
            "--ckpt_dir",
            str(work / "models"),
            "--output_dir",
            str(work / "out"),
            "--datalist_file",
            data,
            "--preset",
            "tiny",
            "--image_size",
            str(t["image_size"]),
            "--classes",
            json.dumps(sorted(labels.values())),
            "--intensity#window",
            "[0,1]",
            *phantom_training_args(t["steps"], t["epochs"]),
        ]
        root_dir = Path(__file__).resolve().parents[1]
        done = subprocess.run(
            command, cwd=root_dir, capture_output=True, text=True, timeout=3600, env={**os.environ, "TQDM_DISABLE": "1"}
        )
        assert done.returncode == 0, f"training the test model failed:\n{done.stderr[-4000:]}"
        staged = root.with_name(f"{root.name}.{os.getpid()}.tmp")  # whole or not at all: other sessions may race
        shutil.copytree(work, staged, ignore=shutil.ignore_patterns("out"))
        try:
            os.rename(staged, root)
        except OSError:  # another session stored the same model first
            shutil.rmtree(staged, ignore_errors=True)
    labels = json.loads(datalist.read_text())["labels"]
    return {
        "checkpoint": str(checkpoint),
        "datalist": str(datalist),
        "labels": labels,
        "image_size": TRAINED_TINY["image_size"],
        "root": str(root),
    }


def _forked_call(target, args, results) -> None:
    import torch

    torch.set_num_threads(1)  # as a DataLoader worker does: OpenMP's threads are not forked
    results.put(target(*args))


@pytest.fixture
def run_forked():
    """``run_forked(target, *args)``: ``target(*args)`` in a process forked from this one, its result, or a failure
    when it has not finished in 60 s (a thread pool inherited from the parent waits for ever)."""
    import multiprocessing

    def run(target, *args):
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_forked_call, args=(target, args, results))
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
            pytest.fail(f"{target.__name__} did not finish in a forked process in 60 s")
        assert child.exitcode == 0
        return results.get(timeout=5)

    return run
