"""Incremental corrections: a follow-up click re-runs the changed slices and stops where the result stops changing.

The same click lists go to a service in exact mode (every request replays all clicks
over the whole volume) and to one in incremental mode; both serve the same weights.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import make_phantom
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

ROOT = Path(__file__).resolve().parents[2]

LABELS = {"blob": 1, "tube": 2, "block": 3}
DEPTH = 24

pytestmark = pytest.mark.slow  # a few dozen tracked slices per request on CPU


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A phantom volume and its label as files, and decisive random weights (see test_reference_equivalence)."""
    root = tmp_path_factory.mktemp("incremental")
    image, label = make_phantom((DEPTH, 64, 64), seed=3)  # (D, H, W)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    paths = {}
    for key, array in (("image", image.astype(np.float32)), ("label", label.astype(np.uint8))):
        paths[key] = str(root / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(1, 2, 0)), affine), paths[key])
    torch.manual_seed(0)
    model = build_icl_sam2("tiny", image_size=64)
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(4.0)
    save_checkpoint(model, str(root / "model.pt"))
    return root, paths, label


def _service(root, incremental: bool) -> SegmentationService:
    return SegmentationService(
        ServiceConfig(
            bundle_dir=str(ROOT / "bundle"),
            labels=LABELS,
            checkpoint=str(root / "model.pt"),
            preset="tiny",
            image_size=64,
            window=(0, 1),
            incremental=incremental,
        )
    )


def _maps_whole_volumes(service: SegmentationService) -> SegmentationService:
    """``service``, told nothing of its previous answers: every answer maps the whole result back."""
    service._to_original = lambda image, p, values, *_: SegmentationService._to_original(service, image, p, values)
    return service


def _voxels(label: np.ndarray, value: int, z: int, n: int) -> list[list[int]]:
    """``n`` voxel indices ``[i, j, k]`` (file order: x, y, slice) inside structure ``value`` on slice ``z``."""
    ys, xs = np.nonzero(label[z] == value)
    pick = np.linspace(0, len(ys) - 1, n).astype(int)
    return [[int(xs[p]), int(ys[p]), z] for p in pick]


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def test_follow_up_clicks_agree_with_the_exact_replay_and_run_fewer_slices(study):
    root, paths, label = study
    exact, fast, patient = (_service(root, incremental=v) for v in (False, True, True))
    patient.config.incremental_patience = DEPTH  # never stops early: the replay's order gives the replay's result
    mid = DEPTH // 2
    rounds = [
        {"foreground": _voxels(label, 1, mid, 1)},
        {"foreground": _voxels(label, 1, mid, 1) + _voxels(label, 1, mid + 2, 1)},  # a click on another slice
        {
            "foreground": _voxels(label, 1, mid, 1) + _voxels(label, 1, mid + 2, 1),
            "background": [[2, 2, mid + 2]],
        },  # a correction on that slice
    ]
    for i, clicks in enumerate(rounds):
        a = exact.interact("ann", paths["image"], "blob", **clicks)
        b = fast.interact("ann", paths["image"], "blob", **clicks)
        assert a.info["mode"] == "full" and a.info["propagated_slices"] >= DEPTH
        assert b.info["mode"] == ("full" if i == 0 else "incremental")
        dice = _dice(b.label, a.label)
        assert dice >= 0.99, (i, dice, b.info)
        if i:
            assert b.info["propagated_slices"] < a.info["propagated_slices"], (a.info, b.info)
        c = patient.interact("ann", paths["image"], "blob", **clicks)
        assert torch.equal(torch.as_tensor(c.label), torch.as_tensor(a.label)), i


def test_a_removed_click_or_another_label_starts_a_full_pass_and_a_repeat_runs_nothing(study):
    root, paths, label = study
    service = _service(root, incremental=True)
    mid = DEPTH // 2
    two = _voxels(label, 1, mid, 2)
    assert service.interact("bob", paths["image"], "blob", foreground=two).info["mode"] == "full"
    again = service.interact("bob", paths["image"], "blob", foreground=two)
    assert again.info["mode"] == "unchanged" and again.info["propagated_slices"] == 0
    assert service.interact("bob", paths["image"], "blob", foreground=two[:1]).info["mode"] == "full"  # removed
    assert service.interact("bob", paths["image"], "tube", foreground=_voxels(label, 2, mid, 1)).info["mode"] == "full"


def test_an_incremental_pass_stops_after_the_configured_agreeing_slices(study, monkeypatch):
    """With an IoU threshold of 0 every slice agrees: each pass stops `patience` slices past the changes."""
    root, paths, label = study
    service = _service(root, incremental=True)
    service.config.incremental_iou, service.config.incremental_patience = 0.0, 2
    mid = DEPTH // 2
    first = _voxels(label, 1, mid, 1)
    service.interact("cy", paths["image"], "blob", foreground=first)
    out = service.interact("cy", paths["image"], "blob", foreground=first + _voxels(label, 1, mid + 4, 1))
    # as the replay: forward from the prompt below the change (mid): mid+1 .. mid+4 always, then mid+5, mid+6;
    # backward from mid: mid-1, mid-2
    assert out.info["mode"] == "incremental" and out.info["propagated_slices"] == 4 + 2 + 2


