"""SegmentationService: coordinates of the clients, session caches under limits, model reload, support cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core import build_icl_sam2, save_checkpoint
from model_core.io.phantoms import make_phantom
from model_core.io.transforms import load_case
from model_core.modeling.inputs import as_slices
from model_core.serving.config import ServiceConfig
from model_core.serving.service import SegmentationService

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"blob": 1, "tube": 2, "block": 3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    out = []
    for i in range(3):
        image, label = make_phantom((10, 64, 48), seed=i)  # (D, H, W)
        # stored LPS-like (first two axes flipped) and anisotropic, slices along k
        affine = np.diag([-0.8, -1.2, 2.5, 1.0])
        affine[:3, 3] = [50, 60, -10]
        to_file = lambda a: np.ascontiguousarray(a.transpose(1, 2, 0))  # noqa: E731  (H, W, D)
        paths = {}
        for key, array in (("image", to_file(image).astype(np.float32)), ("label", to_file(label).astype(np.uint8))):
            paths[key] = str(root / f"case{i}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(array, affine), paths[key])
        out.append(paths)
    return root, out


def _service(root, **kw) -> SegmentationService:
    config = ServiceConfig(
        bundle_dir=str(ROOT / "bundle"),
        labels=LABELS,
        checkpoint=str(root / "model.pt"),
        preset="tiny",
        image_size=64,
        window=(0, 1),
        **kw,
    )
    return SegmentationService(config)


def test_client_voxel_indices_map_onto_the_same_anatomy_on_the_model_grid(files):
    root, cases = files
    service = _service(root)
    image, _ = service.preprocess(cases[0]["image"], service.network)
    # the label on the model grid, through the bundle's own transforms (nearest-neighbour for labels)
    model_grid = as_slices(load_case(cases[0], service.support_preprocessing)["label"]).numpy()  # (D, 64, 64)
    label = np.asarray(nib.load(cases[0]["label"]).dataobj)
    hits = {}
    for structure in (1, 2, 3):
        voxels = np.argwhere(label == structure)
        voxels = voxels[np.linspace(0, len(voxels) - 1, 40).astype(int)]  # file indices [i, j, k], as clients send
        x, y, z = np.rint(service.to_model_grid(image, voxels)).astype(int).T
        hits[structure] = np.mean(model_grid[z.clip(0, 9), y.clip(0, 63), x.clip(0, 63)] == structure)
    assert min(hits.values()) > 0.8, hits  # the same structure there (edges may move by resampling)


@pytest.mark.slow
def test_sessions_are_evicted_by_count_and_capped_by_memory(files):
    root, cases = files
    service = _service(root, max_sessions=1)
    a = service.interact("alice", cases[0]["image"], "blob", foreground=[[30, 20, 5]])
    assert a.info["encoded_slices"] == 10 and a.info["sessions"] == 1
    b = service.interact("bob", cases[1]["image"], "blob", foreground=[[30, 20, 5]])
    assert b.info["encoded_slices"] == 10 and b.info["sessions"] == 1  # alice's session made room
    again = service.interact("alice", cases[0]["image"], "blob", foreground=[[30, 20, 5]])
    assert again.info["encoded_slices"] == 10  # evicted, so encoded again
    assert torch.equal(torch.as_tensor(again.label), torch.as_tensor(a.label))  # and the same result
    capped = _service(root, session_cache_mb=0.05)
    carol = capped.interact("carol", cases[0]["image"], "blob", foreground=[[30, 20, 5]])
    assert carol.info["session_cache_mb"] < a.info["session_cache_mb"]  # features dropped to fit the cap
    assert torch.equal(torch.as_tensor(carol.label), torch.as_tensor(a.label))


def test_a_new_checkpoint_is_loaded_on_the_next_request(files, tmp_path):
    _root, _cases = files
    config = ServiceConfig(
        bundle_dir=str(ROOT / "bundle"),
        labels=LABELS,
        checkpoint=str(tmp_path / "m.pt"),
        preset="tiny",
        image_size=64,
        window=(0, 1),
    )
    service = SegmentationService(config)
    assert service.model_info()["untrained"] is True and service.reloads == 0
    torch.manual_seed(7)
    save_checkpoint(build_icl_sam2("tiny", image_size=64), str(tmp_path / "m.pt"))
    info = service.model_info()
    assert info["untrained"] is False and service.reloads == 1
    time.sleep(0.01)
    torch.manual_seed(8)
    save_checkpoint(build_icl_sam2("tiny", image_size=64), str(tmp_path / "m.pt"))
    assert service.model_info()["model_version"] != info["model_version"] and service.reloads == 2


@pytest.mark.slow
def test_a_checkpoint_published_mid_request_waits_for_the_next_request(files, tmp_path, monkeypatch):
    """The support memory and the query of one request use the same weights (one network per request)."""
    import model_core.serving.service as service_module

    _root, cases = files
    config = ServiceConfig(
        bundle_dir=str(ROOT / "bundle"),
        labels=LABELS,
        checkpoint=str(tmp_path / "m.pt"),
        preset="tiny",
        image_size=64,
        window=(0, 1),
    )
    service = SegmentationService(config)
    before = service.model_info()["model_version"]
    build = service_module.build_support

    def build_then_publish(*args, **kwargs):
        memory = build(*args, **kwargs)
        torch.manual_seed(9)  # a training run publishes other weights between the two steps
        save_checkpoint(build_icl_sam2("tiny", image_size=64), str(tmp_path / "m.pt"))
        return memory

    monkeypatch.setattr(service_module, "build_support", build_then_publish)
    result = service.segment(cases[1]["image"], [cases[0]])  # raised "built by a different model" when read twice
    assert result.info["model_version"] == before and result.label.shape == (1, 64, 48, 10)
    monkeypatch.setattr(service_module, "build_support", build)
    after = service.segment(cases[1]["image"], [cases[0]])
    assert after.info["model_version"] != before and service.reloads == 1


@pytest.mark.slow
def test_support_is_cached_and_rebuilt_when_a_label_changes(files, tmp_path):
    root, cases = files
    service = _service(root)
    first = service.segment(cases[1]["image"], [cases[0]])
    second = service.segment(cases[2]["image"], [cases[0]])
    assert second.info["encoded_slices"] == 10 < first.info["encoded_slices"]  # support not encoded again
    os.utime(cases[0]["label"], None)  # the label was saved again
    third = service.segment(cases[2]["image"], [cases[0]])
    assert third.info["encoded_slices"] == first.info["encoded_slices"]
    assert first.label.shape == (1, 64, 48, 10) and np.allclose(first.label.affine, nib.load(cases[1]["image"]).affine)
    assert first.values == (1, 2, 3) and set(np.unique(first.label)) <= {0, 1, 2, 3}  # the classes it was made with
    with pytest.raises(ValueError, match="label at least one volume"):
        service.segment(cases[1]["image"], [])


def test_file_work_runs_while_another_request_holds_the_model(files, monkeypatch):
    """Reading, preprocessing and writing back a volume wait for no other client's model work."""
    import threading

    root, cases = files
    service = _service(root)
    network = service.network  # loaded before the lock is taken
    steps = []
    real_preprocess, real_to_original = service.preprocess, service._to_original
    monkeypatch.setattr(
        service, "preprocess", lambda *a, **k: (steps.append("preprocess"), real_preprocess(*a, **k))[1]
    )
    monkeypatch.setattr(
        service, "_to_original", lambda *a, **k: (steps.append("to_original"), real_to_original(*a, **k))[1]
    )
    results = {}
    with service._lock:  # another request's model work
        request = threading.Thread(
            target=lambda: results.update(
                reply=service.interact("bob", cases[1]["image"], "blob", foreground=[[30, 20, 5]])
            )
        )
        request.start()
        deadline = time.monotonic() + 120
        while "preprocess" not in steps and time.monotonic() < deadline:
            time.sleep(0.05)
        assert steps == ["preprocess"]  # the file was read and preprocessed meanwhile; the model part waits
        assert "reply" not in results
    request.join(timeout=300)
    assert steps == ["preprocess", "to_original"] and results["reply"].info["encoded_slices"] == 10
    assert service.network is network


