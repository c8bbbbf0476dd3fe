"""The README's server commands, run as written (studies folder and port aside): they start, on 127.0.0.1 only."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from .conftest import ROOT
from monailabel_server import free_port


def _commands(readme: str) -> list[str]:
    """The ``scripts/start_server.py`` commands of a README's bash blocks, continuation lines joined."""
    text = (ROOT / readme).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.strip() for line in joined if "scripts/start_server.py" in line]


@pytest.mark.parametrize("readme", ["README.md", "monailabel_app/README.md"])
def test_the_readmes_server_command_starts_on_loopback(readme, tmp_path):
    commands = _commands(readme)
    assert len(commands) == 1, commands
    studies = tmp_path / "my_study"
    studies.mkdir()
    port = free_port()
    command = commands[0].replace("/data/my_study", str(studies)) + f" --port {port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    process = subprocess.Popen(["bash", "-c", command], cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, f"the README's command exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()  # loopback unless --host is given
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        shutil.rmtree(studies, ignore_errors=True)
