"""Tests of engine.quicklook (label PNGs and the cluster palette)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from engine.quicklook import default_palette, write_label_quicklook


def _read_png(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as dataset:
            assert dataset.driver == "PNG"
            return dataset.read()


def _labels() -> np.ndarray:
    labels = np.repeat(np.arange(0, 6), 10).reshape(6, 10)  # rows of 0..5
    labels[2, 3] = 0
    return labels


def test_png_written_with_shape_and_colours(tmp_path: Path) -> None:
    labels = _labels()
    path = write_label_quicklook(labels, tmp_path / "sub" / "labels.png")
    assert path == tmp_path / "sub" / "labels.png"
    assert path.exists()
    assert not list(tmp_path.glob("**/*.aux.xml"))
    rgb = _read_png(path)
    assert rgb.shape == (3, 6, 10)
    assert rgb.dtype == np.uint8
    # Nodata is black.
    assert np.all(rgb[:, labels == 0] == 0)
    # Each cluster has its palette colour, and clusters are distinguishable.
    palette = default_palette(5)
    for cluster in range(1, 6):
        pixels = rgb[:, labels == cluster].T
        assert np.all(pixels == palette[cluster - 1])
    colours = {tuple(rgb[:, row, 0]) for row in range(1, 6)}
    assert len(colours) == 5
    assert (0, 0, 0) not in colours


def test_custom_palette_and_transparency(tmp_path: Path) -> None:
    labels = np.array([[0, 1], [2, 1]])
    palette = [(255, 0, 0), (0, 0, 255)]
    rgba = _read_png(
        write_label_quicklook(labels, tmp_path / "a.png", palette, transparent_nodata=True)
    )
    assert rgba.shape == (4, 2, 2)
    assert tuple(rgba[:, 0, 1]) == (255, 0, 0, 255)
    assert tuple(rgba[:, 1, 0]) == (0, 0, 255, 255)
    assert rgba[3, 0, 0] == 0


def test_palette_too_short_or_bad_input_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="palette"):
        write_label_quicklook(np.array([[1, 3]]), tmp_path / "x.png", [(1, 2, 3)])
    with pytest.raises(ValueError):
        write_label_quicklook(np.zeros((2, 2, 2), dtype=int), tmp_path / "x.png")
    with pytest.raises(ValueError):
        write_label_quicklook(np.zeros((2, 2), dtype=float), tmp_path / "x.png")


def test_default_palette_is_distinct_and_deterministic() -> None:
    for size in (0, 1, 5, 20, 21, 64, 255):
        palette = default_palette(size)
        assert len(palette) == size
        assert len(set(palette)) == size
        assert (0, 0, 0) not in palette
        assert all(0 <= channel <= 255 for colour in palette for channel in colour)
    assert default_palette(40) == default_palette(40)
    # A prefix is stable: cluster c keeps its colour whatever k is.
    assert default_palette(40)[:7] == default_palette(7)
    # The first colours are far apart (minimum RGB distance), so small k is easy to read.
    first = np.array(default_palette(10), dtype=float)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1)
    assert distances[np.triu_indices(10, 1)].min() > 40


def test_panels_quicklook_puts_maps_side_by_side(tmp_path):
    import rasterio

    from engine.quicklook import default_palette, write_panels_quicklook

    left = np.array([[1, 2], [0, 1]])
    right = np.array([[2, 2], [1, 0]])
    palette = default_palette(2)
    path = write_panels_quicklook([(left, palette), (right, palette)], tmp_path / "p.png", gap=3)
    with rasterio.open(path) as dataset:
        rgb = dataset.read()
    assert rgb.shape == (3, 2, 2 + 3 + 2)
    assert tuple(rgb[:, 0, 0]) == palette[0] and tuple(rgb[:, 0, 5]) == palette[1]
    assert tuple(rgb[:, 1, 1]) == palette[0] and tuple(rgb[:, 1, 6]) == (0, 0, 0)
    assert (rgb[:, :, 2:5] == 255).all()  # the white gap
    with pytest.raises(ValueError, match="one shape"):
        write_panels_quicklook([(left, palette), (right[:1], palette)], tmp_path / "q.png")
