"""The bundle's training workflow runs end to end on CPU through MONAI's real entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core import build_icl_sam2
from model_core.io.phantoms import write_phantom_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "preset": "tiny",
    "image_size": 64,
    "num_support": 2,
    "num_query": 3,
    "batch_size": 2,
    "episodes_per_epoch": 4,
    "train_encoder": "all",
    "classes": [1, 2, 3],
    "intensity#window": [0, 1],
}


pytestmark = pytest.mark.slow  # monai.bundle runs in subprocesses


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("phantoms")), train=3, validation=1, test=0, shape=(12, 64, 64))


def _cli(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return args


def _run(workflow: str, overrides: dict, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        workflow,
        "--config_file",
        "bundle/configs/train.json",
        *_cli(overrides),
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, check=check, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
    )


def test_training_via_monai_bundle_run(phantoms, tmp_path):
    out = _run(
        "training",
        {
            **SMALL,
            "datalist_file": phantoms,
            "max_epochs": 2,
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path),
        },
    )
    log = out.stderr + out.stdout
    assert "Train completed" in log
    assert log.count("val_mean_dice:") >= 2  # validation on full volumes after each epoch
    assert (tmp_path / "models" / "model.pt").exists()  # best checkpoint by Dice
    from model_core import load_checkpoint as strict_load  # it holds Ignite's best-metric record beside the weights

    strict_load(build_icl_sam2("tiny", image_size=64), str(tmp_path / "models" / "model.pt"))
    from model_core.modeling.checkpoint import checkpoint_record

    for name in ("model.pt", "model_final.pt"):  # every checkpoint says what it was trained as
        record = checkpoint_record(str(tmp_path / "models" / name))
        assert record["preset"] == "tiny" and record["image_size"] == 64 and record["classes"] == SMALL["classes"], (
            record
        )
        assert record["modality"] == "CT" and record["window"] == [0.0, 1.0] and record["channel_mode"] == "replicate"
    final = tmp_path / "models" / "model_final.pt"
    assert final.exists() and (tmp_path / "models" / "latest_checkpoint_epoch=2.pt").exists()
    torch.manual_seed(123)
    model = build_icl_sam2("tiny", image_size=64)
    before = model.memory_encoder.pix_feat_proj.weight.clone()
    build_icl_sam2("tiny", image_size=64, checkpoint=str(final))  # strict load of the bundle's checkpoint
    from model_core import load_checkpoint

    load_checkpoint(model, str(final))
    assert not torch.equal(before, model.memory_encoder.pix_feat_proj.weight)
    assert list(tmp_path.glob("events.out.tfevents*"))  # TensorBoard log written


def test_config_workflow_run_id(phantoms, tmp_path):
    """MONAI Label's BundleTrainTask drives bundles through ConfigWorkflow and the `run` id."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "bundle/configs/train.json"),
        workflow_type="train",
        **{
            **SMALL,
            "datalist_file": phantoms,
            "max_epochs": 1,
            "ckpt_dir": str(tmp_path / "m"),
            "output_dir": str(tmp_path),
        },
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (tmp_path / "m" / "model_final.pt").exists()
    assert workflow.train_dataset_data  # the model-zoo key train#dataset#data resolves


def test_bad_input_stops_before_training(phantoms, tmp_path):
    missing = _run("training", {**SMALL, "datalist_file": str(tmp_path / "nope.json")}, check=False)
    assert missing.returncode != 0 and "does not exist; write one with icl-sam2 datalist" in missing.stderr
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"training": []}))
    out = _run("training", {**SMALL, "datalist_file": str(empty)}, check=False)
    assert out.returncode != 0 and "'training' list of datalist" in out.stderr and "is empty" in out.stderr
    absent = _run("training", {**SMALL, "datalist_file": phantoms, "classes": [7]}, check=False)
    assert absent.returncode != 0 and "Class 7 appears in fewer than two volumes" in absent.stderr
    # a label on another grid, and a file that is no image: named at start-up, before any training step
    cases = json.loads(Path(phantoms).read_text())
    base = Path(phantoms).parent
    img = nib.load(str(base / cases["training"][0]["label"]))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), str(tmp_path / "short_label.nii.gz"))
    (tmp_path / "junk.nii.gz").write_bytes(b"\x00" * 64)
    for bad_case, message in (
        ({"label": str(tmp_path / "short_label.nii.gz")}, "they must be on the same grid"),
        ({"image": str(tmp_path / "junk.nii.gz")}, "as an image volume"),
    ):
        listed = {
            **cases,
            "training": [
                {k: str(base / v) for k, v in cases["training"][0].items()} | bad_case,
                *cases["training"][1:],
            ],
        }
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(listed))
        out = _run("training", {**SMALL, "datalist_file": str(path)}, check=False)
        assert out.returncode != 0 and "Entry 0 of 'training'" in out.stderr and message in out.stderr
        assert "Epoch:" not in out.stderr + out.stdout


# a run id that interrupts training like Ctrl-C in the middle of epoch 2, and one that records the resumed state
INTERRUPT = {
    "probe_imports": ["$import json", "$from ignite.engine import Events"],
    "ctrl_c": "$lambda engine: (_ for _ in ()).throw(KeyboardInterrupt('simulated Ctrl-C'))",
    "interrupted_run": [
        "$@train#trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), @ctrl_c)",
        "$@train#trainer.run()",
    ],
    "probe": "${}",
    "resumed_run": [
        "$@probe.update(best_record=len(@validate#best_checkpoint._key_metric_checkpoint._saved))",
        "$@train#trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: "
        "@probe.setdefault('first_iteration', e.state.iteration))",
        "$@train#trainer.run()",
        "$@probe.update(iteration=@train#trainer.state.iteration, epoch=@train#trainer.state.epoch,"
        " adam_steps=int(next(iter(@optimizer.state.values()))['step']), lr_steps=@lr_scheduler.last_epoch)",
        "$open(@probe_file, 'w').write(json.dumps(@probe))",
    ],
}


def test_resume_after_an_interruption_continues_where_it_stopped(phantoms, tmp_path):
    """Interrupted in epoch 2 of 3 (2 iterations per epoch), then resumed with ``--resume true``."""
    probe_config = tmp_path / "probe.json"
    probe_config.write_text(json.dumps(INTERRUPT))
    configs = str(["bundle/configs/train.json", str(probe_config)])
    overrides = {
        **SMALL,
        "datalist_file": phantoms,
        "max_epochs": 3,
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path),
        "probe_file": str(tmp_path / "state.json"),
    }

    def run(workflow: str, **extra) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            workflow,
            "--config_file",
            configs,
            *_cli({**overrides, **extra}),
        ]
        return subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"}
        )

    nothing = run("resumed_run", resume=True)
    assert nothing.returncode != 0 and "Nothing to resume from" in nothing.stderr
    first = run("interrupted_run")
    assert first.returncode != 0 and "simulated Ctrl-C" in first.stderr
    saved = torch.load(tmp_path / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    assert saved["trainer"]["iteration"] == 3  # the exception handler saved the state at the interruption
    assert (tmp_path / "models" / "model.pt").exists()  # best after epoch 1
    second = run("resumed_run", resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored all variables from" in second.stderr + second.stdout
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["first_iteration"] == 4  # continues inside epoch 2, nothing repeated
    assert (state["iteration"], state["epoch"]) == (6, 3)
    assert state["adam_steps"] == 6 and state["lr_steps"] == 6  # optimizer and schedule continued, not restarted
    assert state["best_record"] == 1  # the best-Dice record of epoch 1 survives, so a worse model does not replace it
