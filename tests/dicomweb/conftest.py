"""What the DICOMweb tests share: the rule for system packages, a real Orthanc (scripts/servers.py)."""

from __future__ import annotations

import shutil

import pytest

from icl_sam2 import servers


def require_installed(reason: str) -> None:
    """Skip only where apt-get is absent; where it exists a missing system package is a failure."""
    if reason:
        if shutil.which("apt-get") is None:
            pytest.skip(f"not installable here (no apt-get): {reason}")
        pytest.fail(f"{reason} (CI's .ci/run installs it; it is required where apt-get exists)")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Debian's Orthanc with DICOMweb, in a temporary folder, answering loopback clients only."""
    require_installed(servers.missing())
    with servers.Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