def test_model_work_runs_on_the_model_thread_and_file_work_on_one_core(files, monkeypatch):
    """Requests from several threads: every encode, track step and postprocessing on the process's one model thread
    (one OpenMP team), each new volume preprocessed in its request's thread with OpenMP on that thread alone."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import model_core.serving.service as service_module
    from model_core.serving.threads import model_thread_ident

    root, cases = files
    service = _service(root)
    network = service.network
    seen = {"encode": set(), "track": set(), "to_original": set(), "preprocess": set()}

    def spy(kind, real):
        def call(*args, **kwargs):
            seen[kind].add((threading.get_ident(), torch.get_num_threads()))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(network, "encode_slices", spy("encode", network.encode_slices))
    monkeypatch.setattr(network, "track_step", spy("track", network.track_step))
    monkeypatch.setattr(service, "_to_original", spy("to_original", service._to_original))
    monkeypatch.setattr(service, "preprocess", spy("preprocess", service.preprocess))
    monkeypatch.setattr(service_module, "build_support", spy("encode", service_module.build_support))

    def request(n):
        if n == 3:
            return service.segment(cases[1]["image"], [cases[0]])
        return service.interact(f"client{n}", cases[n % 3]["image"], "blob", foreground=[[30, 20, 5]])

    with ThreadPoolExecutor(4) as requests:
        results = list(requests.map(request, range(4)))
    model = {(model_thread_ident(), torch.get_num_threads())}
    assert seen["encode"] == seen["track"] == seen["to_original"] == model
    assert {threads for _, threads in seen["preprocess"]} == {1}
    assert model_thread_ident() not in {ident for ident, _ in seen["preprocess"]}
    assert all(r.label.shape == (1, 64, 48, 10) for r in results)


def _bad_image(path: Path, kind: str, good: str) -> str:
    """An image file that breaks one rule of ``check_image_volume`` (``good``: an image to truncate)."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    arrays = {
        "nan": lambda: np.where(np.arange(64 * 48 * 10).reshape(64, 48, 10) % 997 == 0, np.nan, 0.5),
        "inf": lambda: np.full((64, 48, 10), np.inf),
        "four_d": lambda: np.ones((64, 48, 10, 3)),
        "two_d": lambda: np.ones((64, 48)),
        "tiny": lambda: np.ones((64, 48, 2)),
        "complex": lambda: np.ones((64, 48, 10), np.complex64),
    }
    if kind == "truncated":  # the header intact, the voxels cut off
        data = Path(good).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        array = arrays[kind]()
        nib.save(nib.Nifti1Image(array.astype(array.dtype if kind == "complex" else np.float32), affine), str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["nan", "inf", "four_d", "two_d", "tiny", "complex", "truncated"])
