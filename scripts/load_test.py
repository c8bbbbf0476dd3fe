"""A bounded load test of the MONAI Label app on loopback: N interactive clients, M clicks each, and probes
of the requests that need no model (/info, datastore listing, a label upload) while they run.

    .venv/bin/python scripts/load_test.py --clients 20 --requests 3

Starts its own server (tiny preset, generated phantom study) unless ``--url`` names a
running one, which must be a loopback address. Every loop is bounded by a count and by
``--deadline`` seconds; the script stops by itself and prints:

- client latency of the interactive requests (min / median / max) and the server's own
  time for them (the reply's ``seconds``);
- latency of ``GET /info/``, ``GET /datastore/`` and ``PUT /datastore/label`` sent during the burst;
- how many follow-up clicks had to encode their image again (evicted sessions).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import fire
import requests

from icl_sam2.servers import APP, MonaiLabelServer

from model_core.io.phantoms import PHANTOM_LABELS as LABELS
from model_core.io.phantoms import write_phantom_dataset


def _stats(values: list[float]) -> str:
    if not values:
        return "none"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s (n={len(values)})"


def run(clients: int = 20, requests_per_client: int = 3, images: int = 4, shape: tuple[int, int, int] = (16, 64, 64),
        preset: str = "tiny", image_size: int = 64, url: str | None = None, app: str = str(APP),
        deadline: float = 600.0, probe_interval: float = 0.25, workdir: str | None = None) -> dict:
    """Run the load test and print the figures; returns them as a dict.

    Args:
        clients: concurrent interactive clients (one thread each).
        requests_per_client: clicks per client (the first encodes the image, later ones add a click).
        images: phantom volumes in the study (clients share them round-robin).
        shape: ``(D, H, W)`` of each phantom.
        preset, image_size: the network of a server started here.
        url: a running server to test instead (loopback only).
        app: the MONAI Label app folder of a server started here (e.g. an older checkout, to compare).
        deadline: seconds after which every loop stops.
        probe_interval: seconds between probes of the requests that need no model.
        workdir: where the study and the server's log go (default: a new temporary folder).
    """
    host = urllib.parse.urlparse(url).hostname if url else "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must be a loopback address (127.0.0.1, localhost, ::1), got {host!r}.")
    root = Path(workdir or tempfile.mkdtemp(prefix="icl_sam2_load_"))
    datalist = json.loads(Path(write_phantom_dataset(str(root / "src"), train=images, validation=0, test=0, shape=shape)).read_text())
    cases = datalist["training"]
    server = None
    if url is None:
        studies = root / "studies"
        studies.mkdir(exist_ok=True)
        for i, case in enumerate(cases):
            (studies / f"case{i}.nii.gz").write_bytes((root / "src" / case["image"]).read_bytes())
        server = MonaiLabelServer(studies, {"preset": preset, "image_size": str(image_size), "labels": json.dumps(LABELS),
                                  "device": "cpu", "checkpoint": str(root / "none.pt")}, root / "server.log", app=Path(app))
        url = server.url
    stop_at = time.time() + deadline
    results: dict[str, list] = {"latency": [], "server": [], "info": [], "listing": [], "upload": [], "errors": []}
    evicted = [0]
    lock = threading.Lock()
    burst_done = threading.Event()
    depth, height, width = shape

    def client(n: int) -> None:
        image = f"case{n % len(cases)}"
        points = [[width // 2, height // 2, depth // 2]]
        for r in range(requests_per_client):
            if time.time() > stop_at:
                return
            params = {"foreground": points, "label": "blob", "client_id": f"client{n}"}
            start = time.perf_counter()
            try:
                response = requests.post(f"{url}/infer/icl_sam2_interactive", params={"image": image},
                                         data={"params": json.dumps(params)}, timeout=max(stop_at - time.time(), 1))
                seconds = time.perf_counter() - start
                info = json.loads(response.content.split(b'name="params"')[1].split(b"\r\n\r\n", 1)[1].split(b"\r\n--")[0])
            except Exception as e:  # noqa: BLE001 - counted and reported, the load test goes on
                with lock:
                    results["errors"].append(f"client{n}: {type(e).__name__}: {e}")
                return
            with lock:
                results["latency"].append(seconds)
                results["server"].append(float(info.get("seconds", 0)))
                if r > 0 and info.get("encoded_slices", 0) > 0:
                    evicted[0] += 1
            points = points + [[points[-1][0] + 1, points[-1][1], points[-1][2]]]

    label_file = root / "src" / cases[0]["label"]

    def probe() -> None:
        while not burst_done.is_set() and time.time() < stop_at:
            for key, call in (
                ("info", lambda: requests.get(f"{url}/info/", timeout=60)),
                ("listing", lambda: requests.get(f"{url}/datastore/", timeout=60)),
                ("upload", lambda: requests.put(f"{url}/datastore/label", params={"image": "case0", "tag": "final"},
                                                files={"label": ("case0.nii.gz", label_file.read_bytes())}, timeout=60)),
            ):
                start = time.perf_counter()
                try:
                    response = call()
                    ok = response.status_code == 200
                except Exception as e:  # noqa: BLE001
                    ok, response = False, e
                with lock:
                    if ok:
                        results[key].append(time.perf_counter() - start)
                    else:
                        results["errors"].append(f"{key}: {getattr(response, 'status_code', response)}")
            burst_done.wait(probe_interval)

    try:
        requests.put(f"{url}/datastore/label", params={"image": "case0", "tag": "final"},
                     files={"label": ("case0.nii.gz", label_file.read_bytes())}, timeout=60)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        prober = threading.Thread(target=probe)
        started = time.perf_counter()
        prober.start()
        [t.start() for t in threads]
        [t.join(timeout=max(stop_at - time.time(), 1)) for t in threads]
        wall = time.perf_counter() - started
        burst_done.set()
        prober.join(timeout=60)
    finally:
        if server is not None:
            server.stop()
    figures = {
        "clients": clients, "requests_per_client": requests_per_client, "wall_s": round(wall, 2),
        "client_latency": _stats(results["latency"]), "server_time": _stats(results["server"]),
        "info_during_burst": _stats(results["info"]), "listing_during_burst": _stats(results["listing"]),
        "label_upload_during_burst": _stats(results["upload"]), "follow_ups_that_encoded_again": evicted[0],
        "errors": results["errors"][:10], "error_count": len(results["errors"]),
    }
    for key, value in figures.items():
        print(f"{key:>30}: {value}")
    return figures


def main(**kwargs) -> None:
    run(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
