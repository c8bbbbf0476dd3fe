"""Pictures a person looks at instead of reading tables: slice montages with contours, and the training curve.

MONAI's ``plot_2d_or_3d_image`` writes to TensorBoard and draws no contours; matplotlib needs a
figure per picture and its text layout varies with fonts. Montages are drawn here with Pillow,
pixel for pixel (their size follows from the arguments alone, :func:`montage_size`); the training
curve is a small matplotlib figure (Agg canvas, no global pyplot state).

Layout of a montage: a legend band (each structure's colour and name; solid = predicted,
dotted = truth), then one row per volume: its title and ``slices`` cells. Slices are axial
(the third axis of an ``(I, J, K)`` volume, MONAI's and NIfTI's layout) shown with ``J`` upwards,
picked evenly over the slices where any structure is drawn (over all slices when none is).
Structure colours are the DICOM SEG's (:func:`model_core.io.seg_metadata.segment_colours`), so the
preview and a viewer showing the SEG agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model_core.io.files import atomic_path
from model_core.io.seg_metadata import segment_colours

__all__ = ["LEGEND_HEIGHT", "TITLE_HEIGHT", "MontageRow", "montage_png", "montage_size", "training_curve_png"]

#: heights in pixels of the legend band and of each row's title band
LEGEND_HEIGHT, TITLE_HEIGHT = 22, 16


@dataclass
class MontageRow:
    """One volume of a montage.

    Attributes:
        title: written above the row (e.g. the case and the model).
        image: ``(I, J, K)`` intensities; shown scaled between their 1st and 99th percentiles.
        predicted: ``(I, J, K)`` label map drawn as solid contours (None: none).
        truth: ``(I, J, K)`` label map drawn as dotted contours (None: none).
    """

    title: str
    image: np.ndarray
    predicted: np.ndarray | None = None
    truth: np.ndarray | None = None


def montage_size(rows: int, slices: int, cell: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a montage of ``rows`` volumes, ``slices`` cells of ``cell`` pixels each."""
    return slices * cell, LEGEND_HEIGHT + rows * (TITLE_HEIGHT + cell)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _pick_slices(row: MontageRow, values: Sequence[int], count: int) -> list[int]:
    depth = row.image.shape[2]
    marked = np.zeros(depth, bool)
    for label in (row.predicted, row.truth):
        if label is not None:
            marked |= np.isin(label, list(values)).reshape(-1, depth).any(0)
    pool = np.nonzero(marked)[0] if marked.any() else np.arange(depth)
    if len(pool) <= count:
        return [int(z) for z in pool]
    return [int(pool[round((i + 0.5) * len(pool) / count - 0.5)]) for i in range(count)]


