"""What interactive sessions cost in memory, measured against what the session cache reports (issue 19, case 11).

    .venv/bin/python scripts/session_memory.py sessions --count 20 --shape 32,128,128 --image_size 128
    .venv/bin/python scripts/session_memory.py concurrent --clients 3 --shape 300,512,512 --caps 1,2,3
    .venv/bin/python scripts/session_memory.py server --bursts 5 --clients 20 --shape 16,64,64 --image_size 64

``sessions``: one process runs the service in-process (tiny preset), opens ``count``
sessions (one client each, first click) on phantoms of ``shape`` ``(D, H, W)``, and prints
the process's resident memory growth per session beside the growth of the cache's own
count (``session_cache_mb``); the cap is meant to be within 2x of what the process grows.

``server``: a real server on loopback (tiny preset, the app's defaults otherwise, room for
every session) gets ``bursts`` bursts of ``clients`` simultaneous first clicks, each from a
new client; after each burst it prints the server's resident growth per new session beside
the cache's count per new session. The first burst also pays for the network and the
threads; the later ones show what a session costs.

``concurrent``: for each volume-slot cap (``--conf max_preprocessing``), a fresh process
sends ``clients`` simultaneous first clicks on one random volume of ``shape`` and prints
the peak resident memory above the idle process (sampled every 10 ms), the wall time and
how many were answered busy. Caps equal to ``clients`` are the unbounded case.

Numbers depend on the machine and its load: they are printed, never asserted.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fire
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"blob": 1, "tube": 2, "block": 3}


def _shape(value) -> tuple[int, int, int]:
    values = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    if len(values) != 3:
        raise SystemExit(f"--shape must be D,H,W, got {value!r}.")
    return tuple(values)  # type: ignore[return-value]


def _service(root: Path, image_size: int, **limits):
    from model_core.service import SegmentationService, ServiceConfig

    known = {f.name for f in dataclasses.fields(ServiceConfig)}  # an older checkout has fewer options
    config = ServiceConfig(bundle_dir=str(ROOT / "bundle"), labels=LABELS, checkpoint=str(root / "none.pt"),
                           preset="tiny", image_size=int(image_size), window=(0, 1),
                           **{k: v for k, v in limits.items() if k in known})
    return SegmentationService(config)


def sessions(count: int = 20, shape="16,64,64", image_size: int = 64, images: int = 4) -> None:
    """Resident memory growth per interactive session vs the growth of ``session_cache_mb``."""
    from model_core.phantoms import write_phantom_dataset

    D, H, W = _shape(shape)
    root = Path(tempfile.mkdtemp(prefix="session_memory_"))
    datalist = json.loads(Path(write_phantom_dataset(str(root), train=images, validation=0, test=0,
                                                     shape=(D, H, W))).read_text())
    paths = [str(root / case["image"]) for case in datalist["training"]]
    service = _service(root, image_size, max_sessions=10 * (count + images), session_cache_mb=1e9)
    process = psutil.Process()

    def click(client: str, n: int):
        return service.interact(client, paths[n % len(paths)], "blob", foreground=[[W // 2, H // 2, D // 2]])

    for n in range(images):  # warm-up: the network, the allocator's pools, one session per image
        click(f"warm{n}", n)
    gc.collect()
    rss, reported = process.memory_info().rss, click("warm0", 0).info["session_cache_mb"]
    for n in range(count):
        info = click(f"client{n}", n).info
    gc.collect()
    grown = (process.memory_info().rss - rss) / 2**20 / count
    counted = (info["session_cache_mb"] - reported) / count
    figures = {"shape": [D, H, W], "image_size": image_size, "sessions": count,
               "process_growth_mib_per_session": round(grown, 2), "reported_mib_per_session": round(counted, 2),
               "growth_over_reported": round(grown / counted, 2) if counted > 0 else None}
    for key, value in figures.items():
        print(f"{key:>32}: {value}")


def server(bursts: int = 5, clients: int = 20, shape="16,64,64", image_size: int = 64, images: int = 4) -> None:
    """Resident growth of a real server per new session, burst after burst, against the cache's count."""
    import requests

    from monailabel_server import Server  # beside this script: its folder is sys.path[0]
    from model_core.phantoms import write_phantom_dataset

    D, H, W = _shape(shape)
    root = Path(tempfile.mkdtemp(prefix="session_memory_"))
    datalist = json.loads(Path(write_phantom_dataset(str(root / "src"), train=images, validation=0, test=0,
                                                     shape=(D, H, W))).read_text())
    studies = root / "studies"
    studies.mkdir()
    for i, case in enumerate(datalist["training"]):
        (studies / f"case{i}.nii.gz").write_bytes((root / "src" / case["image"]).read_bytes())
    conf = {"preset": "tiny", "image_size": str(image_size), "labels": json.dumps(LABELS), "device": "cpu",
            "checkpoint": str(root / "none.pt"), "max_sessions": str(bursts * clients + 1)}
    running = Server(studies, conf, root / "server.log")
    process = psutil.Process(running.process.pid)
    replies: dict[str, tuple[int, float]] = {}

    def click(client: str, image: str) -> None:
        params = {"foreground": [[W // 2, H // 2, D // 2]], "label": "blob", "client_id": client}
        for _ in range(100):  # a busy answer is sent again after its Retry-After
            response = requests.post(f"{running.url}/infer/icl_sam2_interactive", params={"image": image},
                                     data={"params": json.dumps(params)}, timeout=900)
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("Retry-After", 1)))
        part = response.content.split(b'name="params"')[1]
        info = json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"\r\n--")[0])
        replies[client] = (info["sessions"], info["session_cache_mb"])

    try:
        before = (process.memory_info().rss, 0, 0.0)
        for b in range(bursts):
            threads = [threading.Thread(target=click, args=(f"b{b}c{n}", f"case{n % images}"))
                       for n in range(clients)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            rss = process.memory_info().rss
            sessions, reported = max(replies.values())
            new = max(sessions - before[1], 1)
            grown, counted = (rss - before[0]) / 2**20 / new, (reported - before[2]) / new
            print(f"burst {b}: server {rss / 2**20:.0f} MiB, {sessions} sessions, cache {reported} MiB; "
                  f"per new session +{grown:.2f} MiB resident vs {counted:.2f} MiB counted ({grown / counted:.2f}x)")
            before = (rss, sessions, reported)
    finally:
        running.stop()


def _burst(path: str, clients: int, cap: int, image_size: int, wait_s: float) -> None:
    """One cap, in this (fresh) process: prints a JSON line with the figures."""
    from model_core.validation import InputError

    root = Path(path).parent
    service = _service(root, image_size, max_preprocessing=cap, preprocessing_wait_s=wait_s)
    small = root / "small.nii.gz"
    service.interact("warm", str(small), "blob", foreground=[[8, 8, 4]])  # the network and the code paths, warm
    gc.collect()
    process = psutil.Process()
    idle = process.memory_info().rss
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.01)

    shape = __import__("nibabel").load(path).shape
    barrier = threading.Barrier(clients)
    outcome: list[str] = []

    def click(n: int):
        barrier.wait()
        try:
            service.interact(f"client{n}", path, "blob", foreground=[[s // 2 for s in shape]])
            outcome.append("ok")
        except InputError as e:
            outcome.append(f"busy {getattr(e, 'retry_after', '?')} s" if e.status == 503 else f"error {e}")

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=click, args=(n,)) for n in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({"cap": cap, "clients": clients, "peak_above_idle_mib": round((peak[0] - idle) / 2**20),
                      "wall_s": round(wall, 1), "answers": sorted(outcome)}))


def concurrent(clients: int = 3, shape="300,512,512", caps="1,2,3", image_size: int = 64,
               wait_s: float = 600.0) -> None:
    """Peak memory and wall time of ``clients`` simultaneous first clicks on one volume, per volume-slot cap."""
    import nibabel as nib

    D, H, W = _shape(shape)
    root = Path(tempfile.mkdtemp(prefix="session_memory_"))
    path = root / "big.nii"  # uncompressed: reading it is the preprocessing's work, not gzip's
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((W, H, D), dtype=np.float32), np.diag([0.7, 0.7, 1.0, 1.0])), str(path))
    nib.save(nib.Nifti1Image(rng.random((16, 16, 8), dtype=np.float32), np.eye(4)), str(root / "small.nii.gz"))
    for cap in [int(c) for c in (caps if isinstance(caps, (list, tuple)) else str(caps).split(","))]:
        command = [sys.executable, __file__, "_burst", str(path), str(clients), str(cap), str(image_size), str(wait_s)]
        line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        figures = json.loads(line)
        print(f"cap {figures['cap']} ({clients} clients, volume {W}x{H}x{D}): "
              f"peak +{figures['peak_above_idle_mib']} MiB above idle, {figures['wall_s']} s, "
              f"answers {figures['answers']}")
    path.unlink()


if __name__ == "__main__":
    fire.Fire({"sessions": sessions, "server": server, "concurrent": concurrent, "_burst": _burst})
