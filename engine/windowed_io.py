"""Windowed raster IO shared by the methods' file-to-file inference ("Apply clustering model").

Extent maths are pure functions (``tile_windows``); ``raster_window_reader`` reads one haloed
window with the same rules as ``raster_io.read_raster`` (nodata, NaN/inf, band scales/offsets),
so a model applied window by window sees the values it saw in training, and memory is bounded by
the window size whatever the raster size.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from engine.raster_io import read_band

# GDAL keeps every block it reads in its cache, up to 5 % of the RAM by default: on a large raster
# that cache, not the tiles, would set the peak memory. Windowed inference bounds it to this
# (rasterio's own GDAL; QGIS's GDAL is not affected).
GDAL_CACHE_BYTES = 64 * 2**20


def tile_starts(length: int, tile: int) -> list[int]:
    return list(range(0, length, tile))


@dataclass(frozen=True)
class TileWindow:
    """A core tile (written) inside a haloed window (read), in raster pixel coordinates."""

    row: int
    col: int
    height: int
    width: int
    read_row: int
    read_col: int
    read_height: int
    read_width: int

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        top, left = self.row - self.read_row, self.col - self.read_col
        return slice(top, top + self.height), slice(left, left + self.width)

    @property
    def core_window(self) -> Window:
        return Window(self.col, self.row, self.width, self.height)

    @property
    def read_window(self) -> Window:
        return Window(self.read_col, self.read_row, self.read_width, self.read_height)


def tile_windows(height: int, width: int, tile: int, halo: int) -> list[TileWindow]:
    """Row-major tiles covering the raster; each read window adds ``halo`` clipped to the edge."""
    windows = []
    for row in tile_starts(height, tile):
        for col in tile_starts(width, tile):
            tile_height, tile_width = min(tile, height - row), min(tile, width - col)
            read_row, read_col = max(row - halo, 0), max(col - halo, 0)
            read_bottom = min(row + tile_height + halo, height)
            read_right = min(col + tile_width + halo, width)
            windows.append(TileWindow(row, col, tile_height, tile_width, read_row, read_col,
                                      read_bottom - read_row, read_right - read_col))
    return windows


def missing_halo(window: TileWindow, halo: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) halo pixels of ``window`` clipped away by the raster edge."""
    top = halo - (window.row - window.read_row)
    left = halo - (window.col - window.read_col)
    bottom = halo - (window.read_row + window.read_height - window.row - window.height)
    right = halo - (window.read_col + window.read_width - window.col - window.width)
    return left, right, top, bottom


@dataclass
class PredictionSummary:
    """What applying a model to a raster file produced."""

    n_valid: int
    cluster_sizes: list[int]
    seconds: float


WindowReader = Callable[[TileWindow], tuple[np.ndarray, np.ndarray]]


def array_window_reader(cube: np.ndarray, valid: np.ndarray) -> WindowReader:
    """Windows of an in-memory (H, W, B) cube and its (H, W) valid mask."""

    def read(window: TileWindow) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(window.read_row, window.read_row + window.read_height)
        cols = slice(window.read_col, window.read_col + window.read_width)
        return cube[rows, cols], valid[rows, cols]

    return read


def raster_window_reader(dataset: rasterio.io.DatasetReader,
                         band_numbers: list[int]) -> WindowReader:
    """Windows of a raster with the same rules as ``raster_io.read_raster`` (nodata, NaN,
    scales/offsets): (h, w, B) float32 with 0 at invalid pixels, and the (h, w) valid mask."""

    def read(window: TileWindow) -> tuple[np.ndarray, np.ndarray]:
        area = window.read_window
        cube = np.empty((window.read_height, window.read_width, len(band_numbers)),
                        dtype=np.float32)
        valid = np.ones((window.read_height, window.read_width), dtype=bool)
        for position, band in enumerate(band_numbers):
            values = read_band(dataset, band, dataset.name, window=area)
            band_valid = np.isfinite(values)
            nodata = dataset.nodatavals[band - 1]
            if nodata is not None and np.isfinite(nodata):
                band_valid &= values != np.float32(nodata)
            scale = dataset.scales[band - 1] if dataset.scales else 1.0
            offset = dataset.offsets[band - 1] if dataset.offsets else 0.0
            if scale != 1.0 or offset != 0.0:
                values = values * np.float32(scale) + np.float32(offset)
            cube[..., position] = values
            valid &= band_valid
        cube[~valid] = 0.0
        return cube, valid

    return read


def open_raster(path: str | os.PathLike) -> rasterio.io.DatasetReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def open_for_writing(path: Path, profile: dict) -> rasterio.io.DatasetWriter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, "w", **profile)