def test_a_follow_up_maps_back_only_the_slices_it_changed(study):
    """The answer of a follow-up click is the previous answer with the slices whose result changed mapped back again
    (the bundle's postprocessing sees only them): equal to mapping the whole result back, as a second service does
    that is told nothing of the previous answer; a repeat maps nothing back and gives the same answer."""
    root, paths, label = study
    service, whole = _service(root, incremental=True), _maps_whole_volumes(_service(root, incremental=True))
    seen: list[int] = []  # slices of each pred the postprocessing is given
    postprocessing = service.postprocessing
    service.postprocessing = lambda data: seen.append(int(data["pred"].shape[-1])) or postprocessing(data)
    mid = DEPTH // 2
    first = _voxels(label, 1, mid, 1)
    follow_up = first + _voxels(label, 1, mid + 2, 1)
    for clicks in (first, follow_up):
        seen.clear()
        a = whole.interact("dee", paths["image"], "blob", foreground=clicks)
        b = service.interact("dee", paths["image"], "blob", foreground=clicks)
        assert torch.equal(torch.as_tensor(b.label), torch.as_tensor(a.label))
    # these weights find the blob on every slice: the first answer maps all of them, the follow-up fewer
    assert b.info["mode"] == "incremental" and len(seen) == 1 and seen[0] < DEPTH, (seen, b.info["propagated_slices"])
    seen.clear()
    again = service.interact("dee", paths["image"], "blob", foreground=follow_up)
    assert again.info["mode"] == "unchanged" and seen == []
    assert torch.equal(torch.as_tensor(again.label), torch.as_tensor(a.label))
    # each answer names the label values it was made with (the writer's range check reads them, not the voxels)
    for answer in (b, again):
        assert answer.values == (LABELS["blob"],) and set(np.unique(answer.label)) <= {0, LABELS["blob"]}


def test_a_follow_up_is_written_into_the_previous_answer_only_once_no_caller_reads_it(study):
    """A released answer's memory takes the next follow-up's answer (no copy of the whole volume); an answer a caller
    still holds unreleased, once or twice (a repeat hands out the same answer), is never changed. Every answer
    equals mapping the whole result back."""
    root, paths, label = study
    service, whole = _service(root, incremental=True), _maps_whole_volumes(_service(root, incremental=True))
    mid = DEPTH // 2
    clicks = [_voxels(label, 1, mid, 1)]
    for z in (mid + 2, mid - 3, mid + 4, mid - 5):
        clicks.append(clicks[-1] + _voxels(label, 1, z, 1))

    def ask(n: int):
        expected = whole.interact("eve", paths["image"], "blob", foreground=clicks[n])
        answer = service.interact("eve", paths["image"], "blob", foreground=clicks[n])
        assert torch.equal(torch.as_tensor(answer.label), torch.as_tensor(expected.label)), n
        return answer

    first = ask(0)
    first.release()
    second = ask(1)
    assert second.info["mode"] == "incremental" and second.label.data_ptr() == first.label.data_ptr()
    held = torch.as_tensor(second.label).clone()  # second is not released: a reader still reads it
    third = ask(2)
    assert third.label.data_ptr() != second.label.data_ptr() and torch.equal(torch.as_tensor(second.label), held)
    repeat = service.interact("eve", paths["image"], "blob", foreground=clicks[2])
    assert repeat.info["mode"] == "unchanged" and repeat.label is third.label
    third.release()
    third.release()  # counts once: the repeat still reads the same answer
    kept = torch.as_tensor(third.label).clone()
    fourth = ask(3)
    assert fourth.label.data_ptr() != third.label.data_ptr() and torch.equal(torch.as_tensor(third.label), kept)
    fourth.release()
    fifth = ask(4)
    assert fifth.label.data_ptr() == fourth.label.data_ptr()


def test_answers_held_by_concurrent_callers_are_never_written_into(study):
    """Three callers of one client click the same structure at once, each adding a click to the clicks so far and
    holding its answer a while before releasing it: no answer changes while its caller holds it, and once all are
    released the next follow-up is written into the last one (no reader is left counted)."""
    root, paths, label = study
    service = _service(root, incremental=True)
    mid = DEPTH // 2
    clicks = [voxel for step in (0, 2, -2, 4, -4, 1) for voxel in _voxels(label, 1, mid + step, 2)]  # 12 clicks
    turns = itertools.count()
    problems: list[str] = []
    written_in_place = []  # reuse_previous of each mapping
    to_original = service._to_original
    service._to_original = lambda image, p, values, changed=None, previous=None, reuse=False: (
        written_in_place.append(reuse) or to_original(image, p, values, changed, previous, reuse)
    )

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(8):
                turn = next(turns)
                answer = service.interact("fay", paths["image"], "blob", foreground=clicks[: turn % len(clicks) + 1])
                held = torch.as_tensor(answer.label).clone()
                time.sleep(rng.uniform(0.0, 0.15))  # other callers' follow-ups run meanwhile
                if not torch.equal(torch.as_tensor(answer.label), held):
                    problems.append(f"turn {turn}: the answer changed while its caller held it")
                answer.release()
        except Exception as error:  # reported by the test, not lost in the thread
            problems.append(f"caller {seed}: {error!r}")

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    # every caller released its answers: the next follow-up is written into the last one
    mapped = len(written_in_place)
    last = service.interact("fay", paths["image"], "blob", foreground=clicks, background=_voxels(label, 1, mid + 3, 1))
    assert last.info["mode"] == "incremental" and written_in_place[mapped:] == [True]
