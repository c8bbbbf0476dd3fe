"""``lesion_proposals``' options and request params, checked before any model runs."""

from __future__ import annotations

import pytest

from lib.configs.lesion_proposals import parse_proposal_label, parse_proposal_settings
from lib.infers.lesion_proposals import ProposalParams
from lib.requests import parse_params
from model_core.io.validation import InputError
from model_core.proposals import ProposalSettings


def test_conf_proposal_settings_and_label():
    assert parse_proposal_settings({}) == ProposalSettings()
    assert (
        parse_proposal_settings({"proposal_settings": '{"points_per_side": 8, "max_volume_mm3": 500}'}).points_per_side
        == 8
    )
    with pytest.raises(ValueError, match="--conf proposal_settings: Unknown proposal setting.*'points'"):
        parse_proposal_settings({"proposal_settings": '{"points": 8}'})
    with pytest.raises(ValueError, match="JSON object"):
        parse_proposal_settings({"proposal_settings": "[1]"})
    labels = {"lesion": 1, "edema": 2}
    assert (
        parse_proposal_label({}, labels) == "lesion"
        and parse_proposal_label({"proposal_label": "edema"}, labels) == "edema"
    )
    with pytest.raises(ValueError, match="proposal_label 'tumour' is not one of"):
        parse_proposal_label({"proposal_label": "tumour"}, labels)


def test_request_params_override_the_defaults_and_are_checked():
    defaults = ProposalSettings(points_per_side=16, max_volume_mm3=1000.0)
    params = parse_params(ProposalParams, {"points_per_side": 8, "accept": [2, 3]})
    settings = params.settings(defaults)
    assert settings.points_per_side == 8 and settings.max_volume_mm3 == 1000.0 and params.accept == [2, 3]
    for bad, field in (
        ({"points_per_side": 100}, "params.points_per_side"),
        ({"accept": [0]}, "params.accept[0]"),
        ({"pred_iou_thresh": True}, "params.pred_iou_thresh"),
        ({"save_label": True}, "give accept"),
    ):
        with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_params(ProposalParams, bad)
    with pytest.raises(InputError, match="max_volume_mm3") as error:
        parse_params(ProposalParams, {"min_volume_mm3": 2000}).settings(defaults)
    assert error.value.status == 422
