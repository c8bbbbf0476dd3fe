#!/usr/bin/env bash
# Create .venv in the repository and install everything ICL-SAM2 needs (CPU or CUDA).
# Safe to run again: it does nothing when requirements.txt and pyproject.toml are unchanged.
#
#   bash scripts/setup.sh            # PYTHON=python3.11 by default
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=.venv/.installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import model_core, monailabel" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
pin() { grep -E "^$1==" requirements.txt; }
# torch first: sam2's build imports it. Without build isolation sam2 builds against
# this torch instead of downloading another; SAM2_BUILD_CUDA=0 skips its optional
# CUDA op (hole filling), which the project does not use.
pip install -q "$(pin torch)" "$(pin torchvision)"
SAM2_BUILD_CUDA=0 pip install -q --no-build-isolation "$(pin sam2)"
pip install -q -r requirements.txt
pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import model_core, sam2, monai, monailabel, ignite; print('setup: ok', 'torch', __import__('torch').__version__)"
echo "$want" > "$stamp"
