"""The app's ``--conf`` options for interactive corrections and where a pass stops: parsed, validated, handed to the
service."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib.settings import default_image_size, parse_scoring, service_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {"bundle": str(ROOT / "bundle"), "device": "cpu", "checkpoint": "/nonexistent/model.pt", "precision": "fp32"}
APP = str(ROOT / "monailabel_app")


def test_incremental_corrections_are_on_by_default_and_configurable():
    config = service_config(dict(BASE), APP)
    assert (config.incremental, config.incremental_patience, config.incremental_iou) == (True, 3, 0.98)
    config = service_config(
        {**BASE, "incremental": "false", "incremental_patience": "5", "incremental_iou": "0.9"}, APP
    )
    assert (config.incremental, config.incremental_patience, config.incremental_iou) == (False, 5, 0.9)


def test_a_pass_stops_where_the_structure_ends_by_default_and_zero_keeps_the_full_pass():
    config = service_config(dict(BASE), APP)
    assert (config.stop_after_absent, config.absent_score) == (2, 0.0)
    assert config.stopping() == {"stop_after_absent": 2, "absent_score": 0.0}
    config = service_config({**BASE, "stop_after_absent": "0", "absent_score": "-1.5"}, APP)
    assert config.stopping() == {"stop_after_absent": 0, "absent_score": -1.5}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("incremental", "maybe", "--conf incremental must be true or false, got 'maybe'"),
        ("incremental_patience", "0", "--conf incremental_patience must be a whole number of at least 1, got '0'"),
        ("incremental_patience", "2.5", "--conf incremental_patience must be a whole number of at least 1, got '2.5'"),
        ("incremental_iou", "1.5", "--conf incremental_iou must be a number from 0 to 1, got '1.5'"),
        ("incremental_iou", "x", "--conf incremental_iou must be a number from 0 to 1, got 'x'"),
        ("stop_after_absent", "-1", "--conf stop_after_absent must be a whole number of at least 0, got '-1'"),
        ("stop_after_absent", "two", "--conf stop_after_absent must be a whole number of at least 0, got 'two'"),
        ("absent_score", "nan", "--conf absent_score must be an object score logit from -100 to 100, got 'nan'"),
        ("absent_score", "low", "--conf absent_score must be an object score logit from -100 to 100, got 'low'"),
    ],
)
def test_bad_values_name_the_option_and_what_it_accepts(key, value, message):
    with pytest.raises(ValueError) as e:
        service_config({**BASE, key: value}, APP)
    assert message in str(e.value)


def test_the_image_size_fits_the_device_unless_given():
    """Issue 23: 512 px on a 2-core CPU took minutes per volume; without --conf or a checkpoint's record a CPU
    serves 256 (a GPU 512)."""
    assert service_config(dict(BASE), APP).image_size == 256 == default_image_size("cpu")
    assert default_image_size("cuda") == default_image_size("cuda:1") == 512
    assert service_config({**BASE, "image_size": "512"}, APP).image_size == 512


def test_the_scoring_schedule_options():
    assert parse_scoring({}) == ("idle", 30.0)
    assert parse_scoring({"scoring": "Immediate", "scoring_idle_s": "5"}) == ("immediate", 5.0)
    with pytest.raises(ValueError, match="--conf scoring must be one of idle, immediate, off, got 'sometimes'"):
        parse_scoring({"scoring": "sometimes"})
    with pytest.raises(ValueError, match="--conf scoring_idle_s must be a number of seconds from 0 to 3600"):
        parse_scoring({"scoring_idle_s": "-1"})
