"""The benchmark and evaluation scripts of ``scripts/`` run as the README runs them: ``python scripts/<name>.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def run_script():
    """``run_script("benchmark_x.py", *args, check=True)``: the script in a subprocess from the repository root."""

    def run(script: str, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {**os.environ, "TQDM_DISABLE": "1"}
        done = subprocess.run(
            [sys.executable, f"scripts/{script}", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"scripts/{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    return run
