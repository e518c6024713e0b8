"""Tests of engine.raster_io (reading cubes, writing label/float rasters, atomic outputs).

Engine only: no QGIS. Every raster is a few pixels written here with rasterio.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

from engine.monitor import Monitor
from engine.raster_io import (
    FLOAT_NODATA,
    RasterGrid,
    atomic_output,
    read_labels,
    read_raster,
    write_float_raster,
    write_label_raster,
)

EPSG = 32633
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_300_000.0)
NODATA = -9999.0
HEIGHT, WIDTH = 6, 8
UTM = CRS.from_epsg(EPSG)
UTM_WKT = UTM.to_wkt()


def _cube(n_bands: int = 4, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """(bands, H, W) float32 with distinct, finite values."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 0.9, size=(n_bands, height, width)).astype(np.float32)


def _write(
    path: Path,
    data: np.ndarray,
    *,
    crs: CRS | None = UTM,
    transform: Affine = TRANSFORM,
    nodata: float | None = NODATA,
    scales: list[float] | None = None,
    offsets: list[float] | None = None,
    descriptions: list[str] | None = None,
) -> Path:
    count, height, width = data.shape
    profile = {
        "driver": "GTiff", "height": height, "width": width, "count": count,
        "dtype": str(data.dtype), "nodata": nodata, "transform": transform,
    }
    if crs is not None:
        profile["crs"] = crs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dataset:
            dataset.write(data)
            if scales is not None:
                dataset.scales = scales
            if offsets is not None:
                dataset.offsets = offsets
            for band, text in enumerate(descriptions or [], start=1):
                dataset.set_band_description(band, text)
    return path


