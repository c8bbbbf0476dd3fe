"""Supply chain: the installed sam2 is Meta's code, and the venv holds what requirements.lock pins.

PyPI's "sam2" project is not published by Meta. tests/data/sam2_release_digests.json holds the
SHA-256 of every file that its pinned release installs (the packages sam2 and training), computed
from facebookresearch/sam2 at the commit named there; the installed files must match them.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = json.loads((Path(__file__).parent / "data" / "sam2_release_digests.json").read_text())
LOCK = ROOT / "requirements.lock"
REQUIREMENTS = ROOT / "requirements.txt"
PROJECT = "icl-sam2"  # installed by setup.sh with `uv pip install -e .`, not from the lock


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sam2_site() -> Path:
    """The folder that holds the installed sam2 package (site-packages)."""
    spec = importlib.util.find_spec("sam2")
    assert spec is not None and spec.submodule_search_locations, "sam2 is not installed"
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def test_digest_list_names_meta_commit():
    assert DIGESTS["repository"] == "facebookresearch/sam2"
    assert re.fullmatch(r"[0-9a-f]{40}", DIGESTS["commit"])
    assert DIGESTS["files"] and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in DIGESTS["files"].values())


def test_installed_sam2_is_the_release_the_digests_describe():
    installed = importlib.metadata.version("sam2")
    assert installed == DIGESTS["pypi"]["version"], (
        f"sam2 {installed} is installed, but the digests describe sam2 {DIGESTS['pypi']['version']}: "
        "take new digests from Meta's repository for the new release"
    )


def test_installed_sam2_files_match_meta_commit():
    site = sam2_site()
    missing, differing = [], []
    for rel, digest in sorted(DIGESTS["files"].items()):
        path = site / rel
        if not path.is_file():
            missing.append(rel)
        elif sha256(path) != digest:
            differing.append(rel)
    assert not (missing or differing), (
        f"installed sam2 under {site} is not facebookresearch/sam2@{DIGESTS['commit']}:\n"
        f"  differing: {differing}\n  missing: {missing}"
    )


def test_installed_sam2_has_no_extra_files():
    """No file in the installed packages (sam2, training) beyond the digest list, compiled caches aside."""
    site = sam2_site()
    listed = set(DIGESTS["files"])
    extra = []
    for top in sorted({rel.split("/", 1)[0] for rel in listed}):
        for path in sorted((site / top).rglob("*")):
            rel = path.relative_to(site).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and rel not in listed:
                extra.append(rel)
    assert not extra, f"installed sam2 has files that are not in Meta's commit: {extra}"


def test_sam2_distribution_installs_only_listed_files():
    """The sam2 distribution's RECORD names no file (a .pth, another module) outside the digest list."""
    files = importlib.metadata.distribution("sam2").files or []
    unlisted = sorted(
        f.as_posix()
        for f in files
        if ".dist-info/" not in f.as_posix() and f.suffix != ".pyc" and f.as_posix() not in DIGESTS["files"]
    )
    assert files, "the sam2 distribution lists no files (no RECORD)"
    assert not unlisted, f"the sam2 distribution installs files that are not in Meta's commit: {unlisted}"


def lock_entries() -> list[str]:
    """requirements.lock's entries, one string each, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def locked_versions() -> dict[str, str]:
    versions = {}
    for entry in lock_entries():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", entry)
        if match:
            versions[canonical(match[1])] = match[2]
    return versions


def test_every_lock_entry_is_pinned_and_hashed():
    entries = lock_entries()
    assert entries, "requirements.lock is empty"
    bad = [
        entry.split()[0]
        for entry in entries
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+( --hash=sha256:[0-9a-f]{64})+", " ".join(entry.split()))
    ]
    assert not bad, f"requirements.lock entries without an == pin or a sha256 hash: {bad}"


def test_lock_has_the_pins_of_requirements_txt():
    locked = locked_versions()
    stale = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            name = canonical(re.sub(r"\[.*\]", "", name).strip())
            if locked.get(name) != version.strip():
                stale.append(f"{name}=={version.strip()} (lock: {locked.get(name)})")
    assert not stale, f"requirements.lock is stale, regenerate it with `bash scripts/setup.sh --lock`: {stale}"


def installed_versions() -> dict[str, str]:
    """The venv's installed distributions: its site-packages only, not what is on ``sys.path`` at the moment
    (importing setuptools puts its vendored copies, e.g. ``setuptools/_vendor/zipp``, there)."""
    import sysconfig

    folders = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {
        canonical(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=folders)
        if d.metadata["Name"]
    }


def test_installed_versions_match_lock():
    installed = installed_versions()
    wrong = [
        f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
        for name, version in sorted(locked_versions().items())
        if name not in installed or Version(installed[name]) != Version(version)
    ]
    assert not wrong, "the venv differs from requirements.lock (run bash scripts/setup.sh):\n  " + "\n  ".join(wrong)


def test_every_installed_package_is_locked():
    locked = locked_versions()
    unlocked = sorted(
        f"{name}=={version}" for name, version in installed_versions().items() if name not in locked and name != PROJECT
    )
    assert not unlocked, f"installed packages that requirements.lock does not pin: {unlocked}"
