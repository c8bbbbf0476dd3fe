"""The docs' server commands, run as written (studies folder and port aside): they start, on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from icl_sam2.servers import free_port

from .conftest import ROOT

pytestmark = pytest.mark.slow  # starts the README's servers


def _commands(readme: str) -> list[str]:
    """The ``icl-sam2 serve`` commands of a page's bash blocks, continuation lines joined."""
    text = (ROOT / readme).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line.strip() for line in joined if "icl-sam2 serve" in line and "/data/my_study" in line]


@pytest.mark.parametrize("readme", ["README.md", "docs/app.md", "monailabel_app/README.md"])
def test_the_readmes_server_command_starts_on_loopback(readme, tmp_path):
    commands = _commands(readme)
    assert len(commands) == 1, commands
    studies = tmp_path / "my_study"
    studies.mkdir()
    port = free_port()
    command = commands[0].replace("/data/my_study", str(studies)) + f" --port {port}"
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=ROOT,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
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


def _block_after(readme: str, heading: str) -> list[str]:
    """The lines of the first bash block after ``heading``."""
    text = (ROOT / readme).read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(heading) :], flags=re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readmes_ohif_commands_start_a_pacs_a_study_and_the_server(tmp_path):
    """docs/app.md "Use it from OHIF": Orthanc, the study, the server, as written (its folder and ports aside)."""
    from icl_sam2 import servers

    reason = servers.missing()
    if reason:
        if shutil.which("apt-get") is None:
            pytest.skip(f"Orthanc is not installable here (no apt-get): {reason}")
        pytest.fail(reason)
    pacs_port, server_port = free_port(), free_port()
    lines = [
        line.replace("/tmp/pacs", str(tmp_path / "pacs")).replace("8042", str(pacs_port))
        for line in _block_after("docs/app.md", "## Use it from OHIF")
    ]
    assert len(lines) == 3 and lines[0].endswith("&") and "icl-sam2 serve" in lines[2], lines
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
    }
    started = []
    try:
        started.append(
            subprocess.Popen(
                ["bash", "-c", lines[0].rstrip("&").strip()],
                cwd=ROOT,
                env=env,
                stdout=open(tmp_path / "pacs.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        study = subprocess.run(["bash", "-c", lines[1]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert study.returncode == 0, study.stderr[-3000:]
        log = tmp_path / "server.log"
        started.append(
            subprocess.Popen(
                ["bash", "-c", f"{lines[2]} --port {server_port}"],
                cwd=ROOT,
                env=env,
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.time() + 180
        while True:
            assert started[-1].poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server_port}/info/", timeout=10) as response:
                    info = json.loads(response.read())
                    break
            except OSError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        assert info["datastore"]["total"] == 4 and info["datastore"]["completed"] == 2  # make_study's defaults
        with urllib.request.urlopen(f"http://127.0.0.1:{server_port}/ohif/", timeout=30) as page:
            assert page.status == 200
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
