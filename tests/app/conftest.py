"""A real MONAI Label server running the app, for the tests of this folder (see scripts/monailabel_server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from monailabel_server import Server  # noqa: E402, F401
