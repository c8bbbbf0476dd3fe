"""The datastore index never breaks: ``kill -9`` of the real server during concurrent label saves, then a restart.

MONAI Label's ``LocalDatastore`` empties ``datastore_v2.json`` and then writes it; a
server killed in between left an empty index, and the next start failed ("Failed to
load datastore ... Application startup failed") until someone deleted the file with the
labels' info. Here each round starts the server on the same folder, checks that every
label whose save was answered 200 is listed with its info and served whole, saves
labels from several threads at once, and kills the server: as soon as the index is
seen empty (the worst instant, which the old code offered on every save), or at a
random instant. Then a broken index placed by hand is moved aside, rebuilt and logged.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from lib.datastore import CheckedDatastore
from model_core.io.phantoms import write_phantom_dataset

from .conftest import Server

pytestmark = pytest.mark.slow  # real MONAI Label servers, started five times

LABELS = {"blob": 1, "tube": 2, "block": 3}
IMAGES = 4
ROUNDS = 3
#: the temporary files ``model_core.io.files.atomic_path`` writes beside a file
TEMPORARY = re.compile(r"\..+\.\d+\.[0-9a-f]{12}\.tmp.*")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Phantom images ``case0..3`` and two versions of a label of different sizes (``versions[0]``, ``versions[1]``)."""
    root = tmp_path_factory.mktemp("index")
    datalist = json.loads(
        Path(
            write_phantom_dataset(str(root / "src"), train=IMAGES, validation=0, test=0, shape=(16, 64, 64))
        ).read_text()
    )
    studies = root / "studies"
    studies.mkdir()
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], studies / f"case{i}.nii.gz")
    label = np.asarray(nib.load(str(root / "src" / datalist["training"][0]["label"])).dataobj).astype(np.uint8)
    fewer = np.where(label == 3, 0, label).astype(np.uint8)
    versions = []
    for name, array in (("even", label), ("odd", fewer)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(root / f"{name}.nii.gz"))
        versions.append(root / f"{name}.nii.gz")
    assert versions[0].stat().st_size != versions[1].stat().st_size
    return {"root": root, "studies": studies, "versions": versions, "bytes": {p.read_bytes() for p in versions}}


def _start(site, studies: Path, name: str) -> Server:
    return Server(
        studies,
        {
            "preset": "tiny",
            "image_size": "64",
            "labels": json.dumps(LABELS),
            "device": "cpu",
            "checkpoint": str(site["root"] / "models" / "model.pt"),
        },
        site["root"] / f"{name}.log",
    )


def _kill(server: Server) -> None:
    try:
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.process.wait(timeout=30)


def _put_label(url: str, image: str, path: Path, info: dict) -> requests.Response:
    with open(path, "rb") as f:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image, "tag": "final"},
            data={"params": json.dumps(info)},
            files={"label": (path.name, f)},
            timeout=60,
        )


def _check_acknowledged(site, server: Server, acknowledged: dict[str, int], in_flight: dict[str, int]) -> None:
    """Every label saved with a 200 is listed with its info (or that of the save in flight) and served whole."""
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    for image, seq in acknowledged.items():
        label = objects[image]["labels"].get("final")
        assert label, f"the label of {image} (saved with 200, seq {seq}) is missing after the kill"
        assert label["info"].get("seq") in {seq, in_flight.get(image)}, (
            f"{image}: info {label['info']} after the kill; the last save answered 200 had seq {seq}"
        )
        assert label["info"]["name"] == f"{image}.nii.gz"
        body = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "final"}, timeout=30)
        assert body.status_code == 200 and body.content in site["bytes"], f"{image}: the stored label is not whole"
    left = [
        p.name
        for folder in (site["studies"], site["studies"] / "labels" / "final")
        for p in folder.iterdir()
        if TEMPORARY.fullmatch(p.name)
    ]
    assert not left, f"temporary files of interrupted writes were left: {left}"


