"""``icl-sam2 demo``, the README's first command, on short settings."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from icl_sam2 import demo
from icl_sam2.demo import phantom_training_args, training_processes
from model_core.io.mricron import available
from model_core.io.phantoms import write_phantom_dataset
from model_core.io.pictures import montage_size

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, env=env, check=check, timeout=1200)


@pytest.mark.slow
def test_main_job_runs_the_bundle_end_to_end(tmp_path, icl_sam2_command):
    """The README's first command (short settings): train, evaluate, infer and the real-MRI evaluation."""
    out = _run(
        *icl_sam2_command,
        "demo",
        "--steps",
        "4",
        "--epochs",
        "2",
        "--image_size",
        "64",
        "--bundle_root",
        str(tmp_path / "bundle"),
    ).stdout
    # each step shown as a command; training data-parallel in 2 processes on a CPU with 2 or more cores
    processes = training_processes()
    training = next(line for line in out.splitlines() if "monai.bundle run training" in line)
    first = "$ OMP_NUM_THREADS=" if processes == 2 else "$ python -m monai.bundle run training --config_file"
    assert training.startswith(first), training
    assert ("--nproc_per_node=2 -m monai.bundle run training" in training) == (processes == 2)
    assert f"--batch_size {2 // processes} " in training
    assert f"--warmup_fraction {demo.WARMUP_FRACTION} " in training  # the demo's warm-up, stated
    assert "Held-out test phantoms" in out
    for model in ("untrained", "trained"):
        rows = [line.split() for line in out.splitlines() if line.strip().startswith(f"{model} ")]
        assert [r[1] for r in rows][:4] == ["blob", "tube", "block", "mean"]
        assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)  # Dice
    outputs = tmp_path / "bundle" / "outputs"
    for model in ("untrained", "trained"):
        labels = sorted((outputs / f"{model}_model").glob("*_seg.nii.gz"))
        assert len(labels) == 3 and len(list(labels[0].parent.glob("*_confidence.json"))) == 3
    assert (tmp_path / "bundle" / "models" / "model_final.pt").exists()
    assert ("Real T1 MRI" in out) == available()
    # the pictures, their paths printed: a montage of 4 rows (2 cases, before and after) and the curve
    montage, curve = outputs / "demo_montage.png", outputs / "training_curve.png"
    assert f"montage: {montage}" in out and f"training curve: {curve}" in out
    assert Image.open(montage).size == montage_size(4, 6, 96)
    assert Image.open(curve).size == (700, 260)
    epochs = json.loads((outputs / "train" / "training_curve.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and all("val_mean_dice" in e for e in epochs)
    assert epochs[0]["loss"] is None and all(e["loss"] > 0 for e in epochs[1:])
    summary = json.loads((outputs / "demo_summary.json").read_text())
    assert summary["machine"]["processor"] and summary["seconds"]["training"] > 0
    assert summary["settings"]["training_processes"] == processes

    # the README's next command, as written, beside the demo's bundle folder
    block = re.search(r"```bash\n(\.venv/bin/icl-sam2 segment .*?)```", (ROOT / "README.md").read_text(), re.S)
    args = shlex.split(block.group(1).replace("\\\n", " "))[1:]
    done = subprocess.run(
        [*icl_sam2_command, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    query = os.path.basename(args[args.index("--input") + 1])  # a test phantom of the demo's
    test_cases = json.loads((tmp_path / "bundle" / "data" / "phantoms" / "datalist.json").read_text())["test"]
    assert query in [os.path.basename(case["image"]) for case in test_cases]
    seg = query.replace("_image.nii.gz", "_image_seg.nii.gz")
    assert (tmp_path / "out" / seg).is_file() and (tmp_path / "out" / "preview.png").is_file()


def test_two_training_processes_split_the_batch_not_the_recipe():
    """2 data-parallel processes of 1 episode each: the same batch of 2 and the same iterations as one process."""
    one, two = (dict(zip(a[0::2], a[1::2])) for a in (phantom_training_args(300, 3), phantom_training_args(300, 3, 2)))
    assert (one["--batch_size"], two["--batch_size"]) == ("2", "1")
    # DistributedSampler gives each of 2 processes half the episodes: 100 iterations per epoch either way
    assert one["--episodes_per_epoch"] == two["--episodes_per_epoch"] == "200"
    one.pop("--batch_size"), two.pop("--batch_size")
    assert one == two
    with pytest.raises(ValueError, match="processes must be 1 or 2"):
        phantom_training_args(300, 3, 4)
    # train.json's 5% unless a run asks for another share
    assert one["--warmup_fraction"] == "0.05"
    assert dict(zip(*[iter(phantom_training_args(300, 3, warmup_fraction=0.25))] * 2))["--warmup_fraction"] == "0.25"


def test_training_processes_follow_the_cores_this_process_may_use(monkeypatch):
    """A container or ``taskset`` that leaves one core gets one process, whatever the host's core count."""
    monkeypatch.setattr(demo.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {3})
    assert demo.usable_cores() == 1 and training_processes() == 1
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda pid: {0, 5})
    assert training_processes() == 2 and training_processes(1) == 1


def test_phantoms_of_an_older_demo_are_told_apart_by_their_counts(tmp_path):
    """A bundle folder from an older demo (8 training phantoms, the same size) is rewritten, not reused: the layout
    the demo compares holds the count per split as well as the shape."""
    datalist = tmp_path / "datalist.json"
    assert demo._phantom_layout(datalist) is None
    write_phantom_dataset(str(tmp_path), train=2, validation=1, test=1, shape=(4, 16, 16))
    assert demo._phantom_layout(datalist) == ((4, 16, 16), {"train": 2, "validation": 1, "test": 1})
    wanted = {k: demo.PHANTOMS[k] for k in ("train", "validation", "test")}
    assert demo._phantom_layout(datalist) != ((4, 16, 16), wanted)


def test_phantoms_that_cannot_be_used_as_they_are_are_written_again(tmp_path):
    """A missing phantom (of any split) or a broken datalist makes the demo write its phantoms again, not fail."""
    datalist = tmp_path / "datalist.json"
    write_phantom_dataset(str(tmp_path), train=2, validation=1, test=1, shape=(4, 16, 16))
    listed = json.loads(datalist.read_text())
    (tmp_path / listed["test"][0]["label"]).unlink()
    assert demo._phantom_layout(datalist) is None
    for text in ('{"training": []}', '{"training": [{"image": "case000_image.nii.gz"}]}', "not json", "[]"):
        datalist.write_text(text)
        assert demo._phantom_layout(datalist) is None, text
