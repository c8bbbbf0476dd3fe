"""multi_gpu_train.json: data-parallel training with two real processes (torchrun, gloo on CPU)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_core.io.phantoms import write_phantom_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = ["bundle/configs/train.json", "bundle/configs/multi_gpu_train.json"]
MAX_EPOCHS = 2
EPISODES = 8  # per epoch, split over the ranks: 2 episodes of batch 2 per rank and epoch
SMALL = {
    "preset": "tiny",
    "image_size": 64,
    "num_support": 2,
    "num_query": 3,
    "batch_size": 2,
    "episodes_per_epoch": EPISODES,
    "max_epochs": MAX_EPOCHS,
    "train_encoder": "all",
    "classes": [1, 2, 3],
    "intensity#window": [0, 1],
}

# Written next to the run by the test: a run id that wraps the bundle's own trainer.run() and
# records, per rank, what the assertions need (nothing here changes the training itself).
PROBE = {
    "probe_imports": ["$import hashlib", "$import json", "$from ignite.engine import Events"],
    "probe_record": "${'episodes': []}",
    "weights_sha": "$lambda: hashlib.sha256(b''.join(v.detach().cpu().contiguous().numpy().tobytes()"
    " for v in @network.state_dict().values())).hexdigest()",
    "checked_run": [
        "$@probe_record.update(rank=dist.get_rank(), world_size=dist.get_world_size(), before=@weights_sha(),"
        " train_handlers=[type(h).__name__ for h in @train#trainer#train_handlers],"
        " val_handlers=[type(h).__name__ for h in @validate#evaluator#val_handlers],"
        " trainer_network=type(@train#trainer.network).__name__, "
        "evaluator_network=type(@validate#evaluator.network).__name__)",
        "$@train#trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: @probe_record['episodes'].append("
        "hashlib.sha256(e.state.batch['query_images'].numpy().tobytes() + "
        "e.state.batch['query_masks'].numpy().tobytes()).hexdigest()))",
        "$@train#trainer.run()",
        "$@probe_record.update(after=@weights_sha())",
        "$open(os.path.join(@probe_dir, f'rank{dist.get_rank()}.json'), 'w').write(json.dumps(@probe_record))",
    ],
}


def _state_sha(state: dict) -> str:
    return hashlib.sha256(b"".join(v.detach().cpu().contiguous().numpy().tobytes() for v in state.values())).hexdigest()


def _cli(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return args


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process run (2 epochs) shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("ddp")
    # 3 validation volumes: an uneven split over 2 ranks (2 + 1)
    datalist = make_dataset(str(tmp / "phantoms"), train=3, validation=3, test=0, shape=(12, 64, 64))
    probe_file = tmp / "probe.json"
    probe_file.write_text(json.dumps(PROBE))
    (tmp / "probe").mkdir()
    overrides = {
        **SMALL,
        "datalist_file": datalist,
        "bundle_root": str(tmp / "bundle"),
        "ckpt_dir": str(tmp / "models"),
        "output_dir": str(tmp / "eval"),
        "probe_dir": str(tmp / "probe"),
    }
    configs = str([*CONFIGS, str(probe_file)])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "checked_run",
        "--config_file",
        configs,
        *_cli(overrides),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    probes = [json.loads((tmp / "probe" / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, datalist, log, probes


@pytest.mark.slow
def test_ranks_train_on_different_episodes_and_stay_in_sync(ddp_run):
    _, _, _, (r0, r1) = ddp_run
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["trainer_network"] == "DistributedDataParallel"  # only the trainer gets the DDP wrapper
    assert r0["evaluator_network"] != "DistributedDataParallel"
    # DistributedSampler splits the epoch's episodes: each rank runs EPISODES / 2 / batch iterations per epoch
    iterations = MAX_EPOCHS * EPISODES // 2 // SMALL["batch_size"]
    assert len(r0["episodes"]) == len(r1["episodes"]) == iterations
    # train#dataset#seed is the rank: no episode is shared between the ranks (nor repeated on a rank)
    assert len(set(r0["episodes"]) | set(r1["episodes"])) == 2 * iterations
    # same start, training changed the weights, and DDP kept them bitwise identical across ranks
    assert r0["before"] == r1["before"]
    assert r0["after"] != r0["before"]
    assert r0["after"] == r1["after"]


@pytest.mark.slow
def test_rank0_alone_writes_checkpoints_and_logs(ddp_run):
    tmp, _, log, (r0, r1) = ddp_run
    writers = {"TrainingCheckpointSaver", "StatsHandler", "TensorBoardStatsHandler"}
    assert writers <= set(r0["train_handlers"]) and not writers & set(r1["train_handlers"])
    assert {"ValidationHandler", "LrScheduleHandler", "GradientClipHandler"} <= set(r1["train_handlers"])
    assert {"StatsHandler", "MetricsSaver", "CheckpointSaver"} <= set(r0["val_handlers"])
    assert r1["val_handlers"] == ["MetricsSaver"]  # it all-gathers file names, so every rank runs it
    models = tmp / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted(
        ["model.pt", "model_final.pt", f"latest_checkpoint_epoch={MAX_EPOCHS}.pt"]
    )
    # the final checkpoint holds the weights both ranks ended with
    assert (
        _state_sha(torch.load(models / "model_final.pt", map_location="cpu", weights_only=True)["model"]) == r0["after"]
    )
    # StatsHandler logs once per epoch (rank 0), not once per rank
    assert log.count("Metrics -- val_hd95") == MAX_EPOCHS
    assert log.count("-- train_loss:") == len(r0["episodes"])
    assert "Train completed" in log
    assert len(list((tmp / "eval").glob("events.out.tfevents*"))) == 1  # rank 1 does not even create one


@pytest.mark.slow
def test_validation_metrics_cover_every_case_once(ddp_run):
    tmp, datalist, _, _ = ddp_run
    cases = {str(Path(datalist).parent / e["image"]) for e in json.loads(Path(datalist).read_text())["validation"]}
    with open(tmp / "eval" / "val_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cases) == 3 and {r["filename"] for r in rows} == cases
    # the key metric is computed over the cases of both ranks (all-gathered), not rank 0's share alone
    per_class = np.array([[float(r[f"class{i}"]) for i in range(3)] for r in rows])
    with open(tmp / "eval" / "metrics.csv") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f)}
    assert metrics["val_mean_dice"] == pytest.approx(float(np.nanmean(per_class)), rel=1e-5)


def test_merged_config_keeps_train_json_entry_points():
    from monai.bundle import ConfigParser

    train = ConfigParser.load_config_file(str(ROOT / CONFIGS[0]))
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in CONFIGS])
    for key in ("run", "training"):
        assert parser[key] == train[key]
    assert parser["train#trainer#network"] == "@ddp_network" and parser["ddp_network#module"] == "@network"
    assert parser["validate#evaluator#network"] == "@network"  # optimizer, savers, inferer keep the plain module
    assert "destroy_process_group" in " ".join(parser["finalize"])
