"""The pinned set installs and imports together (a broken pin fails here, not in a user's hands)."""

import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    [
        "monailabel.interfaces.app",  # fails with pydicom 3
        "monailabel.interfaces.tasks.infer_v2",
        "monailabel.interfaces.tasks.train",
        "monailabel.tasks.infer.basic_infer",
        "monailabel.tasks.infer.bundle",
        "monailabel.tasks.train.basic_train",
        "monailabel.tasks.train.bundle",
        "monailabel.client",
        "monai.bundle",
        "ignite.engine",
        "sam2.modeling.sam2_base",
        "sam2.sam2_video_predictor",
        "torchvision.ops",
        "model_core",
    ],
)
def test_imports(module):
    importlib.import_module(module)


def test_monailabel_app_class_and_torchvision_ops():
    import torch
    import torchvision
    from monailabel.interfaces.app import MONAILabelApp

    assert MONAILabelApp.__name__ == "MONAILabelApp"
    # "operator torchvision::nms does not exist" appears when torch and torchvision do not pair
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert keep.tolist() == [0]


@pytest.mark.slow
def test_model_core_is_the_installed_project_of_this_checkout(tmp_path):
    """Scripts import model_core because setup.sh installs the project (icl-sam2), not by editing sys.path:
    from another folder, a plain interpreter finds this checkout's model_core and no other of its folders."""
    code = (
        "import importlib.util, json, model_core; print(json.dumps([model_core.__file__] + "
        "[importlib.util.find_spec(n) is not None for n in ('scripts', 'bundle', 'monailabel_app', 'lib')]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found[0]).resolve().parent == ROOT / "model_core"
    assert found[1:] == [False] * 4, "the project installs model_core only"
    assert importlib.metadata.distribution("icl-sam2").version == "0.1.0"


def test_no_code_edits_sys_path():
    """Imports work because packages are installed (or, for tests, pyproject's pythonpath), never by sys.path edits."""
    pattern = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+=|=)")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("model_core", "scripts", "monailabel_app", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"sys.path edits: {offenders}"