def _save_until_killed(
    site, server: Server, acknowledged: dict[str, int], in_flight: dict[str, int], seconds: float
) -> bool:
    """One thread per image saves its label again and again; the server is killed as soon as its index is
    seen empty, else after ``seconds``. Returns whether the index was seen empty."""
    index = site["studies"] / "datastore_v2.json"
    refused: list[str] = []

    def save(image: str) -> None:
        seq = acknowledged.get(image, 0)
        while True:
            seq += 1
            in_flight[image] = seq
            try:
                response = _put_label(server.url, image, site["versions"][seq % 2], {"seq": seq, "by": "kill test"})
            except requests.RequestException:
                return  # the server was killed
            if response.status_code != 200:
                refused.append(f"{image} seq {seq}: {response.status_code} {response.text[:200]}")
                return
            acknowledged[image] = seq

    threads = [threading.Thread(target=save, args=(f"case{i}",), daemon=True) for i in range(IMAGES)]
    for thread in threads:
        thread.start()
    seen_empty = False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not seen_empty:
        try:
            seen_empty = index.stat().st_size == 0
        except FileNotFoundError:
            pass
    _kill(server)
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not refused, f"saves refused before the kill: {refused}"
    return seen_empty


def test_kill_9_during_concurrent_saves_loses_no_acknowledged_label(site):
    rng = random.Random(19)
    acknowledged: dict[str, int] = {}  # image -> seq of its last save answered 200
    in_flight: dict[str, int] = {}  # image -> seq of its last save sent
    empty_seen = 0
    for round_ in range(ROUNDS + 1):
        server = _start(site, site["studies"], f"round{round_}")  # fails on an index the kill broke
        try:
            _check_acknowledged(site, server, acknowledged, in_flight)
            if round_ < ROUNDS:
                empty_seen += _save_until_killed(site, server, acknowledged, in_flight, rng.uniform(1.0, 2.5))
        finally:
            _kill(server)
    assert len(acknowledged) == IMAGES and min(acknowledged.values()) > ROUNDS
    assert empty_seen == 0, f"the index was seen empty in {empty_seen} of {ROUNDS} rounds"


def test_an_unreadable_index_is_moved_aside_rebuilt_and_logged(site, tmp_path):
    """An empty index (as an older server left it) starts, with every label and the info of its last good copy."""
    # the server's own datastore class writes the folder, as a server run would
    studies = tmp_path / "studies"
    shutil.copytree(site["studies"], studies, ignore=shutil.ignore_patterns("labels", "datastore_v2.json*", ".*"))
    datastore = CheckedDatastore(str(studies), label_values=LABELS.values())
    for i in range(IMAGES):
        datastore.save_label(f"case{i}", str(site["versions"][i % 2]), "final", {"by": "annotator", "n": i})
    datastore.update_image_info("case0", {"note": "the last change, which only the broken index recorded"})
    del datastore
    index = studies / "datastore_v2.json"
    index.write_bytes(b"")

    server = _start(site, studies, "broken")
    try:
        objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        assert sorted(objects) == [f"case{i}" for i in range(IMAGES)]
        for i in range(IMAGES):
            info = objects[f"case{i}"]["labels"]["final"]["info"]
            assert info["by"] == "annotator" and info["n"] == i and info["name"] == f"case{i}.nii.gz"
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    finally:
        server.stop()
    broken = [p for p in studies.iterdir() if p.name.startswith("datastore_v2.json.broken-")]
    assert len(broken) == 1 and broken[0].read_bytes() == b"", "the broken index was not kept beside it"
    assert json.loads(index.read_text())["objects"]["case1"]["labels"]["final"]["info"]["n"] == 1
    log = (site["root"] / "broken.log").read_text()
    assert f"The datastore index {index} could not be read (it is empty" in log
    assert f"It was kept as {broken[0]}" in log and f"{index}.bak" in log
