"""scripts/medsam_lite_real_mri.py on a tiny subset of the real Colin27 T1 + AAL atlas (mricron-data): one slice, two
regions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_core.io.mricron import ATLAS, NAMES, T1, available
from model_core.medsam_lite.atlas import dice, evenly_spaced_slices


def test_dice_and_slices_on_small_arrays():
    a = np.zeros((4, 4, 6), bool)
    a[1:3, 1:3, 2:5] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(a & False, a & False) == 1.0
    assert evenly_spaced_slices(a, 1) == [3] and evenly_spaced_slices(a, 3) == [2, 3, 4]


@pytest.mark.slow  # LiteMedSAM's weights load and one slice is encoded: about 25 s of CPU
@pytest.mark.skipif(
    not available(),
    reason=f"real-data test needs the Debian package mricron-data ({T1}, {ATLAS}, "
    f"{NAMES}); install it with `apt-get install mricron-data` (.ci/run does)",
)
def test_script_on_one_slice_and_two_regions(tmp_path, run_script):
    output = tmp_path / "result.json"
    out = run_script(
        "medsam_lite_real_mri.py",
        "--slices",
        "[110]",
        "--regions",
        '["Precentral_L","Frontal_Sup_L"]',
        "--three_d",
        "False",
        "--output",
        output,
    ).stdout
    result = json.loads(output.read_text())
    row = result["2d"]["slices"]["110"]
    assert set(row["regions"]) == {"Precentral_L", "Frontal_Sup_L"} and row["n"] == 2
    assert all(0 < d <= 1 for d in row["regions"].values())
    assert row["mean"] == pytest.approx(np.mean(list(row["regions"].values())))
    assert "3d" not in result and "2D, all slices" in out
