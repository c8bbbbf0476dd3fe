"""Data loading for the bundle: start-up checks, lazy memory-mapped volumes, 2.5D channels,
multi-channel images, and the training feature cache of a frozen encoder."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized

from model_core.io.datalist import check_case, load_datalist
from model_core.io.phantoms import make_phantom
from model_core.io.phantoms import write_phantom_dataset as make_dataset
from model_core.io.transforms import SelectChanneld
from model_core.modeling.inputs import slice_channels, volume_to_slices
from model_core.training import build_training_network
from model_core.training.episodes import EpisodeSampler
from model_core.training.losses import ICLSAM2Loss
from model_core.workflows.episodes import EpisodeDataset, EpisodePrepareBatch

SIZE = 32


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("phantoms")), train=3, validation=1, test=0, shape=(10, SIZE, SIZE))


class CountingLoad(LoadImaged):
    calls = 0

    def __call__(self, data, *args, **kwargs):
        CountingLoad.calls += 1
        return super().__call__(data, *args, **kwargs)


def _transform(size: int = SIZE):
    return Compose(
        [
            CountingLoad(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Resized(["image", "label"], spatial_size=(size, size, -1), mode=("bilinear", "nearest")),
        ]
    )


def _write(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


# ---------------------------------------------------------------- start-up checks
def test_check_case_names_shape_affine_and_unreadable_problems(tmp_path):
    image = _write(tmp_path / "img.nii.gz", np.zeros((8, 8, 4), np.float32))
    check_case({"image": image, "label": _write(tmp_path / "ok.nii.gz", np.zeros((8, 8, 4), np.uint8))})
    with pytest.raises(ValueError, match=r"has shape \(8, 8, 4\) but its label .* has \(8, 8, 5\)"):
        check_case({"image": image, "label": _write(tmp_path / "deep.nii.gz", np.zeros((8, 8, 5), np.uint8))})
    with pytest.raises(ValueError, match="(?s)different affines .* resample the label onto the image grid"):
        check_case(
            {
                "image": image,
                "label": _write(
                    tmp_path / "moved.nii.gz", np.zeros((8, 8, 4), np.uint8), np.diag([1.0, 1.0, 2.5, 1.0])
                ),
            }
        )
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"image: cannot read .*junk\.nii\.gz.* as an image volume"):
        check_case({"image": str(tmp_path / "junk.nii.gz")})
    with pytest.raises(ValueError, match=r"label: .*missing\.nii\.gz' does not exist"):
        check_case({"image": image, "label": str(tmp_path / "missing.nii.gz")}, where="Case 3")


def test_load_datalist_checks_every_case(tmp_path):
    image = _write(tmp_path / "a.nii.gz", np.zeros((8, 8, 4), np.float32))
    label = _write(tmp_path / "b.nii.gz", np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "seg": "b.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"Entry 0 of 'training' in .*list\.json.*: image .* has shape"):
        load_datalist(str(path))
    assert load_datalist(str(path), check=False)[0] == {"image": image, "label": label}


def test_a_volume_that_fails_to_load_is_named_before_training(datalist, tmp_path):
    cases = load_datalist(datalist)
    broken = tmp_path / "truncated.nii.gz"
    broken.write_bytes(Path(cases[0]["image"]).read_bytes()[:300])  # header intact, data cut off
    with pytest.raises(ValueError, match=r"Case '.*truncated\.nii\.gz' .* could not be loaded and preprocessed"):
        EpisodeDataset([{**cases[0], "image": str(broken)}, *cases[1:]], _transform(), [1, 2, 3], 2, 2, SIZE)


# ---------------------------------------------------------------- channels
def test_2p5d_channels_are_the_neighbouring_slices():
    volume = np.random.default_rng(0).random((5, SIZE, SIZE)).astype(np.float32)
    out = slice_channels(volume, [0, 2, 4], SIZE, "2.5d")
    assert out.shape == (3, 3, SIZE, SIZE)
    expect = torch.as_tensor(volume)
    assert torch.equal(out[1], expect[[1, 2, 3]])
    assert torch.equal(out[0], expect[[0, 0, 1]]) and torch.equal(out[2], expect[[3, 4, 4]])  # repeated at the ends
    replicated = volume_to_slices(volume, SIZE)
    assert torch.equal(replicated[2], expect[2].expand(3, -1, -1))
    with pytest.raises(ValueError, match="channel mode must be one of"):
        slice_channels(volume, [0], SIZE, "rgb")


def test_select_channel_of_a_multichannel_image():
    image = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 2, 2)
    assert SelectChanneld()({"image": image, "channel": 2})["image"].unique().tolist() == [2.0]
    with pytest.raises(ValueError, match='has 4 channels .* "channel": N'):
        SelectChanneld()({"image": image})
    with pytest.raises(ValueError, match="channel 7 asked for, but the image has 4"):
        SelectChanneld()({"image": image, "channel": 7})


# ---------------------------------------------------------------- lazy volumes
def test_cache_dir_memory_maps_preprocessed_volumes_and_reuses_them(datalist, tmp_path):
    cases = load_datalist(datalist)
    in_memory = EpisodeDataset(cases, _transform(), [1, 2, 3], 2, 3, SIZE, objects_per_episode=2, seed=5)
    CountingLoad.calls = 0
    lazy = EpisodeDataset(
        cases, _transform(), [1, 2, 3], 2, 3, SIZE, objects_per_episode=2, seed=5, cache_dir=str(tmp_path)
    )
    assert CountingLoad.calls == len(cases)
    assert len(list(tmp_path.glob("*_image.npy"))) == len(cases) and not list(tmp_path.glob("*.tmp*"))
    assert all(isinstance(img, np.memmap) and img.dtype == np.float16 for img in lazy.sampler.images)
    a, b = in_memory[0], lazy[0]
    assert torch.equal(a["support_masks"], b["support_masks"]) and torch.equal(a["query_keys"], b["query_keys"])
    assert torch.allclose(a["query_images"], b["query_images"], atol=1e-3)  # float16 storage
    CountingLoad.calls = 0
    EpisodeDataset(cases, _transform(), [1, 2, 3], 2, 3, SIZE, cache_dir=str(tmp_path))
    assert CountingLoad.calls == 0  # a second run reads the cache
    EpisodeDataset(cases, _transform(SIZE // 2), [1, 2, 3], 2, 3, SIZE // 2, cache_dir=str(tmp_path))
    assert CountingLoad.calls == len(cases)  # other preprocessing settings: new files
    assert len(list(tmp_path.glob("*_image.npy"))) == 2 * len(cases)


# ---------------------------------------------------------------- feature cache
@pytest.mark.slow
def test_feature_cache_gives_the_same_training_step_without_encoding_again():
    volumes = [make_phantom((8, 64, 64), seed=i) for i in range(3)]
    sampler = EpisodeSampler(
        volumes, [1, 2, 3], num_support=2, num_query=3, image_size=64, objects_per_episode=2, seed=0
    )
    batch = sampler.sample(2)
    inputs, targets, args, kwargs = EpisodePrepareBatch()(batch)
    assert set(kwargs) == {"support_keys", "query_keys"}
    torch.manual_seed(0)
    model = build_training_network("tiny", image_size=64, trainable="frozen").train()

    def loss(**keys):
        torch.manual_seed(1)  # memory attention has dropout in training mode
        return ICLSAM2Loss()(model(inputs, *args, **keys), targets)["loss"]

    reference = loss()
    model.cache_encoder_features(100)
    first = loss(**kwargs)
    encoded = model.encoded_slices
    second = loss(**kwargs)
    assert model.encoded_slices == encoded  # nothing encoded the second time
    unique = len(set(torch.cat([kwargs["support_keys"].flatten(), kwargs["query_keys"].flatten()]).tolist()))
    assert model.feature_cache.misses == unique and model.feature_cache.hits == unique
    assert torch.allclose(first, reference, atol=1e-6) and torch.allclose(second, reference, atol=1e-6)
    second.backward()  # gradients still flow to everything after the encoder
    assert any(p.grad is not None for p in model.memory_attention.parameters())
    model.cache_encoder_features(2)
    model(inputs, *args, **kwargs)
    assert len(model.feature_cache) == 2  # bounded


def test_feature_cache_refuses_a_trainable_encoder():
    model = build_training_network("tiny", image_size=64, trainable="all")
    with pytest.raises(ValueError, match="needs a frozen image encoder"):
        model.cache_encoder_features(10)
    assert (
        build_training_network("tiny", image_size=64, trainable="frozen").cache_encoder_features(0).feature_cache
        is None
    )


# ---------------------------------------------------------------- gradient clipping under mixed precision
def _clip_one_step(max_norm: float, scale: float):
    """One SupervisedTrainer step with a GradScaler of a known scale; loss 100 * w gives the gradient 100."""
    from monai.engines import SupervisedTrainer

    from model_core.workflows.handlers import GradientClipHandler

    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
    batch = {"image": torch.ones(1, 1), "label": torch.zeros(1, 1)}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=network,
        optimizer=optimizer,
        loss_function=lambda pred, _: 100.0 * pred.sum(),
        amp=True,
        train_handlers=[GradientClipHandler(max_norm=max_norm)],
    )
    # Trainer.run makes a CUDA GradScaler under amp (disabled without CUDA); a CPU one scales and unscales the same way
    from ignite.engine import Events

    trainer.add_event_handler(
        Events.STARTED, lambda e: setattr(e, "scaler", torch.amp.GradScaler("cpu", init_scale=scale))
    )
    trainer.run()
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == scale
    return trainer, float(network.weight.detach()[0, 0])


def test_gradient_clipping_under_amp_clips_the_unscaled_gradient():
    trainer, weight = _clip_one_step(max_norm=0.1, scale=2.0**16)
    assert trainer.state.grad_norm == pytest.approx(100.0)  # the true norm, not 100 * 2**16
    assert -weight == pytest.approx(0.1, rel=1e-5)  # SGD lr 1: the step is the clipped, unscaled gradient


def test_gradient_clip_refuses_gradient_accumulation():
    from monai.engines import SupervisedTrainer

    from model_core.workflows.handlers import GradientClipHandler

    network = torch.nn.Linear(1, 1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        network=network,
        train_data_loader=[{"image": torch.ones(1, 1), "label": torch.zeros(1, 1)}],
        optimizer=torch.optim.SGD(network.parameters(), lr=1.0),
        loss_function=torch.nn.L1Loss(),
        accumulation_steps=2,
        train_handlers=[GradientClipHandler()],
    )
    with pytest.raises(ValueError, match="accumulation_steps"):
        trainer.run()


# ---------------------------------------------------------------- episodes per loader worker
def _episode_keys(dataset, num_workers: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The query slice ids of every batch a ``monai.data.DataLoader`` yields, in order."""
    from monai.data import DataLoader
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, shuffle=False)
    return [tuple(batch["query_keys"].flatten().tolist()) for batch in loader]