def _display(plane: np.ndarray, cell: int, nearest: bool) -> np.ndarray:
    """An ``(I, J)`` plane as a ``(cell, cell)`` picture with ``J`` upwards."""
    picture = np.ascontiguousarray(np.flipud(plane.T))
    if nearest:
        rows = (np.arange(cell) * picture.shape[0] // cell).clip(0, picture.shape[0] - 1)
        cols = (np.arange(cell) * picture.shape[1] // cell).clip(0, picture.shape[1] - 1)
        return picture[rows][:, cols]
    image = Image.fromarray(picture.astype(np.float32), mode="F").resize((cell, cell), Image.BILINEAR)
    return np.asarray(image)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it, thickened inwards by one pixel (visible when scaled down)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    edge = mask & ~inner
    padded = np.pad(edge, 1)
    grown = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:] | edge
    return grown & mask


def montage_png(
    rows: Sequence[MontageRow],
    path: str | os.PathLike,
    labels: dict[str, int],
    slices: int = 6,
    cell: int = 128,
) -> str:
    """Draw volumes as rows of axial slices with each structure's contours and write a PNG (atomically).

    Args:
        rows: the volumes, top to bottom.
        path: the PNG file.
        labels: ``{structure name: label value}`` (the legend's order; colours as the SEGs give them).
        slices: cells per row.
        cell: a cell's width and height in pixels.

    Returns:
        ``path``. The picture is :func:`montage_size` ``(len(rows), slices, cell)`` pixels.

    Raises:
        ValueError: no rows, or a row whose label maps are not on its image's grid.
    """
    if not rows:
        raise ValueError("Nothing to draw: give at least one volume.")
    values = [int(v) for v in labels.values()]
    colours = [segment_colours(labels)[name] for name in labels]
    width, height = montage_size(len(rows), slices, cell)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    x = 4
    for k, name in enumerate(labels):
        draw.rectangle([x, 6, x + 10, 16], fill=colours[k])
        draw.text((x + 14, 5), name, fill=(255, 255, 255), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    draw.text((x + 8, 5), "solid: predicted, dotted: truth", fill=(170, 170, 170), font=font)
    yy, xx = np.mgrid[0:cell, 0:cell]
    dotted = ((yy + xx) // 3) % 2 == 0
    for r, row in enumerate(rows):
        image = np.asarray(row.image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"{row.title}: the image must be (I, J, K), got {image.shape}.")
        for label in (row.predicted, row.truth):
            if label is not None and np.shape(label) != image.shape:
                raise ValueError(f"{row.title}: a label map of {np.shape(label)} is not on the image's {image.shape}.")
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
        top = LEGEND_HEIGHT + r * (TITLE_HEIGHT + cell)
        draw.text((4, top + 2), row.title, fill=(255, 255, 255), font=font)
        for c, z in enumerate(_pick_slices(row, values, slices)):
            grey = (_display(scaled[:, :, z], cell, nearest=False) * 255).round().clip(0, 255).astype(np.uint8)
            pixels = np.repeat(grey[:, :, None], 3, axis=2)
            for label, pattern in ((row.truth, dotted), (row.predicted, None)):
                if label is None:
                    continue
                plane = _display(np.asarray(label)[:, :, z], cell, nearest=True)
                for k, value in enumerate(values):
                    edge = _boundary(plane == value)
                    if pattern is not None:
                        edge &= pattern
                    pixels[edge] = colours[k]
            canvas.paste(Image.fromarray(pixels), (c * cell, top + TITLE_HEIGHT))
    with atomic_path(path, suffix=".png") as tmp:
        canvas.quantize(palette=_palette(colours), dither=Image.Dither.NONE).save(tmp, optimize=True)
    return str(path)


def _palette(structures: Sequence[tuple[int, int, int]]) -> Image.Image:
    """32 grey levels and the structure colours: a montage as a palette PNG is a few times smaller, contours exact."""
    colours = [(g, g, g) for g in np.linspace(0, 255, 32).round().astype(int)]
    colours += [*structures[: 256 - 33], (170, 170, 170)]
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in colours for c in rgb] + [0, 0, 0] * (256 - len(colours)))
    return palette


def training_curve_png(curve: dict | str | os.PathLike, path: str | os.PathLike, metric: str = "val_mean_dice") -> str:
    """Plot a training curve (:class:`model_core.workflows.handlers.TrainingCurve`'s JSON) as a PNG (atomically).

    Left: the loss per iteration (faint) and its mean per epoch; right: ``metric`` per epoch
    (epoch 0 is the untrained model when validation ran before training).

    Args:
        curve: the curve, or the path of its JSON file.
        path: the PNG file.
        metric: the validation metric to plot.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(curve, dict):
        with open(curve) as f:
            curve = json.load(f)
    epochs = curve.get("epochs", [])
    per_epoch = max((e["iteration"] / e["epoch"] for e in epochs if e.get("epoch")), default=1.0)
    figure = Figure(figsize=(7.0, 2.6), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, metric_axes = figure.subplots(1, 2)
    iterations = np.asarray(curve.get("iterations", []), dtype=float).reshape(-1, 2)
    if len(iterations):
        loss_axes.plot(iterations[:, 0] / per_epoch, iterations[:, 1], color="#9bb7d4", linewidth=0.6)
    trained = [e for e in epochs if e.get("loss") is not None]
    loss_axes.plot([e["epoch"] for e in trained], [e["loss"] for e in trained], "o-", color="#1f4e79", markersize=3)
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
    scored = [e for e in epochs if metric in e]
    metric_axes.plot([e["epoch"] for e in scored], [e[metric] for e in scored], "o-", color="#b03a2e", markersize=3)
    metric_axes.set(xlabel="epoch", ylabel="Dice", title=f"validation {metric.replace('val_', '').replace('_', ' ')}")
    metric_axes.set_ylim(0, 1)
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    return str(path)
