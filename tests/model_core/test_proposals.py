"""Automatic lesion proposals: sam2's own mask generator on each slice, merged into 3D candidates.

Random weights find no lesions, so the tests check the machinery: the 3D merge on
hand-made slice masks whose components are known exactly, and, with the real
generator on a phantom with small bright spheres, that candidates are unions of the
generator's masks, within the size limits, disjoint, numbered 1..N and mapped back to
the image's grid.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from model_core.modeling.presets import build_icl_sam2
from model_core.proposal_regions import Candidate, Region
from model_core.proposals import (
    ProposalSettings,
    SliceMask,
    build_candidates,
    link_slice_masks,
    paint_candidates,
    select_candidates,
)
from model_core.serving.config import load_bundle_parser
from model_core.workflows.proposals import finalize_candidates, propose_image
from tests.model_core.proposal_phantom import ROOT, write_lesion_phantom

SIZE = 64


def _sphere_masks(shape, centre, radius):
    """Per slice, the ``(H, W)`` disk of a sphere (None where it is absent)."""
    H, W, D = shape
    r, c = np.mgrid[:H, :W]
    out = {}
    for z in range(D):
        disk = (r - centre[0]) ** 2 + (c - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
        if disk.any():
            out[z] = disk
    return out


def test_two_spheres_give_two_components_with_their_slices_and_boxes():
    shape = (32, 32, 12)
    a = _sphere_masks(shape, (8, 9, 3), 3)
    b = _sphere_masks(shape, (22, 21, 7), 4)
    body = np.zeros(shape[:2], bool)
    body[2:30, 2:30] = True  # a big mask around both on every slice: nested, so never linked to them
    speck = np.zeros(shape[:2], bool)
    speck[0, 31] = True
    per_slice = []
    for z in range(shape[2]):
        masks = [SliceMask.from_mask(z, body, 0.9, 0.9)]
        if z in b:
            masks.append(SliceMask.from_mask(z, b[z], 0.7, 0.8))
        if z in a:
            masks.append(SliceMask.from_mask(z, a[z], 0.95, 0.97))
        if z == 10:
            masks.append(SliceMask.from_mask(z, speck, 0.99, 0.99))
        per_slice.append(masks)

    # by IoU alone a sphere's one-voxel end caps are cut off (IoU 1/21 with the disk next to them)
    assert len(link_slice_masks(per_slice, link_iou=0.3)) == 8
    groups = link_slice_masks(per_slice, link_iou=0.3, link_containment=0.7)
    candidates = build_candidates(per_slice, groups)
    assert len(candidates) == 4  # body, sphere a, sphere b, speck: the spheres never join the body around them
    settings = ProposalSettings(max_volume_mm3=1000.0, min_slices=2)
    kept = select_candidates(candidates, settings, voxel_mm3=1.0)
    assert len(kept) == 2
    first, second = kept  # best score first: sphere a (0.95 x 0.97) before sphere b (0.7 x 0.8)
    for candidate, sphere, centre, radius in ((first, a, (8, 9, 3), 3), (second, b, (22, 21, 7), 4)):
        assert candidate.slices == sorted(sphere)
        assert candidate.slices == list(range(centre[2] - radius, centre[2] + radius + 1))
        assert candidate.voxels == sum(int(m.sum()) for m in sphere.values())
        summary = candidate.summary()
        assert summary["model_bbox"] == [
            [centre[0] - radius, centre[1] - radius, centre[2] - radius],
            [centre[0] + radius, centre[1] + radius, centre[2] + radius],
        ]
        assert summary["masks"] == len(sphere)
    assert first.predicted_iou == pytest.approx(0.95) and first.stability_score == pytest.approx(0.97)
    assert first.score == pytest.approx(0.95 * 0.97)

    label = paint_candidates(kept, shape)
    assert set(torch.unique(label).tolist()) == {0, 1, 2}
    assert int((label == 1).sum()) == first.voxels and int((label == 2).sum()) == second.voxels

    # the size limits act in mm³: with 8 mm³ voxels sphere b (257 voxels) is over 1000 mm³ and a (123) is not
    big_voxels = select_candidates(candidates, settings, voxel_mm3=8.0)
    assert [c.slices for c in big_voxels] == [first.slices]
    # min_slices 1 keeps the one-slice speck; max_candidates keeps the best
    assert len(select_candidates(candidates, ProposalSettings(max_volume_mm3=1000.0), 1.0)) == 3
    assert len(select_candidates(candidates, ProposalSettings(max_volume_mm3=1000.0, max_candidates=1), 1.0)) == 1


def test_overlapping_candidates_are_dropped_or_carved():
    shape = (16, 16, 2)
    big = np.zeros(shape[:2], bool)
    big[2:10, 2:10] = True  # 64 voxels per slice
    part = np.zeros(shape[:2], bool)
    part[8:12, 2:10] = True  # 32 per slice, 16 of them inside `big`
    inside = np.zeros(shape[:2], bool)
    inside[3:5, 3:5] = True  # entirely inside `big`
    per_slice = [
        [
            SliceMask.from_mask(z, big, 0.9, 0.9),
            SliceMask.from_mask(z, part, 0.5, 0.5),
            SliceMask.from_mask(z, inside, 0.4, 0.4),
        ]
        for z in range(2)
    ]
    candidates = build_candidates(per_slice, link_slice_masks(per_slice, 0.5))
    assert len(candidates) == 3
    kept = select_candidates(candidates, ProposalSettings(max_overlap=0.6), 1.0)
    assert len(kept) == 2  # `inside` shares all its voxels with `big`: dropped
    assert kept[0].voxels == 128 and kept[1].voxels == 2 * 16  # `part` keeps its own half
    assert not any((kept[0].masks[z] & kept[1].masks[z]).any() for z in range(2))
    assert len(select_candidates(candidates, ProposalSettings(max_overlap=0.4), 1.0)) == 1


def test_settings_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="points_per_side"):
        ProposalSettings(points_per_side=0)
    with pytest.raises(ValueError, match="pred_iou_thresh"):
        ProposalSettings(pred_iou_thresh=1.5)
    with pytest.raises(ValueError, match="max_volume_mm3"):
        ProposalSettings(min_volume_mm3=10.0, max_volume_mm3=5.0)
    with pytest.raises(ValueError, match="Unknown proposal setting.*points_per_side"):
        ProposalSettings.from_dict({"points": 4})
    with pytest.raises(ValueError, match="generator_kwargs.*crop_overlap_ratio"):
        ProposalSettings(generator_kwargs={"no_such_argument": 1})
    settings = ProposalSettings(points_per_side=4, generator_kwargs={"crop_overlap_ratio": 0.5})
    assert settings.generator_args()["points_per_side"] == 4 and settings.generator_args()["crop_overlap_ratio"] == 0.5


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_icl_sam2("tiny", image_size=SIZE)


def test_real_generator_on_a_lesion_phantom(network, tmp_path):
    """sam2's generator (random weights) over a phantom: candidates are unions of its masks, within the limits,
    disjoint and back on the image's grid."""
    path, affine = write_lesion_phantom(tmp_path / "lesions.nii.gz")
    parser = load_bundle_parser(str(ROOT / "bundle"), "inference.json", {"image_size": SIZE, "modality": "MRI"})
    preprocessing = parser.get_parsed_content("preprocessing")
    image = preprocessing({"image": str(path)})["image"]
    settings = ProposalSettings(
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        max_slice_fraction=0.5,
        link_iou=0.2,
        max_volume_mm3=4000.0,
        max_overlap=0.5,
    )
    result = propose_image(network, image, preprocessing, settings)

    # on the model grid: every candidate is the union of its generator masks, minus the voxels of better ones
    depth = image.shape[-1]
    label, kept = result.model_label.numpy(), result.model_candidates
    assert label.shape == (SIZE, SIZE, depth) and result.info["slices"] == depth
    assert 0 < len(kept) <= result.info["linked_components"] <= result.info["generator_masks"]
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(image.affine)[:3, :3])))
    claimed = np.zeros_like(label, dtype=bool)
    for n, candidate in enumerate(kept, start=1):
        union = np.zeros_like(claimed)
        for (z, _), source in zip(candidate.members, candidate.sources):
            assert source.slice == z and source.mask.shape == (SIZE, SIZE)
            assert 0 < source.area <= 0.5 * SIZE * SIZE and 0 <= source.stability_score <= 1
            union[:, :, z] |= source.mask
        mine = label == n
        assert np.array_equal(mine, union & ~claimed)
        assert candidate.voxels == int(mine.sum()) and candidate.voxels * voxel_mm3 <= settings.max_volume_mm3
        assert candidate.predicted_iou == pytest.approx(np.mean([s.predicted_iou for s in candidate.sources]))
        claimed |= mine
    scores = [c.score for c in kept]
    assert scores == sorted(scores, reverse=True)

    # in the image's space: its grid and affine, values 1..N, each candidate measured there
    original = nib.load(str(path))
    array = np.asarray(result.label)[0]
    assert array.shape == original.shape and np.allclose(np.asarray(result.label.affine), original.affine)
    assert sorted(set(np.unique(array).tolist()) - {0}) == list(range(1, len(result.candidates) + 1))
    assert len(result.candidates) == result.info["candidates"] > 0
    spacing_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    for c in result.candidates:
        where = np.argwhere(array == c["label"])
        assert c["voxels"] == len(where) and c["volume_mm3"] == pytest.approx(len(where) * spacing_mm3, rel=1e-3)
        assert c["bbox"] == [where.min(0).tolist(), where.max(0).tolist()]
        assert c["slice_axis"] == 2 and c["slices"] == sorted(set(where[:, 2].tolist()))
        assert 0 <= c["predicted_iou"] <= 1 and 0 <= c["stability_score"] <= 1


