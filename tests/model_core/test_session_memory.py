"""Bounded memory (issue 19, case 11): the session cache counts what a session holds, and volumes read and
preprocessed at once are capped (a bounded wait, then ServiceBusy: a 503 with Retry-After at the server).

The process growth per session against what the cache reports is measured by
``scripts/session_memory.py`` (a script: RSS is not a thing to assert in a test).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from model_core.io.phantoms import make_phantom
from model_core.io.validation import InputError, ServiceBusy
from model_core.modeling.memory import SupportMemory
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService
from model_core.serving.sessions import Session, VolumeSlots, held_bytes

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"blob": 1, "tube": 2, "block": 3}
SHAPE = (80, 72, 10)  # (I, J, K) of the files


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("session_memory")
    paths = []
    for seed in range(3):
        image, _ = make_phantom((SHAPE[2], SHAPE[1], SHAPE[0]), seed=seed)  # (D, H, W)
        path = root / f"case{seed}.nii.gz"
        nib.save(
            nib.Nifti1Image(
                np.ascontiguousarray(image.transpose(2, 1, 0)).astype(np.float32), np.diag([0.9, 1.1, 2.0, 1.0])
            ),
            str(path),
        )
        paths.append(str(path))
    return root, paths


def _service(root: Path, **kw) -> SegmentationService:
    config = ServiceConfig(
        bundle_dir=str(ROOT / "bundle"),
        labels=LABELS,
        checkpoint=str(root / "none.pt"),
        preset="tiny",
        image_size=64,
        window=(0, 1),
        **kw,
    )
    return SegmentationService(config)


# ---------------------------------------------------------------- what a structure of tensors holds
def test_held_bytes_counts_each_storage_once_and_skips_what_is_shared():
    base = torch.zeros(10, 4, dtype=torch.float32)  # 160 bytes
    assert held_bytes(base) == 160
    assert held_bytes(base, base[:2], base[:, None].expand(-1, 3, -1), {"again": [base.T]}) == 160  # views: one storage
    assert held_bytes(base, torch.zeros(5, dtype=torch.float64)) == 200
    assert held_bytes(base[:1]) == 160  # a view keeps its whole storage alive
    meta = MetaTensor(torch.zeros(2, 2), affine=torch.eye(4, dtype=torch.float64))
    assert held_bytes(meta) == 16 + 128  # the data and the affine in its meta
    array = np.zeros(8, np.int16)
    assert held_bytes(array, array[2:], {"x": array.reshape(2, 4)}) == 16
    header = nib.Nifti1Header().structarr  # a structured array, as a MetaTensor's meta holds
    assert held_bytes(header, {"again": header[None]}, [header.reshape(1)]) == 348
    assert held_bytes(torch.nn.Linear(100, 100)) == 0  # a network is never a session's
    support = SupportMemory.__new__(SupportMemory)
    support.__dict__["memories"] = [torch.zeros(100)]
    assert held_bytes([support], skip=(SupportMemory,)) == 0 and held_bytes([support]) == 400


# ---------------------------------------------------------------- the session cache counts what a session holds
@pytest.mark.slow
def test_a_session_reports_its_volume_features_and_results(images):
    root, paths = images
    service = _service(root)
    seg = service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5]])
    reported = service.session_bytes("alice", paths[0])
    assert seg.info["session_cache_mb"] == round(reported / 2**20, 2)
    # measured independently: the preprocessed volume, one slice's features times the slices, the results and
    # the answer kept for follow-up clicks (the label in the image's space, the logits it was made from)
    image, slices = service.preprocess(paths[0], service.network)
    D = slices.shape[0]
    volume = image.numel() * image.element_size()
    with torch.inference_mode():
        features = service.network.encode_slices(slices[:1].contiguous())
    per_slice = sum(f.numel() * f.element_size() for f in features["backbone_fpn"])
    positions = sum(p[:1].numel() * p.element_size() for p in features["vision_pos_enc"])
    results = D * 4 * (64 // 4) ** 2  # the low-resolution logits of every slice, float32
    answer = seg.label.numel() * seg.label.element_size() + results
    expected = volume + D * per_slice + positions + results + answer
    assert expected <= reported <= 1.2 * expected, (reported, expected)
    # the model input slices share the volume's storage (replicate channels): not a second copy
    assert held_bytes(image, slices) == held_bytes(image)


@pytest.mark.slow
def test_the_cap_counts_the_volume_and_evicts_before_the_features_arrive(images):
    root, paths = images
    probe = _service(root)
    probe.interact("probe", paths[0], "blob", foreground=[[40, 36, 5]])
    one = probe.session_bytes("probe", paths[0])
    service = _service(root, session_cache_mb=1.5 * one / 2**20)
    service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5]])
    bob = service.interact("bob", paths[1], "blob", foreground=[[40, 36, 5]])
    assert bob.info["sessions"] == 1 and service.session_bytes("alice", paths[0]) is None  # alice made room
    assert bob.info["session_cache_mb"] <= 1.5 * one / 2**20


@pytest.mark.slow
def test_a_follow_up_that_encodes_nothing_walks_its_session_once_after_its_answer(images, monkeypatch):
    root, paths = images
    service = _service(root)
    walks = []
    measure = Session.measure
    monkeypatch.setattr(Session, "measure", lambda self: walks.append(self) or measure(self))
    service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5]]).release()
    assert len(walks) == 3  # a new session, then before and after its answer (room for the answer first)
    walks.clear()
    follow_up = service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5], [44, 36, 5]])
    assert follow_up.info["mode"] == "incremental" and follow_up.info["encoded_slices"] == 0, follow_up.info
    assert len(walks) == 1  # after the answer only: nothing grew before it
    follow_up.release()
    walks.clear()
    again = service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5], [44, 36, 5]])
    assert again.info["mode"] == "unchanged" and walks == []  # nothing it holds changed
    session = service._sessions[("alice", os.path.abspath(paths[0]))]
    assert again.info["session_cache_mb"] == round(measure(session) / 2**20, 2)  # what it reports is what it holds


# ---------------------------------------------------------------- volumes preprocessed at once
def test_a_request_that_finds_every_slot_taken_is_told_when_to_come_back():
    slots = VolumeSlots(1, wait_s=0)
    with slots.hold():
        with pytest.raises(ServiceBusy) as busy:
            with slots.hold():
                pass
    assert isinstance(busy.value, InputError) and busy.value.status == 503
    assert isinstance(busy.value.retry_after, int) and busy.value.retry_after >= 1
    assert "at most 1" in str(busy.value) and "Retry-After" in str(busy.value)
    with slots.hold():  # released: served again
        assert slots.in_use == 1


def test_waiting_requests_get_a_slot_in_arrival_order():
    slots = VolumeSlots(1, wait_s=60)
    order: list[int] = []
    release = threading.Event()

    def holder():
        with slots.hold():
            release.wait(60)

    def waiter(n: int, queued: threading.Event):
        queued.set()
        with slots.hold():
            order.append(n)

    first = threading.Thread(target=holder)
    first.start()
    while slots.in_use == 0:
        release.wait(0.01)
    threads = []
    for n in range(3):  # queued one after the other
        queued = threading.Event()
        threads.append(threading.Thread(target=waiter, args=(n, queued)))
        threads[-1].start()
        queued.wait(60)
        while slots.waiting < n + 1:
            queued.wait(0.01)
    release.set()
    for t in [first, *threads]:
        t.join(60)
    assert order == [0, 1, 2] and slots.in_use == 0 and slots.waiting == 0


@pytest.mark.slow
def test_a_new_session_waits_for_a_slot_but_a_follow_up_click_does_not(images):
    root, paths = images
    service = _service(root, max_preprocessing=1, preprocessing_wait_s=0)
    first = service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5]])
    with service.volume_slots.hold():  # another request is reading a volume
        with pytest.raises(ServiceBusy) as busy:
            service.interact("bob", paths[1], "blob", foreground=[[40, 36, 5]])
        assert busy.value.status == 503 and busy.value.retry_after >= 1
        with pytest.raises(ServiceBusy):
            service.segment(paths[1], [])
        # alice's volume is in her session already: her next click needs no slot
        again = service.interact("alice", paths[0], "blob", foreground=[[40, 36, 5], [42, 36, 5]])
        assert again.info["mode"] == "incremental" and again.info["encoded_slices"] == 0
    assert first.info["sessions"] == 1
    bob = service.interact("bob", paths[1], "blob", foreground=[[40, 36, 5]])  # slot free again
    assert bob.info["sessions"] == 2 and service.volume_slots.in_use == 0
