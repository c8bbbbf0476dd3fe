"""What the DICOMweb tests share: the rule for system packages, a real Orthanc (icl_sam2/servers.py), the installed
OHIF 3.13 (icl_sam2/ohif.py)."""

from __future__ import annotations

import shutil

import pytest

from icl_sam2 import ohif, servers


def require_installed(reason: str) -> None:
    """Skip only where apt-get is absent; where it exists a missing system package is a failure."""
    if reason:
        if shutil.which("apt-get") is None:
            pytest.skip(f"not installable here (no apt-get): {reason}")
        pytest.fail(f"{reason} (CI's .ci/run installs it; it is required where apt-get exists)")


def require_ohif() -> None:
    """The pinned OHIF must be installed where npm exists (scripts/setup.sh installs it); skip only without npm."""
    reason = ohif.missing()
    if reason:
        if shutil.which("npm") is None:
            pytest.skip(f"not installable here (no npm): {reason}")
        pytest.fail(f"{reason} (scripts/setup.sh installs it where npm exists)")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Debian's Orthanc with DICOMweb, in a temporary folder, answering loopback clients only."""
    require_installed(servers.missing())
    with servers.Orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server