def _grid(crs: str | None = UTM_WKT) -> RasterGrid:
    return RasterGrid(HEIGHT, WIDTH, crs, TRANSFORM)


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files atomic_output may have left: .<stem>-* (and their sidecars)."""
    return sorted(folder.glob(".*"))


# ------------------------------------------------------------------------------------ reading


def test_read_keeps_crs_transform_and_band_names(tmp_path: Path) -> None:
    data = _cube(4)
    names = ["blue (450 nm)", "green (550 nm)", "red (650 nm)", "nir (850 nm)"]
    path = _write(tmp_path / "cube.tif", data, descriptions=names)
    monitor = Monitor()

    raster = read_raster(path, monitor=monitor)

    assert raster.cube.shape == (HEIGHT, WIDTH, 4)
    assert raster.cube.dtype == np.float32
    assert raster.valid.all()
    assert raster.band_numbers == [1, 2, 3, 4]
    assert raster.band_names == names
    assert CRS.from_wkt(raster.crs_wkt).to_epsg() == EPSG
    assert raster.transform == TRANSFORM
    assert raster.grid == RasterGrid(HEIGHT, WIDTH, raster.crs_wkt, TRANSFORM)
    np.testing.assert_array_equal(raster.cube, np.moveaxis(data, 0, -1))
    assert monitor.warnings == []


def test_read_band_selection_and_default_names(tmp_path: Path) -> None:
    data = _cube(5)
    path = _write(tmp_path / "cube.tif", data)
    raster = read_raster(path, bands=[5, 2, 3])
    assert raster.band_numbers == [5, 2, 3]
    assert raster.band_names == ["Band 5", "Band 2", "Band 3"]
    np.testing.assert_array_equal(raster.cube, np.moveaxis(data[[4, 1, 2]], 0, -1))


def test_read_applies_scale_and_offset(tmp_path: Path) -> None:
    digital = np.arange(3 * HEIGHT * WIDTH, dtype=np.int16).reshape(3, HEIGHT, WIDTH) + 100
    scales, offsets = [0.0001, 0.5, 2.0], [0.0, -10.0, 3.0]
    path = _write(tmp_path / "scaled.tif", digital, nodata=-1, scales=scales, offsets=offsets)
    with rasterio.open(path) as dataset:  # the test raster really carries them
        assert dataset.scales == tuple(scales)
        assert dataset.offsets == tuple(offsets)

    raster = read_raster(path)

    for band in range(3):
        expected = digital[band].astype(np.float32) * np.float32(scales[band]) + np.float32(
            offsets[band]
        )
        np.testing.assert_allclose(raster.cube[..., band], expected, rtol=1e-6)


def test_all_nodata_band_dropped_with_warning_pixels_kept(tmp_path: Path) -> None:
    data = _cube(5)
    data[2] = NODATA  # a water-vapour band: nodata everywhere
    path = _write(tmp_path / "cube.tif", data)
    monitor = Monitor()

    raster = read_raster(path, monitor=monitor)

    assert raster.dropped_bands == [3]
    assert raster.band_numbers == [1, 2, 4, 5]
    assert raster.cube.shape == (HEIGHT, WIDTH, 4)
    assert raster.valid.all(), "dropping the band must keep every pixel valid"
    np.testing.assert_array_equal(raster.cube, np.moveaxis(data[[0, 1, 3, 4]], 0, -1))
    assert any("[3]" in text and "no valid value" in text for text in monitor.warnings), (
        monitor.warnings
    )


def test_nodata_and_nan_pixels_masked(tmp_path: Path) -> None:
    data = _cube(4)
    data[1, 0, 0] = NODATA  # nodata in one band only: the pixel is invalid
    data[:, 5, 7] = NODATA  # nodata in every band
    data[3, 2, 3] = np.nan
    data[0, 4, 1] = np.inf
    path = _write(tmp_path / "cube.tif", data)
    monitor = Monitor()

    raster = read_raster(path, monitor=monitor)

    expected_invalid = {(0, 0), (5, 7), (2, 3), (4, 1)}
    invalid = {tuple(int(i) for i in p) for p in np.argwhere(~raster.valid)}
    assert invalid == expected_invalid
    assert raster.n_valid == HEIGHT * WIDTH - 4
    assert np.all(raster.cube[~raster.valid] == 0.0)
    assert np.isfinite(raster.cube).all()
    assert raster.valid_pixels().shape == (HEIGHT * WIDTH - 4, 4)
    assert any("NaN" in text for text in monitor.warnings), monitor.warnings
    # The nodata-only pixels are not reported as NaN: 2 non-finite pixels.
    assert any(text.startswith("2 pixel(s)") for text in monitor.warnings), monitor.warnings


def test_no_crs_reads_with_warning(tmp_path: Path) -> None:
    path = _write(tmp_path / "nocrs.tif", _cube(3), crs=None)
    monitor = Monitor()
    raster = read_raster(path, monitor=monitor)
    assert raster.crs_wkt is None
    assert raster.transform == TRANSFORM
    assert raster.valid.all()
    assert any("no CRS" in text for text in monitor.warnings), monitor.warnings


# ------------------------------------------------------------------------------------ bad input


def test_not_a_raster_raises(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a raster\n")
    with pytest.raises(ValueError, match="not a raster"):
        read_raster(text_file)
    renamed = tmp_path / "fake.tif"
    renamed.write_text("still not a raster\n")
    with pytest.raises(ValueError, match="not a raster"):
        read_raster(renamed)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a raster"):
        read_raster(tmp_path / "missing.tif")


@pytest.mark.parametrize("n_bands", [1, 2])
def test_too_few_bands_raise(tmp_path: Path, n_bands: int) -> None:
    path = _write(tmp_path / "few.tif", _cube(n_bands))
    with pytest.raises(ValueError, match="at least 3"):
        read_raster(path)


def test_too_few_bands_after_dropping_raise(tmp_path: Path) -> None:
    data = _cube(4)
    data[1:3] = NODATA
    with pytest.raises(ValueError, match="at least 3"):
        read_raster(_write(tmp_path / "cube.tif", data))


def test_all_nodata_raster_raises(tmp_path: Path) -> None:
    data = np.full((4, HEIGHT, WIDTH), NODATA, dtype=np.float32)
    with pytest.raises(ValueError, match="valid"):
        read_raster(_write(tmp_path / "empty.tif", data))


def test_no_valid_pixel_raises(tmp_path: Path) -> None:
    """Every band has valid values, but never at the same pixel."""
    data = _cube(3)
    data[0, :3] = NODATA
    data[1, 3:] = NODATA
    with pytest.raises(ValueError, match="no valid pixel"):
        read_raster(_write(tmp_path / "disjoint.tif", data))


@pytest.mark.parametrize("bands", [[0, 1, 2], [1, 2, 5], [-1, 1, 2, 3]])
def test_band_numbers_out_of_range_raise(tmp_path: Path, bands: list[int]) -> None:
    path = _write(tmp_path / "cube.tif", _cube(4))
    with pytest.raises(ValueError, match="do not exist"):
        read_raster(path, bands=bands)


# ------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize(("n_classes", "dtype"), [(3, "uint8"), (255, "uint8"), (256, "uint16"),
                                                  (1000, "uint16")])
def test_write_label_raster_dtype_nodata_and_grid(tmp_path: Path, n_classes: int,
                                                  dtype: str) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(1, n_classes + 1, size=(HEIGHT, WIDTH))
    labels[0, :] = 0
    labels[1, 1] = n_classes  # the largest label survives the cast
    path = tmp_path / "labels.tif"

    returned = write_label_raster(path, labels, _grid(), n_classes)

    assert returned == path
    with rasterio.open(path) as dataset:
        assert dataset.dtypes == (dtype,)
        assert dataset.nodata == 0
        assert dataset.crs.to_epsg() == EPSG
        assert dataset.transform == TRANSFORM
        assert (dataset.height, dataset.width) == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(dataset.read(1), labels)
    read_back, grid = read_labels(path)
    np.testing.assert_array_equal(read_back, labels)
    assert grid.transform == TRANSFORM
    assert _leftovers(tmp_path) == []


def test_write_label_raster_without_crs(tmp_path: Path) -> None:
    labels = np.ones((HEIGHT, WIDTH), dtype=np.int32)
    path = write_label_raster(tmp_path / "labels.tif", labels, _grid(crs=None), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as dataset:
            assert dataset.crs is None
            assert dataset.transform == TRANSFORM


def test_write_label_raster_shape_mismatch_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not match"):
        write_label_raster(tmp_path / "labels.tif", np.ones((2, 2), dtype=int), _grid(), 2)
    assert list(tmp_path.iterdir()) == []


def test_write_float_raster_nodata_outside_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    bands = rng.random((HEIGHT, WIDTH, 3)).astype(np.float32)
    valid = np.ones((HEIGHT, WIDTH), dtype=bool)
    valid[2, :4] = False
    path = write_float_raster(tmp_path / "soft.tif", bands, valid, _grid(), ["a", "b", "c"])
    with rasterio.open(path) as dataset:
        assert dataset.count == 3
        assert dataset.dtypes == ("float32",) * 3
        assert dataset.nodata == FLOAT_NODATA
        assert dataset.descriptions == ("a", "b", "c")
        assert dataset.crs.to_epsg() == EPSG
        assert dataset.transform == TRANSFORM
        stack = np.moveaxis(dataset.read(), 0, -1)
    np.testing.assert_array_equal(stack[valid], bands[valid])
    assert np.all(stack[~valid] == FLOAT_NODATA)


def test_atomic_output_leaves_nothing_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as temporary:
            assert temporary.parent == tmp_path
            assert temporary.name.startswith(".out-")
            temporary.write_bytes(b"partial")
            Path(f"{temporary}.aux.xml").write_text("<PAMDataset/>")  # a GDAL sidecar
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_the_old_file_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous result"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_output_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    with atomic_output(target) as temporary:
        temporary.write_bytes(b"done")
        assert not target.exists()
    assert target.read_bytes() == b"done"
    assert list(tmp_path.iterdir()) == [target]


def test_writing_into_missing_folder_raises(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    labels = np.ones((HEIGHT, WIDTH), dtype=np.int32)
    with pytest.raises(ValueError, match="does not exist"):
        write_label_raster(missing / "labels.tif", labels, _grid(), 2)
    with pytest.raises(ValueError, match="does not exist"):
        write_float_raster(missing / "soft.tif", np.ones((HEIGHT, WIDTH, 2), np.float32),
                           labels.astype(bool), _grid())
    with pytest.raises(ValueError, match="does not exist"):
        with atomic_output(missing / "x.tif"):
            pass
    assert not missing.exists()
    assert list(tmp_path.iterdir()) == []