def test_the_header_check_and_the_services_read_refuse_what_the_full_check_refuses(files, tmp_path, kind):
    """A server checks a request's image in two halves so that a new image is read once: the header
    (``image_header_problem``, no voxels read) and the voxels as the service reads them (``preprocess_checked_image``).
    Together they refuse every file the full check refuses, with its message."""
    from model_core.io.validation import InputError, image_header_problem, image_problem

    root, cases = files
    path = _bad_image(tmp_path / f"{kind}.nii.gz", kind, cases[0]["image"])
    full = image_problem(path)
    assert full, kind
    rule = {
        "nan": "NaN or infinite values",
        "inf": "NaN or infinite values",
        "four_d": "a 3D scalar volume",
        "two_d": "a 3D scalar volume",
        "tiny": "at least 4 voxels",
        "complex": "real numbers are needed",
        "truncated": "not a readable image volume",
    }[kind]
    assert rule in full
    header = image_header_problem(path)
    if kind in ("nan", "inf", "truncated"):  # only the voxels tell
        assert header is None
        service = _service(root)
        with pytest.raises(InputError, match=rule) as refused:
            service.preprocess(path, service.network)
        assert str(refused.value).startswith("This image cannot be segmented: ")
        if kind != "truncated":
            assert str(refused.value).endswith(full)  # the same rule, the same words
    else:
        assert header == full


def test_a_new_image_is_read_once(files, monkeypatch):
    """The header check reads no voxels; the service reads a new image once and maps clicks on it as before."""
    from monai.transforms import LoadImage

    from model_core.io.validation import image_header_problem

    root, cases = files
    service = _service(root)
    assert service.network is not None  # the weights loaded before reads are counted
    reads = []
    real = LoadImage.__call__
    monkeypatch.setattr(LoadImage, "__call__", lambda self, *a, **k: (reads.append(a[0]), real(self, *a, **k))[1])
    assert image_header_problem(cases[2]["image"]) is None and reads == []
    reply = service.interact("carol", cases[2]["image"], "blob", foreground=[[30, 20, 5]])
    assert reads == [cases[2]["image"]] and reply.info["encoded_slices"] > 0
