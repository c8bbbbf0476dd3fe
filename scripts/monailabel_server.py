"""Start MONAI Label's server on the ICL-SAM2 app in its own process group (tests and benchmarks).

    from monailabel_server import Server
    server = Server(studies_dir, {"preset": "tiny", "labels": '{"kidney": 1}'}, log_file)
    ...  # MONAILabelClient(server.url)
    server.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "monailabel_app"
#: MONAI Label's own start command (after the interpreter)
MONAI_LABEL = ("-m", "monailabel.main", "start_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``monailabel start_server`` in its own process group; ``stop()`` ends it and its training children."""

    def __init__(self, studies: Path | str, conf: dict[str, str], log: Path, app: Path = APP,
                 env: dict[str, str] | None = None, launcher: tuple[str, ...] = MONAI_LABEL):
        """``studies``: a folder, or a DICOMweb root URL (a ``str``: a ``Path`` would fold its ``//``);
        ``launcher``: what follows the interpreter (``(str(ROOT / "scripts" / "start_server.py"),)`` for ours)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, *launcher, "--app", str(app), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in ({"models": "icl_sam2", **conf} if app == APP else conf).items():
            cmd += ["--conf", key, value]
        env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "2",
               **(env or {})}
        self.log = log
        self.process = subprocess.Popen(cmd, cwd=str(log.parent), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.time() + 180
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
