"""Raster reading and writing with rasterio: the only raster IO path of the project.

Reading keeps what users rely on: CRS, transform, nodata, band scales/offsets and band names.
Bands that hold no valid value at all (EnMAP's water-vapour bands, for example) are dropped
before pixels are masked, otherwise a per-pixel "any band is nodata" rule would mask the whole
scene. Writing goes to a temporary file next to the target and is renamed at the end, so a
failure or a cancel never leaves a half-written output behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from engine.monitor import Monitor, silent
from engine.safe_files import atomic_output  # noqa: F401  (re-exported: the writers' one path)

MIN_BANDS = 3


@dataclass
class RasterData:
    """A cube read for clustering.

    ``cube`` is (H, W, B) float32 in physical units (scales/offsets applied); nodata pixels hold 0.
    ``valid`` is (H, W) bool. ``band_numbers`` are the 1-based band numbers of the source file that
    were kept, in order.
    """

    cube: np.ndarray
    valid: np.ndarray
    band_numbers: list[int]
    band_names: list[str]
    crs_wkt: str | None
    transform: Affine
    source_path: str
    dropped_bands: list[int] = field(default_factory=list)
    source_band_count: int = 0  # bands in the file (a saved model checks a raster against it)

    @property
    def height(self) -> int:
        return int(self.valid.shape[0])

    @property
    def width(self) -> int:
        return int(self.valid.shape[1])

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def valid_pixels(self) -> np.ndarray:
        """(n_valid, B) rows in row-major order of the valid pixels."""
        return self.cube[self.valid]

    @property
    def grid(self) -> RasterGrid:
        return RasterGrid(self.height, self.width, self.crs_wkt, self.transform)


@dataclass(frozen=True)
class RasterGrid:
    """Where an output goes: size, CRS and transform of the input."""

    height: int
    width: int
    crs_wkt: str | None
    transform: Affine


def _open(path: str | os.PathLike) -> rasterio.io.DatasetReader:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as error:
        raise ValueError(
            f"'{path}' is not a raster GDAL can read ({error}). Choose a raster file such as a "
            "GeoTIFF."
        ) from error


def read_band(dataset, band: int, path: str | os.PathLike, window=None) -> np.ndarray:
    """One band (or a window of it) as float32; ValueError for a damaged or truncated file."""
    if dataset.dtypes[band - 1].startswith("complex"):  # complex_int16, complex64, ...
        raise ValueError(
            f"'{path}' holds complex numbers ({dataset.dtypes[band - 1]}, e.g. SAR data); "
            "clustering needs real-valued bands. Convert it first (e.g. to amplitude with the "
            "Raster Calculator)."
        )
    try:
        return dataset.read(band, window=window).astype(np.float32, copy=False)
    except RasterioIOError as error:
        raise ValueError(
            f"'{path}' cannot be read to the end: band {band} is damaged or the file is "
            "truncated (an interrupted copy or download?). Copy or export the raster again."
        ) from error


def read_grid(path: str | os.PathLike) -> RasterGrid:
    with _open(path) as dataset:
        crs = dataset.crs.to_wkt() if dataset.crs else None
        return RasterGrid(dataset.height, dataset.width, crs, dataset.transform)


def read_raster(
    path: str | os.PathLike,
    bands: Sequence[int] | None = None,
    min_bands: int = MIN_BANDS,
    monitor: Monitor | None = None,
) -> RasterData:
    """Read a multi-band raster for clustering; raises ``ValueError`` with advice on bad input."""
    monitor = monitor or silent()
    with _open(path) as dataset:
        band_numbers = list(bands) if bands else list(range(1, dataset.count + 1))
        outside = [b for b in band_numbers if b < 1 or b > dataset.count]
        if outside:
            raise ValueError(
                f"Band(s) {outside} do not exist: '{path}' has {dataset.count} band(s)."
            )
        if len(band_numbers) < min_bands:
            raise ValueError(
                f"'{path}' gives {len(band_numbers)} band(s); clustering needs at least "
                f"{min_bands} spectral bands. Choose a multi- or hyperspectral raster (or more "
                "bands in the band selection)."
            )
        if dataset.crs is None:
            monitor.warn(
                f"'{path}' has no CRS: the clustering runs, but its outputs will not be "
                "georeferenced either. Assign a CRS to the input to place them on the map."
            )
        height, width = dataset.height, dataset.width
        cube = np.empty((height, width, len(band_numbers)), dtype=np.float32)
        band_valid = np.empty((height, width), dtype=bool)
        valid = np.ones((height, width), dtype=bool)
        kept: list[int] = []
        dropped: list[int] = []
        names: list[str] = []
        non_finite_pixels = np.zeros((height, width), dtype=bool)
        for position, band in enumerate(band_numbers):
            values = read_band(dataset, band, path)
            nodata = dataset.nodatavals[band - 1]
            np.isfinite(values, out=band_valid)
            # A NaN nodata value is already covered by the isfinite test.
            if nodata is not None and np.isfinite(nodata):
                band_valid &= values != np.float32(nodata)
            if not band_valid.any():
                dropped.append(band)
                continue
            non_finite_pixels |= ~np.isfinite(values)
            scale = dataset.scales[band - 1] if dataset.scales else 1.0
            offset = dataset.offsets[band - 1] if dataset.offsets else 0.0
            if scale != 1.0 or offset != 0.0:
                values = values * np.float32(scale) + np.float32(offset)
            cube[..., len(kept)] = values
            valid &= band_valid
            kept.append(band)
            description = dataset.descriptions[band - 1]
            names.append(description or f"Band {band}")
            monitor.progress((position + 1) / len(band_numbers))
        crs_wkt = dataset.crs.to_wkt() if dataset.crs else None
        transform = dataset.transform
        source_band_count = dataset.count

    if dropped:
        monitor.warn(
            f"Band(s) {dropped} hold no valid value (all nodata) and were left out, as for "
            "water-vapour absorption bands."
        )
    if not kept:
        raise ValueError(
            f"'{path}' has no valid pixel: every selected band is entirely nodata (or NaN/inf). "
            "Check the raster's nodata value and the band selection."
        )
    if len(kept) < min_bands:
        raise ValueError(
            f"Only {len(kept)} band(s) of '{path}' hold valid values; clustering needs at least "
            f"{min_bands}."
        )
    cube = cube[..., : len(kept)]
    masked_non_finite = int(non_finite_pixels.sum())
    if masked_non_finite:
        monitor.warn(
            f"{masked_non_finite} pixel(s) hold NaN or infinite values; they are treated as "
            "nodata (left out of the clustering and written as 0)."
        )
    if not valid.any():
        raise ValueError(
            f"'{path}' has no valid pixel: every pixel is nodata (or NaN/inf) in at least one of "
            "the selected bands. Check the raster's nodata value and the band selection."
        )
    cube[~valid] = 0.0
    return RasterData(
        cube=cube,
        valid=valid,
        band_numbers=kept,
        band_names=names,
        crs_wkt=crs_wkt,
        transform=transform,
        source_path=str(path),
        dropped_bands=dropped,
        source_band_count=source_band_count,
    )


def has_valid_pixel(path: str | os.PathLike, bands: Sequence[int],
                    monitor: Monitor | None = None) -> bool:
    """Whether some pixel is valid (not nodata, finite) in all ``bands``: read block by block,
    stopping at the first block that has one, so a normal raster costs one block."""
    monitor = monitor or silent()
    with _open(path) as dataset:
        if not bands or max(bands) > dataset.count:
            return False
        windows = [window for _, window in dataset.block_windows(1)]
        for index, window in enumerate(windows):
            valid = None
            for band in bands:
                values = read_band(dataset, band, path, window=window)
                band_valid = np.isfinite(values)
                nodata = dataset.nodatavals[band - 1]
                if nodata is not None and np.isfinite(nodata):
                    band_valid &= values != np.float32(nodata)
                valid = band_valid if valid is None else valid & band_valid
                if not valid.any():
                    break
            if valid is not None and valid.any():
                return True
            monitor.progress((index + 1) / len(windows))
    return False


def smallest_unsigned_dtype(max_value: int) -> str:
    if max_value <= np.iinfo(np.uint8).max:
        return "uint8"
    if max_value <= np.iinfo(np.uint16).max:
        return "uint16"
    return "uint32"


def _profile(grid: RasterGrid, count: int, dtype: str, nodata: float | int) -> dict:
    profile = {
        "driver": "GTiff",
        "height": grid.height,
        "width": grid.width,
        "count": count,
        "dtype": dtype,
        "nodata": nodata,
        "transform": grid.transform,
        "compress": "deflate",
        "tiled": grid.width >= 256 and grid.height >= 256,
        "BIGTIFF": "IF_SAFER",
    }
    if grid.crs_wkt:
        profile["crs"] = rasterio.crs.CRS.from_wkt(grid.crs_wkt)
    return profile


def write_label_raster(
    path: str | os.PathLike, labels: np.ndarray, grid: RasterGrid, n_classes: int,
    description: str = "cluster",
) -> Path:
    """Write labels (0 = nodata, 1..n_classes) in the smallest unsigned type."""
    if labels.shape != (grid.height, grid.width):
        raise ValueError(f"labels {labels.shape} do not match the grid {grid.height}x{grid.width}")
    dtype = smallest_unsigned_dtype(n_classes)
    with atomic_output(path) as temporary:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(temporary, "w", **_profile(grid, 1, dtype, 0)) as dataset:
                dataset.write(labels.astype(dtype), 1)
                dataset.set_band_description(1, description)
    return Path(path)


FLOAT_NODATA = -9999.0


def write_float_raster(
    path: str | os.PathLike, bands: np.ndarray, valid: np.ndarray, grid: RasterGrid,
    band_names: Sequence[str] | None = None,
) -> Path:
    """Write an (H, W, K) float32 stack; invalid pixels get nodata -9999."""
    if bands.shape[:2] != (grid.height, grid.width):
        raise ValueError(f"bands {bands.shape} do not match the grid {grid.height}x{grid.width}")
    with atomic_output(path) as temporary:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            profile = _profile(grid, bands.shape[2], "float32", FLOAT_NODATA)
            with rasterio.open(temporary, "w", **profile) as dataset:
                for index in range(bands.shape[2]):
                    band = bands[..., index].astype(np.float32)
                    band[~valid] = FLOAT_NODATA
                    dataset.write(band, index + 1)
                    if band_names:
                        dataset.set_band_description(index + 1, band_names[index])
    return Path(path)


def read_labels(path: str | os.PathLike) -> tuple[np.ndarray, RasterGrid]:
    """Read a single-band label raster (band 1) as int64, nodata mapped to 0."""
    with _open(path) as dataset:
        labels = dataset.read(1) if dataset.count else None
        if labels is None:
            raise ValueError(f"'{path}' has no band.")
        nodata = dataset.nodata
        grid = RasterGrid(
            dataset.height, dataset.width, dataset.crs.to_wkt() if dataset.crs else None,
            dataset.transform,
        )
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        finite = np.isfinite(labels)
        labels = np.where(finite, labels, 0)
    result = labels.astype(np.int64)
    if nodata is not None and np.isfinite(nodata):
        result[labels == nodata] = 0
    result[result < 0] = 0
    return result, grid


def pixel_size_metres(crs_wkt: str | None, transform: Affine, height: int = 0) -> float | None:
    """Ground size of a pixel in metres (geometric mean of its sides), None when unknown.

    Projected CRS: the transform's units times the CRS's linear unit. Geographic CRS: degrees
    converted at the latitude of the raster's centre row. No CRS: None.
    """
    if not crs_wkt:
        return None
    try:
        crs = rasterio.crs.CRS.from_wkt(crs_wkt)
    except (rasterio.errors.CRSError, ValueError):
        return None
    width_units, height_units = abs(transform.a), abs(transform.e)
    if width_units <= 0 or height_units <= 0:
        return None
    if crs.is_projected:
        factor = crs.linear_units_factor[1]
        return float(np.sqrt(width_units * height_units) * factor)
    if crs.is_geographic:
        latitude = transform.f + transform.e * height / 2.0
        metres_per_degree = 111_320.0
        east = width_units * metres_per_degree * np.cos(np.radians(latitude))
        north = height_units * metres_per_degree
        return float(np.sqrt(max(east, 0.0) * north)) or None
    return None