@pytest.mark.slow
def test_loader_workers_draw_different_episodes_and_a_seed_repeats_the_run(datalist):
    dataset = EpisodeDataset(
        load_datalist(datalist),
        _transform(),
        classes=[1, 2, 3],
        num_support=2,
        num_query=3,
        image_size=SIZE,
        episodes_per_epoch=8,
    )
    two_workers = _episode_keys(dataset, num_workers=2)
    # torch's DataLoader hands batches round-robin: even batches are worker 0's, odd ones worker 1's
    assert two_workers[0::2] != two_workers[1::2]
    assert len(set(two_workers)) > len(two_workers) // 2
    assert _episode_keys(dataset, num_workers=2) == two_workers  # the same seed, the same run
    assert _episode_keys(dataset, num_workers=2, seed=1) != two_workers
    in_process = _episode_keys(dataset, num_workers=0)
    assert _episode_keys(dataset, num_workers=0) == in_process and len(set(in_process)) > 1


def test_episode_sampler_follows_monai_set_rnd_and_keeps_its_seed_apart():
    from monai.data.utils import set_rnd

    volumes = [make_phantom((8, SIZE, SIZE), seed=i) for i in range(3)]

    def draws(sampler_seed: int, loader_seed: int) -> list[int]:
        sampler = EpisodeSampler(volumes, [1, 2, 3], 2, 3, SIZE, seed=sampler_seed)
        set_rnd(sampler, seed=loader_seed)
        return sampler.sample(4)["query_keys"].flatten().tolist()

    assert draws(0, 7) == draws(0, 7)
    assert draws(0, 7) != draws(0, 8)  # another worker
    assert draws(0, 7) != draws(1, 7)  # another rank, same loader seed
    sampler = EpisodeSampler(volumes, [1, 2, 3], 2, 3, SIZE).set_random_state(seed=3)
    state = sampler.state_dict()
    first = sampler.sample(2)["query_keys"]
    resumed = EpisodeSampler(volumes, [1, 2, 3], 2, 3, SIZE)
    resumed.load_state_dict(state)
    assert resumed.salt and resumed.set_random_state(seed=3).sample(2)["query_keys"].tolist() != first.tolist()
