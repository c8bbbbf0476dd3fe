"""Test-wide settings: quiet progress bars (sam2's propagate_in_video uses tqdm), and the ``icl-sam2`` command."""

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def icl_sam2_command() -> list[str]:
    """The installed ``icl-sam2`` console command (``scripts/setup.sh`` installs it beside the venv's Python).

    A checkout used without its own install (another worktree sharing a venv) runs the same entry point as
    ``python -m icl_sam2``, which its PYTHONPATH resolves to the checkout.
    """
    installed = shutil.which("icl-sam2", path=str(Path(sys.executable).parent))
    if installed and not os.environ.get("PYTHONPATH"):
        return [installed]
    return [sys.executable, "-m", "icl_sam2"]
