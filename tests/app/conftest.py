"""A real MONAI Label server running the app, for the tests of this folder (icl_sam2.servers.MonaiLabelServer)."""

from __future__ import annotations

from pathlib import Path

from icl_sam2.servers import MonaiLabelServer as Server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
