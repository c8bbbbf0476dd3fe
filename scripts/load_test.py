"""A bounded load test of the MONAI Label app on loopback: N interactive clients, M clicks each, and probes
of the requests that need no model (/info, datastore listing, a label upload) while they run.

    .venv/bin/python scripts/load_test.py --clients 20 --requests_per_client 3

Starts its own server (tiny preset, generated phantom study) unless ``--url`` names a
running one, which must be a loopback address. Every loop is bounded by a count and by
``--deadline`` seconds; the script stops by itself and prints:

- client latency of the interactive requests (min / median / max) and the server's own
  time for them (the reply's ``seconds``);
- latency of ``GET /info/``, ``GET /datastore/`` and ``PUT /datastore/label`` sent during the burst;
- how many follow-up clicks had to encode their image again (evicted sessions);
- the memory bound (a server started here): how many clicks were answered busy (503; the
  client waits the Retry-After seconds and sends the click again, as a well-behaved client
  does), the server's resident memory before the burst (after a warm-up of one first click
  per client, from as many threads), at its peak and after, and its growth per new
  session beside what the session cache reports per new session (``session_cache_mb``
  and ``sessions`` of the replies).

``--memory_bound false`` starts the server with the preprocessing cap lifted (``--conf
max_preprocessing`` = clients) to compare.
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
import psutil
import requests

from icl_sam2.servers import APP, MonaiLabelServer
from model_core.io.phantoms import PHANTOM_LABELS as LABELS
from model_core.io.phantoms import write_phantom_dataset


def _stats(values: list[float]) -> str:
    if not values:
        return "none"
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s (n={len(values)})"


def _rss(process: psutil.Process | None) -> int:
    """Resident bytes of a process and its children (0 when there is none)."""
    if process is None:
        return 0
    try:
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def run(
    clients: int = 20,
    requests_per_client: int = 3,
    images: int = 4,
    shape: tuple[int, int, int] = (16, 64, 64),
    preset: str = "tiny",
    image_size: int = 64,
    url: str | None = None,
    app: str = str(APP),
    deadline: float = 600.0,
    probe_interval: float = 0.25,
    workdir: str | None = None,
    memory_bound: bool = True,
    max_preprocessing: int = 2,
    preprocessing_wait_s: float = 30.0,
    session_cache_mb: float = 2048.0,
    max_sessions: int | None = None,
) -> dict:
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
        memory_bound: start the server with the preprocessing cap (False: ``max_preprocessing`` = ``clients``).
        max_preprocessing, preprocessing_wait_s, session_cache_mb: the server's ``--conf`` memory options.
        max_sessions: the server's ``--conf max_sessions`` (default: room for the warm-up's and the burst's
            sessions, so that no session is evicted while the memory is measured).
    """
    host = urllib.parse.urlparse(url).hostname if url else "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must be a loopback address (127.0.0.1, localhost, ::1), got {host!r}.")
    root = Path(workdir or tempfile.mkdtemp(prefix="icl_sam2_load_"))
    datalist = json.loads(
        Path(write_phantom_dataset(str(root / "src"), train=images, validation=0, test=0, shape=shape)).read_text()
    )
    cases = datalist["training"]
    server = None
    if url is None:
        studies = root / "studies"
        studies.mkdir(exist_ok=True)
        for i, case in enumerate(cases):
            (studies / f"case{i}.nii.gz").write_bytes((root / "src" / case["image"]).read_bytes())
        limits = {
            "max_preprocessing": str(max_preprocessing if memory_bound else clients),
            "preprocessing_wait_s": str(preprocessing_wait_s),
            "session_cache_mb": str(session_cache_mb),
            "max_sessions": str(max_sessions or 2 * clients + 1),
        }
        server = MonaiLabelServer(
            studies,
            {
                "preset": preset,
                "image_size": str(image_size),
                "labels": json.dumps(LABELS),
                "device": "cpu",
                "checkpoint": str(root / "none.pt"),
                **limits,
            },
            root / "server.log",
            app=Path(app),
        )
        url = server.url
    stop_at = time.time() + deadline
    results: dict[str, list] = {
        "latency": [],
        "server": [],
        "info": [],
        "listing": [],
        "upload": [],
        "errors": [],
        "busy": [],
        "sessions": [],
    }
    evicted = [0]
    lock = threading.Lock()
    burst_done = threading.Event()
    depth, height, width = shape

    def click(image: str, params: dict) -> dict:
        """One interactive request: its reply's params; a busy answer (503) is sent again after its Retry-After."""
        while True:
            response = requests.post(
                f"{url}/infer/icl_sam2_interactive",
                params={"image": image},
                data={"params": json.dumps(params)},
                timeout=max(stop_at - time.time(), 1),
            )
            if response.status_code != 503 or time.time() > stop_at:
                break
            with lock:
                results["busy"].append(int(response.headers.get("Retry-After", 1)))
            time.sleep(min(float(response.headers.get("Retry-After", 1)), max(stop_at - time.time(), 0)))
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {response.text[:200]}")
        part = response.content.split(b'name="params"')[1]
        return json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"\r\n--")[0])

    def client(n: int) -> None:
        image = f"case{n % len(cases)}"
        points = [[width // 2, height // 2, depth // 2]]
        for r in range(requests_per_client):
            if time.time() > stop_at:
                return
            params = {"foreground": points, "label": "blob", "client_id": f"client{n}"}
            start = time.perf_counter()
            try:
                info = click(image, params)
                seconds = time.perf_counter() - start
            except Exception as e:
                with lock:
                    results["errors"].append(f"client{n}: {type(e).__name__}: {e}")
                return
            with lock:
                results["latency"].append(seconds)
                results["server"].append(float(info.get("seconds", 0)))
                results["sessions"].append((info.get("sessions", 0), info.get("session_cache_mb", 0.0)))
                if r > 0 and info.get("encoded_slices", 0) > 0:
                    evicted[0] += 1
            points = points + [[points[-1][0] + 1, points[-1][1], points[-1][2]]]

    label_file = root / "src" / cases[0]["label"]

    def probe() -> None:
        while not burst_done.is_set() and time.time() < stop_at:
            for key, call in (
                ("info", lambda: requests.get(f"{url}/info/", timeout=60)),
                ("listing", lambda: requests.get(f"{url}/datastore/", timeout=60)),
                (
                    "upload",
                    lambda: requests.put(
                        f"{url}/datastore/label",
                        params={"image": "case0", "tag": "final"},
                        files={"label": ("case0.nii.gz", label_file.read_bytes())},
                        timeout=60,
                    ),
                ),
            ):
                start = time.perf_counter()
                try:
                    response = call()
                    ok = response.status_code == 200
                except Exception as e:
                    ok, response = False, e
                with lock:
                    if ok:
                        results[key].append(time.perf_counter() - start)
                    else:
                        results["errors"].append(f"{key}: {getattr(response, 'status_code', response)}")
            burst_done.wait(probe_interval)

    process = psutil.Process(server.process.pid) if server is not None else None
    memory = {"peak": 0}

    def sample_memory() -> None:
        while not burst_done.is_set():
            memory["peak"] = max(memory["peak"], _rss(process))
            burst_done.wait(0.05)

    try:
        requests.put(
            f"{url}/datastore/label",
            params={"image": "case0", "tag": "final"},
            files={"label": ("case0.nii.gz", label_file.read_bytes())},
            timeout=60,
        )
        # warm-up: the network loads and as many server threads as clients do a first click each (what a thread
        # and the allocator take once); the burst's sessions are then measured against the memory after it
        warm: list[tuple[int, float]] = []

        def warm_up(n: int) -> None:
            info = click(
                f"case{n % len(cases)}",
                {"foreground": [[width // 2, height // 2, depth // 2]], "label": "blob", "client_id": f"warmup{n}"},
            )
            with lock:
                warm.append((info.get("sessions", 0), info.get("session_cache_mb", 0.0)))

        warm_up(0)
        warmers = [threading.Thread(target=warm_up, args=(n,)) for n in range(1, clients)]
        [t.start() for t in warmers]
        [t.join(timeout=600) for t in warmers]
        results["busy"].clear()
        memory["idle"] = _rss(process)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        prober = threading.Thread(target=probe)
        sampler = threading.Thread(target=sample_memory)
        started = time.perf_counter()
        prober.start()
        sampler.start()
        [t.start() for t in threads]
        [t.join(timeout=max(stop_at - time.time(), 1)) for t in threads]
        wall = time.perf_counter() - started
        burst_done.set()
        prober.join(timeout=60)
        sampler.join(timeout=60)
        memory["after"] = _rss(process)
    finally:
        if server is not None:
            server.stop()
    figures = {
        "clients": clients,
        "requests_per_client": requests_per_client,
        "wall_s": round(wall, 2),
        "client_latency": _stats(results["latency"]),
        "server_time": _stats(results["server"]),
        "info_during_burst": _stats(results["info"]),
        "listing_during_burst": _stats(results["listing"]),
        "label_upload_during_burst": _stats(results["upload"]),
        "follow_ups_that_encoded_again": evicted[0],
        "busy_answers_503": len(results["busy"]),
        "busy_retry_after_s": f"{min(results['busy'])} / {max(results['busy'])}" if results["busy"] else "none",
        "errors": results["errors"][:10],
        "error_count": len(results["errors"]),
    }
    if process is not None:
        sessions, cache_mb = max(results["sessions"], default=(0, 0.0))
        warm_count, warm_mb = max(warm, default=(0, 0.0))
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        grown = (memory["after"] - memory["idle"]) / 2**20
        new_sessions = max(sessions - warm_count, 1)
        figures.update(
            {
                "memory_bound": f"max_preprocessing {max_preprocessing if memory_bound else clients}, "
                f"preprocessing_wait_s {preprocessing_wait_s}, session_cache_mb {session_cache_mb}",
                "server_rss_idle_peak_after_mib": f"{mib(memory['idle'])} / {mib(memory['peak'])} / "
                f"{mib(memory['after'])}",
                "sessions_and_reported_mib": f"{warm_count} -> {sessions} sessions, {warm_mb} -> {cache_mb} MiB",
                "growth_per_session_mib": round(grown / new_sessions, 2),
                "reported_per_session_mib": round((cache_mb - warm_mb) / new_sessions, 2),
            }
        )
    for key, value in figures.items():
        print(f"{key:>30}: {value}")
    return figures


def main(**kwargs) -> None:
    run(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
