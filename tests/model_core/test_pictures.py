"""Slice montages with contours and the training curve (model_core.io.pictures)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model_core.io.phantoms import make_phantom
from model_core.io.pictures import (
    LEGEND_HEIGHT,
    TITLE_HEIGHT,
    MontageRow,
    montage_png,
    montage_size,
    training_curve_png,
)
from model_core.io.seg_metadata import PALETTE as COLOURS  # structures without sides: colours by rank

LABELS = {"blob": 1, "tube": 2, "block": 3}


def _row(seed: int, shift: int = 0) -> MontageRow:
    image, label = make_phantom((10, 32, 32), seed=seed)
    image, label = image.transpose(1, 2, 0), label.transpose(1, 2, 0)  # (I, J, K) as NIfTI stores them
    return MontageRow(f"case {seed}", image, np.roll(label, shift, axis=0), label)


def test_contours_are_drawn_in_each_structure_colour_on_grey_slices(tmp_path):
    path = montage_png([_row(1), _row(2, shift=3)], tmp_path / "m.png", LABELS, slices=4, cell=64)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1::-1] == montage_size(2, 4, 64) == (256, LEGEND_HEIGHT + 2 * (TITLE_HEIGHT + 64))
    cells = picture[LEGEND_HEIGHT + TITLE_HEIGHT : LEGEND_HEIGHT + TITLE_HEIGHT + 64]
    grey = (cells[..., 0] == cells[..., 1]) & (cells[..., 1] == cells[..., 2])
    assert 0.8 < grey.mean() < 1.0
    for k in range(3):
        assert (cells == COLOURS[k]).all(-1).sum() > 10  # every structure outlined


def test_contours_lie_on_the_structure_boundary(tmp_path):
    image = np.zeros((32, 32, 3), np.float32)
    label = np.zeros((32, 32, 3), np.uint8)
    label[8:16, 4:12, :] = 1  # I 8..15, J 4..11
    path = montage_png([MontageRow("square", image, predicted=label)], tmp_path / "s.png", {"blob": 1}, 1, 32)
    cell = np.asarray(Image.open(path).convert("RGB"))[LEGEND_HEIGHT + TITLE_HEIGHT :]
    red = (cell == COLOURS[0]).all(-1)
    rows, cols = np.nonzero(red)
    # J upwards: picture row = 31 - J, column = I; the contour is the mask's outer two pixels, inside it
    assert rows.min() == 31 - 11 and rows.max() == 31 - 4 and cols.min() == 8 and cols.max() == 15
    assert not red[31 - 8, 11]  # the centre is not drawn
    assert red.sum() == 8 * 8 - 4 * 4


def test_a_label_off_the_image_grid_is_refused(tmp_path):
    row = MontageRow("bad", np.zeros((8, 8, 4)), predicted=np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="not on the image"):
        montage_png([row], tmp_path / "x.png", LABELS)
    assert not (tmp_path / "x.png").exists()


def test_training_curve_png(tmp_path):
    curve = {
        "epochs": [
            {"epoch": 0, "iteration": 0, "loss": None, "val_mean_dice": 0.05},
            {"epoch": 1, "iteration": 10, "loss": 2.0, "val_mean_dice": 0.4},
            {"epoch": 2, "iteration": 20, "loss": 1.0, "val_mean_dice": 0.9},
        ],
        "iterations": [[i, 3.0 - i / 10] for i in range(1, 21)],
    }
    path = training_curve_png(curve, tmp_path / "curve.png")
    assert Image.open(path).size == (700, 260)
