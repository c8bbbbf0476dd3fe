#!/usr/bin/env bash
# Create .venv in the repository and install everything ICL-SAM2 needs (CPU or CUDA).
# Every package comes from requirements.lock: pinned with ==, and checked against the SHA-256
# hashes listed there (pip --require-hashes: a file whose hash does not match stops the install).
# Safe to run again: it does nothing when requirements.txt, requirements.lock and pyproject.toml
# are unchanged.
#
#   bash scripts/setup.sh            # PYTHON=python3.11 by default
#   bash scripts/setup.sh --lock     # regenerate requirements.lock after changing requirements.txt
#                                    # (extra arguments go to uv, e.g. --upgrade for newer dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
lock=requirements.lock
# uv installs the locked files (stages 2-3 below) about 5x faster than pip (24 s against 135 s for
# torch and the rest on a 2-core machine, empty caches), and compiles the lock; it is locked itself.
uv_version=0.13.9

if [ "${1:-}" = "--lock" ]; then
  shift
  # requirements.txt plus pip, setuptools, wheel and uv (installed first, below), with all their
  # dependencies for CPython 3.11 on Linux x86_64, and the hash of every file PyPI has for each
  # version. sam2 1.1.0 is only an sdist: uv builds its metadata without isolation, with the
  # setuptools of this scratch venv and no CUDA, instead of downloading torch to build it.
  tools=$(mktemp -d)
  trap 'rm -rf "$tools"' EXIT
  "$PYTHON" -m venv "$tools"
  "$tools/bin/python" -m pip install -q --upgrade "uv==$uv_version" setuptools wheel
  printf 'pip\nsetuptools\nwheel\nuv==%s\n' "$uv_version" | SAM2_BUILD_CUDA=0 "$tools/bin/uv" pip compile requirements.txt - \
    --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
    --python "$tools/bin/python" --no-build-isolation-package sam2 \
    --custom-compile-command "bash scripts/setup.sh --lock" --output-file "$lock" "$@" >/dev/null
  exit 0
fi

# The lock must hold every pin of requirements.txt, at the same version.
[ -f "$lock" ] || { echo "setup: $lock is missing; create it with: bash scripts/setup.sh --lock" >&2; exit 1; }
lock_pins() { awk '/^[a-z0-9]/ {print $1}' "$lock"; }
stale=$(sed -E 's/#.*//; s/\[[^]]*\]//; s/[[:space:]]+//g' requirements.txt | grep '==' \
  | awk -F'==' '{n = tolower($1); gsub(/[-_.]+/, "-", n); print n "==" $2}' \
  | grep -vxF -f <(lock_pins) || true)
if [ -n "$stale" ]; then
  echo "setup: requirements.lock does not pin" $stale "as requirements.txt does;" \
    "regenerate it with: bash scripts/setup.sh --lock" >&2
  exit 1
fi

# The OHIF 3.13 viewer of `icl-sam2 ohif serve`: npm's prebuilt @ohif/app at the version and SHA-512 pinned in
# icl_sam2/ohif.py, unpacked into .ohif/ (ignored by git) once; nothing is downloaded when the viewer runs.
install_ohif() {
  if command -v npm >/dev/null 2>&1; then
    echo "setup: OHIF viewer in $(.venv/bin/python -c 'from icl_sam2.ohif import install; print(install())')"
  else
    echo "setup: npm not found, so the OHIF 3.13 viewer (icl-sam2 ohif serve) is not installed;" \
      "install Node.js and npm (Debian: apt-get install npm) and run this again" >&2
  fi
}

stamp=.venv/.installed
want=$(cat requirements.txt "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
# -I: not from the current folder (the repository root), so model_core must be the installed project
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -I -c "import model_core, monailabel" 2>/dev/null; then
  echo "setup: .venv is up to date"
  install_ohif
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
stages=$(mktemp -d)
trap 'rm -rf "$stages"' EXIT
# lock_select only|except NAME...: the lock's entries ("name==version \" and its --hash lines)
# for those packages, or for all the others.
lock_select() {
  local mode=$1
  shift
  awk -v mode="$mode" -v names=" $* " '
    /^[a-z0-9]/ { split($1, pin, "=="); hit = index(names, " " pin[1] " ") > 0; keep = (mode == "only") == hit }
    /^[a-z0-9]/ || /^[[:space:]]+--hash=/ { if (keep) print }' "$lock"
}
# Exactly the lock's files: --require-hashes rejects a file whose SHA-256 is not listed, --no-deps
# installs nothing the lock does not name (the dependency check below shows it is complete), and
# --no-build-isolation builds the few sdists (sam2, iopath, antlr4-python3-runtime, timeloop)
# with the locked setuptools and wheel instead of unchecked ones fetched into a build env.
# Stage 1 (pip, setuptools, wheel, uv) goes through pip; the rest through the locked uv, with the same checks.
hashed() { pip install -q --require-hashes --no-deps --no-build-isolation -r "$1"; }
uv_hashed() { .venv/bin/uv pip install -q --python .venv/bin/python --require-hashes --no-deps --no-build-isolation -r "$1"; }
lock_select only pip setuptools wheel uv > "$stages/1-build-tools.txt"
lock_select except sam2 > "$stages/2-all-but-sam2.txt"
lock_select only sam2 > "$stages/3-sam2.txt"
hashed "$stages/1-build-tools.txt"
# torch (with everything else) before sam2: sam2's build imports it. Without build isolation sam2
# builds against this torch instead of downloading another; SAM2_BUILD_CUDA=0 skips its optional
# CUDA op (hole filling), which the project does not use.
uv_hashed "$stages/2-all-but-sam2.txt"
SAM2_BUILD_CUDA=0 uv_hashed "$stages/3-sam2.txt"
# The project itself (model_core, editable): scripts, the bundle and the MONAI Label app import it as an
# installed package, with no sys.path edits. The supply-chain test allows this one unlocked distribution.
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps --no-build-isolation -e .
# pip check's dependency checks: every installed package's requirements are installed, at versions
# they accept. Not `pip check` itself: it also parses each wheel's platform tags and crashes on
# itk 5.4.7's malformed "Tag: itk-5.4.7-cp311-abi3-..." line (pip is pinned by the lock).
.venv/bin/python - <<'EOF'
import sys
from pip._internal.operations.check import check_package_set, create_package_set_from_installed

packages, parsing_problems = create_package_set_from_installed()
missing, conflicting = check_package_set(packages)
problems = [f"{name} requires {dep[0]}, which is not installed" for name, deps in missing.items() for dep in deps]
problems += [f"{name} requires {req}, but {dep} {version} is installed"
             for name, deps in conflicting.items() for dep, version, req in deps]
if parsing_problems:
    problems.append("some installed packages have unreadable requirements (run pip list -v)")
if problems:
    sys.exit("setup: broken requirements (is requirements.lock incomplete?):\n  " + "\n  ".join(problems))
EOF
.venv/bin/python -I -c "import model_core, sam2, monai, monailabel, ignite; print('setup: ok', 'torch', __import__('torch').__version__)"
echo "$want" > "$stamp"
install_ohif
