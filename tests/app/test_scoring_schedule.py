"""Automatic scoring out of the way of interactive requests (lib/scoring/schedule.py).

In-process: the schedule's rule on a clock the test advances, and idle CPU priority on a real
process. With the real server (slow): no run at start-up, one run for repeated Next Sample, a
new one after a saved label, every run at idle priority.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from lib.scoring.schedule import ScoringSchedule, lower_priority
from model_core.io.phantoms import write_phantom_dataset

from .conftest import Server


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _schedule(mode="idle", idle_s=30.0):
    clock, started, state = Clock(), [], {"labelled": ("a",), "weights": 1}
    schedule = ScoringSchedule(
        mode,
        idle_s,
        start_run=lambda: started.append(clock.now),
        scores_key=lambda: (state["weights"], state["labelled"]),
        weights_stamp=lambda: state["weights"],
        clock=clock,
    )
    return schedule, clock, started, state


def test_a_run_waits_for_idle_time_and_starts_only_for_changed_scores():
    schedule, clock, started, state = _schedule()
    assert schedule.tick(running=[]) is None and not started  # start-up asks for nothing
    schedule.ask("next sample")
    with schedule.request():  # an inference in flight: nothing starts, however long it takes
        clock.now += 100
        assert schedule.tick(running=[]) is None
    clock.now += 29
    assert schedule.tick(running=[]) is None  # 29 s after the request ended
    clock.now += 1
    assert schedule.tick(running=[]) == "next sample" and len(started) == 1
    # Next Sample again: the weights and labels are those of the last run, so no new run
    schedule.ask("next sample")
    clock.now += 60
    assert schedule.tick(running=[]) is None and len(started) == 1
    # a saved label changes the scores' key: one run, once idle, and not while one is running
    state["labelled"] = ("a", "b")
    schedule.ask("label saved")
    clock.now += 60
    assert schedule.tick(running=[12345]) is None
    assert schedule.tick(running=[]) == "label saved" and len(started) == 2
    # new weights (a training run published them) ask by themselves
    state["weights"] = 2
    clock.now += 60
    assert schedule.tick(running=[]) == "new weights" and len(started) == 3
    assert [reason for _, reason in schedule.runs] == ["next sample", "label saved", "new weights"]


def test_immediate_and_off_start_nothing_themselves():
    for mode in ("immediate", "off"):
        schedule, clock, started, _ = _schedule(mode)
        schedule.ask("next sample")
        clock.now += 1000
        assert schedule.tick(running=[]) is None and not started
    with pytest.raises(ValueError, match="--conf scoring must be one of idle, immediate, off"):
        _schedule("sometimes")


def test_a_scoring_process_gets_idle_cpu_priority_on_every_thread():
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import threading, time\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "time.sleep(60)",
        ]
    )
    try:
        deadline = time.time() + 30
        while len(os.listdir(f"/proc/{worker.pid}/task")) < 4 and time.time() < deadline:
            time.sleep(0.05)
        tids = [int(t) for t in os.listdir(f"/proc/{worker.pid}/task")]
        assert len(tids) == 4
        assert lower_priority(worker.pid) == 4
        assert all(os.sched_getscheduler(tid) == os.SCHED_IDLE for tid in tids)
        assert lower_priority(worker.pid) == 0  # nothing left to change
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # this process (the server's side) keeps its priority
    finally:
        worker.kill()
        worker.wait()
    assert lower_priority(worker.pid) == 0  # a process that ended changes nothing


def _scoring_processes(server: Server) -> list[psutil.Process]:
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "monailabel.interfaces.utils.app" in child.cmdline() and "scoring" in child.cmdline():
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def _runs(server: Server) -> list[dict]:
    response = requests.get(f"{server.url}/scoring/", params={"all": "true"}, timeout=60)
    return response.json() if response.status_code == 200 else []


def _wait_done(server: Server, count: int, timeout: float = 600) -> list[dict]:
    """Wait until ``count`` runs have ended; while one runs, check its threads' priority."""
    deadline, seen_idle = time.time() + timeout, False
    while time.time() < deadline:
        for process in _scoring_processes(server):
            try:
                threads = [t.id for t in process.threads()]
                if threads and all(os.sched_getscheduler(tid) == os.SCHED_IDLE for tid in threads):
                    seen_idle = True
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
        runs = _runs(server)
        if len(runs) >= count and all(r["status"] in ("DONE", "ERROR") for r in runs):
            return runs, seen_idle
        time.sleep(0.2)
    raise TimeoutError(f"scoring runs: {_runs(server)}")


@pytest.mark.slow
def test_the_server_scores_when_idle_once_per_change_at_idle_priority(tmp_path):
    data = json.loads(
        Path(write_phantom_dataset(str(tmp_path / "src"), train=3, validation=0, test=0, shape=(8, 32, 32))).read_text()
    )
    studies = tmp_path / "studies"
    studies.mkdir()
    for i, case in enumerate(data["training"]):
        shutil.copy(tmp_path / "src" / case["image"], studies / f"case{i}.nii.gz")
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(tmp_path / "src" / data["training"][0]["label"], studies / "labels" / "final" / "case0.nii.gz")
    server = Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps({"blob": 1, "tube": 2, "block": 3}),
            "device": "cpu",
            "checkpoint": str(tmp_path / "none.pt"),
            "scoring_idle_s": "1",
        },
        tmp_path / "server.log",
        env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"},  # MONAI Label's default; the test servers turn it off
    )
    try:
        info = requests.get(f"{server.url}/info/", timeout=60).json()
        assert info["scoring_schedule"]["mode"] == "idle"
        time.sleep(3)  # idle: MONAI Label would have started its start-up run by now
        assert _runs(server) == [] and not _scoring_processes(server)
        for _ in range(2):  # Next Sample twice: one run
            assert requests.post(f"{server.url}/activelearning/random", json={}, timeout=60).status_code == 200
        runs, seen_idle = _wait_done(server, 1)
        assert len(runs) == 1 and runs[0]["status"] == "DONE", runs
        assert seen_idle, "the scoring process was never seen at idle CPU priority"
        assert requests.post(f"{server.url}/activelearning/random", json={}, timeout=60).status_code == 200
        time.sleep(4)  # idle long enough for a run, but nothing changed since the last one
        assert len(_runs(server)) == 1
        with open(tmp_path / "src" / data["training"][1]["label"], "rb") as f:
            saved = requests.put(
                f"{server.url}/datastore/label",
                params={"image": "case1", "tag": "final"},
                files={"label": ("case1.nii.gz", f)},
                timeout=120,
            )
        assert saved.status_code == 200, saved.text
        runs, _ = _wait_done(server, 2)
        assert len(runs) == 2
        assert requests.get(f"{server.url}/info/", timeout=60).json()["scoring_schedule"]["runs_started"] == 2
        deadline = time.time() + 120  # the server reads the datastore file the scoring process wrote when it changes
        while time.time() < deadline:
            info = requests.get(f"{server.url}/datastore/image/info", params={"image": "case2"}, timeout=60).json()
            if "mean" in (info.get("icl_sam2_confidence") or {}):
                break
            time.sleep(1)
        assert "mean" in info["icl_sam2_confidence"], info  # the runs did score
    finally:
        server.stop()
