"""A studies folder in a box, a real server on it, and the guard every boundary test runs under.

``root/box/studies`` is the datastore and ``root/box`` must hold nothing else, ever;
``root/run`` is the server's working directory (where a relative escape would land),
``root/sessions`` its session store. :func:`guarded` checks after a test that the
server still answers ``/info``, that nothing appeared beside the studies folder or in
the run folder, and that no stored label changed (the pattern of ``test_hostile_clients``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import requests

from model_core.io.phantoms import write_phantom_dataset

from .conftest import Server

LABELS = {"blob": 1, "tube": 2, "block": 3}
SHAPE = (64, 64, 16)  # i, j, k of the NIfTI files
CONF = {"preset": "tiny", "image_size": "64", "labels": json.dumps(LABELS), "device": "cpu"}


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_site(root: Path, final_labels: int = 1, other_labels: dict[str, int] | None = None) -> dict:
    """Four phantom images ``case0..3``; the first ``final_labels`` have a final label; ``other_labels``:
    ``{tag: case index}`` adds one label under another tag."""
    datalist = json.loads(
        Path(
            write_phantom_dataset(
                str(root / "src"), train=4, validation=0, test=0, shape=(SHAPE[2], SHAPE[0], SHAPE[1])
            )
        ).read_text()
    )
    studies = root / "box" / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, case in enumerate(datalist["training"]):
        shutil.copy(root / "src" / case["image"], studies / f"case{i}.nii.gz")
        if i < final_labels:
            shutil.copy(root / "src" / case["label"], studies / "labels" / "final" / f"case{i}.nii.gz")
    for tag, i in (other_labels or {}).items():
        (studies / "labels" / tag).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "src" / datalist["training"][i]["label"], studies / "labels" / tag / f"case{i}.nii.gz")
    for folder in ("run", "sessions", "files"):
        (root / folder).mkdir()
    return {
        "root": root,
        "studies": studies,
        "src": root / "src",
        "datalist": datalist,
        "files": root / "files",
        "label": root / "src" / datalist["training"][1]["label"],
    }


def start(site: dict, conf: dict[str, str] | None = None, env: dict[str, str] | None = None, **kwargs) -> Server:
    root = site["root"]
    env = {"MONAI_LABEL_SESSION_PATH": str(root / "sessions"), **(env or {})}
    server = Server(
        site["studies"],
        {**CONF, "checkpoint": str(root / "models" / "model.pt"), **(conf or {})},
        root / "run" / "server.log",
        env=env,
        **kwargs,
    )
    site.update(server=server, url=server.url)
    return server


@contextlib.contextmanager
def guarded(site: dict) -> Iterator[None]:
    """The box and the run folder before; after: /info answers, nothing escaped, no stored label changed."""
    root = site["root"]
    box, run_dir = root / "box", root / "run"
    labels = tree(box / "studies" / "labels")
    run_before, root_before = set(os.listdir(run_dir)), set(os.listdir(root))
    yield
    assert requests.get(f"{site['url']}/info/", timeout=60).status_code == 200, "the server stopped serving"
    assert sorted(os.listdir(box)) == ["studies"], f"a file escaped the studies folder: {os.listdir(box)}"
    run_after, root_after = set(os.listdir(run_dir)), set(os.listdir(root))
    assert run_after <= run_before | {"logs"}, f"a file appeared in the run folder: {run_after - run_before}"
    assert root_after <= root_before, f"a file appeared beside the box: {root_after - root_before}"
    after = tree(box / "studies" / "labels")
    assert {k: v for k, v in after.items() if k in labels} == labels, "a stored label changed"


def detail(response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text
