"""medsam_lite's params schema and --conf settings, without a server (fast)."""

from __future__ import annotations

import pytest

from lib.requests import MedSAMLiteParams, parse_params
from lib.settings import medsam_lite_settings
from model_core.io.validation import InputError


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"roi": [5, 3, 0, 9, 0, 2]}, "params.roi: Value error, reversed: i0, i1"),
        ({"roi": [1, 3, 4, 4, 0, 2]}, "params.roi: Value error, zero size: j0, j1"),
        ({"roi": [1, 3, 4, 6, 2, 0]}, "params.roi: Value error, reversed: k0, k1"),
        ({"box": [1, 5, 9, 2], "slice": 0}, "params.box: Value error, reversed: j0, j1"),
        ({"box": [1, 5, 9, 8], "slice": 0, "slice_range": [3, 1]}, "params.slice_range: Value error, reversed"),
        ({"roi": [1, 3, 4, "6", 0, 2]}, "params.roi[3]"),
        ({"box": [1, 5, 9, 8]}, "box needs slice"),
        ({}, "give exactly one prompt"),
        ({"roi": [1, 3, 4, 6, 0, 2], "box": [1, 5, 9, 8], "slice": 0}, "give exactly one prompt"),
        ({"roi": [1, 3, 4, 6, 0, 2], "slice_step": 0}, "params.slice_step: Input should be greater than or equal to 1"),
        ({"roi": [1, 3, 4, 6, 0, 2], "slice_step": "2"}, "params.slice_step: Input should be a valid integer"),
    ],
)
def test_bad_boxes_are_422_naming_the_field(raw, words):
    with pytest.raises(InputError) as error:
        parse_params(MedSAMLiteParams, raw)
    assert error.value.status == 422 and words in str(error.value), str(error.value)


def test_good_boxes_parse():
    assert parse_params(MedSAMLiteParams, {"roi": [1, 3, 4, 6, 2, 2]}).roi == [1, 3, 4, 6, 2, 2]  # one slice is fine
    params = parse_params(MedSAMLiteParams, {"box": [1, 5, 9, 8], "slice": 4, "roi": [], "result_compress": True})
    assert params.box == [1, 5, 9, 8] and params.slice == 4 and params.roi is None


def test_settings_are_checked_at_start_up():
    s = medsam_lite_settings({"device": "cpu", "modality": "MR", "precision": "fp32"})
    assert s["modality"] == "MRI" and s["checkpoint"] is None and s["window"] == [-200.0, 300.0]
    assert s["slice_step"] == 1 and medsam_lite_settings({"medsam_lite_slice_step": "3"})["slice_step"] == 3
    for conf, words in [
        ({"percentiles": "[1, 200]"}, "percentiles"),
        ({"modality": "PET"}, "modality"),
        ({"window": "[5, 1]"}, "window"),
        ({"medsam_lite_checkpoint": "/no/such.pt"}, "medsam_lite_checkpoint"),
        ({"medsam_lite_slice_step": "0"}, "medsam_lite_slice_step must be a whole number of at least 1"),
    ]:
        with pytest.raises(ValueError, match=words):
            medsam_lite_settings({"device": "cpu", **conf})
