"""The protocol's click simulator and scores on hand-made masks: where each click lands, and why."""

from __future__ import annotations

import numpy as np
import pytest

from model_core.workflows.clicks import (
    centre_click,
    clicks_to_reach,
    curve_auc,
    middle_slice_box,
    next_click,
)


def _box(shape, z, y, x):
    mask = np.zeros(shape, bool)
    mask[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = True
    return mask


def test_a_missed_region_gets_a_foreground_click_at_its_deepest_voxel():
    reference = _box((12, 30, 30), (2, 11), (4, 25), (4, 25))
    prediction = reference.copy()
    prediction[:, :, 14:] = False  # the right part missed: x 14..24, 9 slices, 21 rows
    click = next_click(prediction, reference)
    assert click.positive
    assert reference[click.z, click.y, click.x] and not prediction[click.z, click.y, click.x]
    # deepest: 5 voxels from the missed block's borders in x (14..24) and in z (2..10), centred in y
    assert (click.z, click.x) == (6, 19) and abs(click.y - 14) <= 1
    assert click.depth_mm == pytest.approx(5.0)
    assert click.region_voxels == 9 * 21 * 11


def test_the_largest_error_wins_a_false_region_gets_a_background_click():
    reference = _box((10, 40, 40), (2, 8), (5, 15), (5, 15))
    prediction = reference.copy()
    prediction[2:8, 5:15, 5:7] = False  # a small miss (6 x 10 x 2 = 120 voxels)
    prediction |= _box(reference.shape, (1, 9), (20, 36), (20, 36))  # a large false region (8 x 16 x 16)
    click = next_click(prediction, reference)
    assert not click.positive
    assert prediction[click.z, click.y, click.x] and not reference[click.z, click.y, click.x]
    assert 24 <= click.y <= 31 and 24 <= click.x <= 31  # inside, away from its border
    # with the false region gone, the miss is next: a foreground click
    prediction[~reference & prediction] = False
    assert next_click(prediction, reference).positive


def test_the_click_is_measured_in_millimetres_and_the_image_edge_is_a_border():
    reference = np.zeros((20, 20, 20), bool)
    reference[:, 5:15, 5:15] = True  # touches the first and last slice
    click = next_click(np.zeros_like(reference), reference, spacing=(1.0, 1.0, 1.0))
    assert 8 <= click.z <= 11  # never on the volume's edge
    # thick slices: the region is 20 slices x 5 mm deep, so in-plane distance decides (5 voxels of 1 mm)
    click = next_click(np.zeros_like(reference), reference, spacing=(5.0, 1.0, 1.0))
    assert click.depth_mm == pytest.approx(5.0)


def test_nothing_to_correct_and_wrong_shapes():
    reference = _box((4, 8, 8), (1, 3), (2, 6), (2, 6))
    assert next_click(reference.copy(), reference) is None
    with pytest.raises(ValueError, match="one grid"):
        next_click(reference[:2], reference)


def test_the_initial_click_lies_inside_a_structure_that_is_not_convex():
    ring = _box((6, 30, 30), (0, 6), (5, 25), (5, 25)) & ~_box((6, 30, 30), (0, 6), (10, 20), (10, 20))
    click = centre_click(ring)
    assert ring[click.z, click.y, click.x] and click.positive  # the centroid (15, 15) is in the hole
    with pytest.raises(ValueError, match="absent"):
        centre_click(np.zeros((2, 4, 4), bool))


def test_the_initial_box_is_the_structures_box_on_its_middle_slice():
    reference = _box((20, 30, 30), (4, 11), (3, 9), (12, 20))  # slices 4..10: middle 7
    reference[7, 9, 21] = True
    assert middle_slice_box(reference) == (7, (12, 3, 21, 9))


def test_area_under_the_curve_and_clicks_to_reach_a_dice():
    assert curve_auc([0.5, 0.7, 0.9]) == pytest.approx(0.6 + 0.8)
    assert curve_auc([1.0] * 6) == pytest.approx(5.0)
    assert curve_auc([0.4]) is None
    assert clicks_to_reach([0.5, 0.85, 0.91, 0.95]) == 2
    assert clicks_to_reach([0.95]) == 0
    assert clicks_to_reach([0.5, 0.6]) is None
