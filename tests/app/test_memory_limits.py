"""The memory options in-process (issue 19, case 11): a request that finds every volume slot taken is answered 503
with Retry-After (the infer tasks turn :class:`~model_core.io.validation.ServiceBusy` into the HTTP answer), and the
options reach the service or stop the server naming the option."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException

from lib.infers.icl_sam2 import InteractiveInfer
from lib.infers.medsam_lite import LiteMedSAMRunner, MedSAMLiteInfer
from lib.settings import medsam_lite_settings
from model_core.io.phantoms import make_phantom
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"blob": 1}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("busy") / "case.nii.gz"
    volume, _ = make_phantom((6, 40, 40), seed=0)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0)).astype(np.float32), np.eye(4)), str(path))
    return str(path)


def _busy_answer(task, request) -> HTTPException:
    with pytest.raises(HTTPException) as answer:
        task(request)
    return answer.value


def test_interactive_infer_answers_503_with_retry_after(image, tmp_path):
    service = SegmentationService(
        ServiceConfig(
            bundle_dir=str(ROOT / "bundle"),
            labels=LABELS,
            preset="tiny",
            image_size=64,
            checkpoint=str(tmp_path / "none.pt"),
            window=(0, 1),
            max_preprocessing=1,
            preprocessing_wait_s=0,
        )
    )
    task = InteractiveInfer(lambda: service, lambda: None, LABELS)
    with service.volume_slots.hold():
        answer = _busy_answer(task, {"image": image, "foreground": [[20, 20, 3]], "client_id": "bob"})
    assert answer.status_code == 503 and "busy" in answer.detail and "at most 1" in answer.detail
    assert int(answer.headers["Retry-After"]) >= 1


def test_medsam_lite_answers_503_with_retry_after(image):
    settings = medsam_lite_settings(
        {"labels": '{"blob": 1}', "device": "cpu", "max_preprocessing": "1", "preprocessing_wait_s": "0"}
    )
    runner = LiteMedSAMRunner(settings)
    task = MedSAMLiteInfer(lambda: runner, LABELS)
    with runner.volume_slots.hold():
        answer = _busy_answer(task, {"image": image, "roi": [0, 39, 0, 39, 0, 5]})
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_preprocessing", "0"),
        ("max_preprocessing", "two"),
        ("preprocessing_wait_s", "-1"),
        ("preprocessing_wait_s", "soon"),
    ],
)
def test_bad_limits_stop_the_server_naming_the_option(name, value):
    with pytest.raises(ValueError, match=f"--conf {name}"):
        medsam_lite_settings({"labels": '{"blob": 1}', "device": "cpu", name: value})


def test_the_limits_reach_the_service_and_have_defaults():
    from lib.settings import service_config

    base = {"bundle": str(ROOT / "bundle"), "device": "cpu", "checkpoint": "/nonexistent/model.pt", "precision": "fp32"}
    app = str(ROOT / "monailabel_app")
    config = service_config(dict(base), app)
    assert (config.max_preprocessing, config.preprocessing_wait_s) == (2, 30.0)
    config = service_config({**base, "max_preprocessing": "3", "preprocessing_wait_s": "0.5"}, app)
    assert (config.max_preprocessing, config.preprocessing_wait_s) == (3, 0.5)
    with pytest.raises(ValueError, match="--conf max_preprocessing must be a whole number of at least 1"):
        service_config({**base, "max_preprocessing": "0"}, app)


def test_the_malloc_threshold_is_fixed_or_the_bad_value_named():
    from lib.settings import apply_malloc_threshold

    assert apply_malloc_threshold({"malloc_mmap_threshold_kb": "0"}) is None  # glibc's own, untouched
    for bad in ("40000", "-1", "a lot"):
        with pytest.raises(ValueError, match="--conf malloc_mmap_threshold_kb must be a whole number of KiB"):
            apply_malloc_threshold({"malloc_mmap_threshold_kb": bad})
    assert apply_malloc_threshold({}) in (128, None)  # None only where the C library is not glibc