def test_finalize_drops_lost_candidates_and_renumbers():
    from monai.data import MetaTensor

    array = np.zeros((1, 6, 6, 3), np.int16)
    array[0, 1:3, 1:3, 0] = 1
    array[0, 4, 4, 2] = 3  # candidate 2 vanished (e.g. on a coarser grid)
    label = MetaTensor(torch.from_numpy(array), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    dummy = [Candidate([(0, 0)], [], {0: Region.from_mask(np.ones((2, 2), bool))}, 0.5, 0.5) for _ in range(3)]
    relabelled, out = finalize_candidates(label, dummy, axis=2)
    assert [c["label"] for c in out] == [1, 2]
    assert out[0]["voxels"] == 4 and out[0]["volume_mm3"] == 48.0 and out[0]["bbox"] == [[1, 1, 0], [2, 2, 0]]
    assert out[1]["slices"] == [2] and set(np.unique(np.asarray(relabelled)).tolist()) == {0, 1, 2}


def test_regions_match_full_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = (np.zeros((20, 24), bool) for _ in range(2))
        for m in (a, b):
            r0, c0 = rng.integers(0, 15, 2)
            m[r0 : r0 + rng.integers(1, 8), c0 : c0 + rng.integers(1, 8)] = rng.random() < 0.9
        ra, rb = Region.from_mask(a), Region.from_mask(b)
        assert np.array_equal(ra.full(), a) and ra.area == int(a.sum())
        assert ra.intersection(rb) == int((a & b).sum())
        assert np.array_equal(ra.union(rb).full(), a | b)
