"""Servers started in the background for tests, benchmarks and demos: MONAI Label on the app, and Orthanc.

    icl-sam2 orthanc --storage_dir /tmp/pacs --port 8042   # a reference PACS in the foreground, Ctrl-C stops it

    from icl_sam2.servers import MonaiLabelServer, Orthanc
    with Orthanc(tmp_dir) as pacs:          # a free port by default
        pacs.url                            # http://127.0.0.1:PORT       (Orthanc's REST API)
        pacs.dicomweb                       # http://127.0.0.1:PORT/dicom-web  (QIDO-RS, WADO-RS, STOW-RS)
    server = MonaiLabelServer(studies_dir, {"preset": "tiny", "labels": '{"kidney": 1}'}, log_file)
    ...                                     # MONAILabelClient(server.url)
    server.stop()

**Orthanc** (a PACS one command away, with DICOMweb; a plain process with its storage in a folder of ours).
Needs Debian's ``orthanc`` and ``orthanc-dicomweb`` (``apt-get install orthanc orthanc-dicomweb``;
the packaged system service is not used: we run ``/usr/sbin/Orthanc <config>`` ourselves).

Settings written to ``<storage_dir>/orthanc.json``:

- storage and SQLite index in ``<storage_dir>/db``; the log in ``<storage_dir>/orthanc.log``;
- HTTP on ``http_port``; **Orthanc 1.10 has no bind-address option**: it listens on all
  interfaces, so ``RemoteAccessAllowed: false`` makes it answer only loopback clients
  (any other client gets 401), and ``AuthenticationEnabled: false`` (no password) is safe
  only because of that. Run it inside ``unshare -n`` for full isolation;
- no DICOM port (``DicomServerEnabled: false``): DICOMweb and the REST API only;
- the DICOMweb plugin at ``/dicom-web/`` with full series/study metadata (so WADO-RS
  ``.../metadata`` carries sequences such as a SEG's ReferencedSeriesSequence);
- no CORS headers (Orthanc has none): a browser viewer on another origin needs a proxy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "APP",
    "DICOMWEB_PLUGIN",
    "ORTHANC",
    "MonaiLabelServer",
    "Orthanc",
    "available",
    "free_port",
    "missing",
    "port_in_use",
    "run_orthanc",
]

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
APT_PACKAGES = ("orthanc", "orthanc-dicomweb")


def missing() -> str:
    """What is missing to run Orthanc with DICOMweb, as a sentence, or ``""`` when all is installed."""
    absent = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    if not absent:
        return ""
    return f"{' and '.join(absent)} not found; install with `apt-get install {' '.join(APT_PACKAGES)}`."


def available() -> bool:
    """Whether the Orthanc binary and its DICOMweb plugin are installed."""
    return not missing()


def free_port() -> int:
    """A TCP port free on all interfaces now, as Orthanc binds (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether ``port`` cannot be bound on all interfaces (as Orthanc binds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends (Linux), so no Orthanc outlives us."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Orthanc:
    """Orthanc in its own process group, its storage, index, config and log under ``storage_dir``.

    Orthanc ends when :meth:`stop` is called, and also when the thread that called :meth:`start`
    ends (Linux parent-death signal), so a crashed test run leaves no server behind.

    Args:
        storage_dir: folder for everything Orthanc writes (created); reusing it keeps the studies.
        http_port: HTTP port; a free one when ``None``.
        name: the server's name (``/system``).
        timeout: seconds to wait for ``GET /system`` to answer in :meth:`start`.
    """

    def __init__(
        self,
        storage_dir: str | os.PathLike,
        http_port: int | None = None,
        name: str = "ICL-SAM2",
        timeout: float = 60.0,
    ):
        self.storage_dir = Path(storage_dir).resolve()
        self.port = int(http_port) if http_port else free_port()
        self.name = name
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self.config_file = self.storage_dir / "orthanc.json"
        self.log_file = self.storage_dir / "orthanc.log"

    @property
    def url(self) -> str:
        """The REST API's root, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS), ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        """The configuration written to ``orthanc.json`` (see the module's docstring)."""
        db = str(self.storage_dir / "db")
        return {
            "Name": self.name,
            "StorageDirectory": db,
            "IndexDirectory": db,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "HttpDescribeErrors": True,
            # no bind-address option in Orthanc 1.10: refuse every client but loopback instead
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "SaveJobs": False,
            "HttpThreadsCount": 16,
        }

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of Orthanc's log."""
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> Orthanc:
        """Write the config, start ``Orthanc <config>`` and wait until ``GET /system`` answers.

        Returns:
            ``self``.

        Raises:
            RuntimeError: Orthanc or its DICOMweb plugin is not installed, the port is in use, it exited (the log's
                tail says why, e.g. a port in use), it did not answer within ``timeout``
                seconds, or the DICOMweb plugin did not load.
        """
        if self.running():
            return self
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        if port_in_use(self.port):  # else GET /system could reach the server that holds the port
            raise RuntimeError(
                f"Port {self.port} is in use (another Orthanc, e.g. Debian's service on 8042?); "
                "choose another port, or leave it out for a free one."
            )
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [str(ORTHANC), str(self.config_file)],
                cwd=str(self.storage_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + self.timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(
                    f"Orthanc exited with code {code} (is port {self.port} in use?); "
                    f"log {self.log_file}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=5) as response:
                    json.loads(response.read())
                with urllib.request.urlopen(f"{self.url}/plugins", timeout=5) as response:
                    plugins = json.loads(response.read())
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Orthanc did not answer on {self.url} within {self.timeout:.0f} s; "
                        f"log {self.log_file}:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.2)
        if "dicom-web" not in plugins:
            self.stop()
            raise RuntimeError(
                f"Orthanc started without its DICOMweb plugin ({DICOMWEB_PLUGIN}, loaded: {plugins}); "
                f"reinstall `orthanc-dicomweb`. Log:\n{self.log_tail()}"
            )
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """End Orthanc (SIGTERM to its process group, SIGKILL after ``timeout`` seconds); no-op when not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self.process = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_orthanc(storage_dir: str, port: int = 8042) -> None:
    """Run Orthanc in the foreground until Ctrl-C (or SIGTERM).

    Args:
        storage_dir: folder for its storage, index, config and log (created; reused if present).
        port: HTTP port (loopback clients only).
    """
    server = Orthanc(storage_dir, port).start()
    print(
        f"Orthanc {server.url}  DICOMweb {server.dicomweb}  storage {server.storage_dir}  log {server.log_file}",
        flush=True,
    )

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        code = server.process.wait()
        raise SystemExit(f"Orthanc exited with code {code}; log {server.log_file}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


APP = Path(__file__).resolve().parents[1] / "monailabel_app"
#: MONAI Label's own start command (after the interpreter)
MONAI_LABEL = ("-m", "monailabel.main", "start_server")
#: ours: ``icl-sam2 serve`` (loopback and the app by default; MONAI_LABEL_CORS_ORIGINS passed on as a --conf)
ICL_SAM2_SERVE = ("-m", "icl_sam2", "serve")


class MonaiLabelServer:
    """``monailabel start_server`` on the app (or another), in its own process group; ``stop()`` ends it and its
    children.

    Args:
        studies: a folder, or a DICOMweb root URL (a ``str``: a ``Path`` would fold its ``//``).
        conf: ``--conf`` options (``models`` defaults to ``icl_sam2`` for this app).
        log: file for the server's output; its folder is the server's working directory.
        app: the MONAI Label app folder.
        env: extra environment variables.
        timeout: seconds to wait for ``GET /info/`` to answer.
        launcher: what follows the interpreter (:data:`MONAI_LABEL`, or :data:`ICL_SAM2_SERVE` for ours).
    """

    def __init__(
        self,
        studies: Path | str,
        conf: dict[str, str],
        log: Path,
        app: Path = APP,
        env: dict[str, str] | None = None,
        timeout: float = 180.0,
        launcher: tuple[str, ...] = MONAI_LABEL,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            *launcher,
            "--app",
            str(app),
            "--studies",
            str(studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for key, value in ({"models": "icl_sam2", **conf} if app == APP else conf).items():
            cmd += ["--conf", key, value]
        env = {
            **os.environ,
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "2",
            **(env or {}),
        }
        self.log = log
        self.process = subprocess.Popen(
            cmd, cwd=str(log.parent), stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"monailabel exited ({self.process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/info/", timeout=5)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"monailabel did not answer in time:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
