"""The labelling GeoPackage writer (processing_provider/labelling_outputs.py) on a hand-built
GraphLabellingResult, reopened with real QGIS layers.

The scene: 20x30 pixels, two chips of 20x15, three segments per chip (horizontal bands), one
segment with a detached 2x2 piece and a nodata row in chip 1, so the polygons must follow the
pixels exactly, multipart and holes of nodata included.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from pyproj import Geod
from rasterio.crs import CRS
from shapely.geometry import box

from engine.graph_result import GraphLabellingResult
from engine.monitor import Cancelled, Monitor
from engine.raster_io import RasterGrid
from processing_provider.labelling_outputs import (
    CHIPS_LAYER,
    EMBEDDINGS_TABLE,
    METADATA_TABLE,
    NEIGHBOURS_TABLE,
    SEGMENTS_LAYER,
    layer_uri,
    write_labelling_geopackage,
)

HEIGHT, WIDTH = 20, 30
CHIP_WIDTH = 15
PIXEL = 10.0
UTM_GRID = RasterGrid(HEIGHT, WIDTH, CRS.from_epsg(32633).to_wkt(),
                      Affine(PIXEL, 0.0, 500_000.0, 0.0, -PIXEL, 5_300_000.0))
# 0.001° pixels at about 50° N: a planar "area" would be 1e-6 deg², the ellipsoidal one ~8000 m².
DEGREE_PIXEL = 0.001
GEOGRAPHIC_GRID = RasterGrid(HEIGHT, WIDTH, CRS.from_epsg(4326).to_wkt(),
                             Affine(DEGREE_PIXEL, 0.0, 10.0, 0.0, -DEGREE_PIXEL, 50.0))
EMBEDDING_DIMS = 4
C = 3


def _segment_map() -> np.ndarray:
    ids = np.full((HEIGHT, WIDTH), -1, dtype=np.int32)
    for chip in range(2):
        cols = slice(chip * CHIP_WIDTH, (chip + 1) * CHIP_WIDTH)
        ids[0:7, cols] = 3 * chip
        ids[7:14, cols] = 3 * chip + 1
        ids[14:20, cols] = 3 * chip + 2
    ids[0:2, 13:15] = 1  # a detached piece of segment 1, in chip 0
    ids[19, CHIP_WIDTH:] = -1  # a nodata row in chip 1
    return ids


def make_result() -> GraphLabellingResult:
    ids = _segment_map()
    n_segments = 6
    counts = np.bincount(ids[ids >= 0], minlength=n_segments).astype(np.int64)
    rows, cols = np.nonzero(ids >= 0)
    centroids = np.stack([
        np.bincount(ids[rows, cols], weights=rows, minlength=n_segments) / counts,
        np.bincount(ids[rows, cols], weights=cols, minlength=n_segments) / counts,
    ], axis=1)
    rng = np.random.default_rng(0)
    membership = rng.dirichlet(np.ones(C), size=n_segments).astype(np.float32)
    return GraphLabellingResult(
        segment_ids=ids,
        segment_chip=np.array([0, 0, 0, 1, 1, 1], dtype=np.int32),
        segment_pixel_count=counts,
        segment_centroid_rc=centroids,
        segment_features=rng.normal(size=(n_segments, 8)).astype(np.float32),
        segment_membership=membership,
        segment_fcm_cluster=(membership.argmax(axis=1) + 1).astype(np.int32),
        segment_embedding=rng.normal(size=(n_segments, EMBEDDING_DIMS)).astype(np.float32),
        segment_umap=rng.normal(size=(n_segments, 2)).astype(np.float32),
        edges=np.array([[0, 1, 3, 4], [1, 0, 4, 3]], dtype=np.int64),
        chip_windows=np.array([[0, 0, HEIGHT, CHIP_WIDTH], [0, CHIP_WIDTH, HEIGHT, CHIP_WIDTH]],
                              dtype=np.int64),
        chip_umap=np.array([[0.5, -1.0], [np.nan, np.nan]], dtype=np.float32),
        chip_neighbours=np.array([[1, -1], [0, -1]], dtype=np.int64),
        chip_neighbour_similarity=np.array([[0.75, np.nan], [0.75, np.nan]], dtype=np.float32),
        fcm_centres=rng.normal(size=(C, 5)).astype(np.float32),
    )


METADATA = {"source": "/data/scene.tif", "parameters": '{"n_fcm_clusters": 3}'}


def _layer(path: Path, name: str):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(layer_uri(path, name), name, "ogr")
    assert layer.isValid(), f"layer {name} of {path} does not open"
    return layer


def _features(layer) -> list:
    return sorted(layer.getFeatures(), key=lambda f: (f.attribute(0), f.attribute(1)))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def written(qgis_app, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpkg") / "embedding.gpkg"
    returned = write_labelling_geopackage(path, make_result(), UTM_GRID, METADATA)
    assert returned == path
    return path


def test_segments_layer_geometry_follows_the_pixels(written: Path) -> None:
    from qgis.core import QgsCoordinateReferenceSystem, QgsWkbTypes

    result = make_result()
    layer = _layer(written, SEGMENTS_LAYER)
    assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:32633")
    assert layer.featureCount() == result.n_segments
    assert QgsWkbTypes.flatType(layer.wkbType()) == QgsWkbTypes.MultiPolygon
    pixel_area = PIXEL * PIXEL
    features = _features(layer)
    assert [f["segment_id"] for f in features] == list(range(6))
    total = 0.0
    for feature in features:
        segment = feature["segment_id"]
        geometry = feature.geometry()
        assert geometry.isGeosValid(), f"segment {segment} polygon is invalid"
        expected = result.segment_pixel_count[segment] * pixel_area
        assert geometry.area() == pytest.approx(expected)
        assert feature["area"] == pytest.approx(expected)
        assert feature["n_pixels"] == result.segment_pixel_count[segment]
        total += geometry.area()
        # Every pixel centre of the segment lies in its polygon.
        rows, cols = np.nonzero(result.segment_ids == segment)
        xs, ys = UTM_GRID.transform * (cols + 0.5, rows + 0.5)
        from qgis.core import QgsPointXY

        assert all(geometry.contains(QgsPointXY(x, y)) for x, y in zip(xs, ys))
    assert total == pytest.approx((result.segment_ids >= 0).sum() * pixel_area)
    by_id = {f["segment_id"]: f for f in features}
    assert len(by_id[1].geometry().asMultiPolygon()) == 2  # main band + detached 2x2 piece
    assert len(by_id[0].geometry().asMultiPolygon()) == 1


def test_segments_layer_fields(written: Path) -> None:
    from qgis.core import NULL
    from qgis.PyQt.QtCore import QVariant

    result = make_result()
    layer = _layer(written, SEGMENTS_LAYER)
    types = {field.name(): field.type() for field in layer.fields()}
    expected = {"segment_id": QVariant.Int, "chip_id": QVariant.Int, "n_pixels": QVariant.Int,
                "umap_x": QVariant.Double, "umap_y": QVariant.Double,
                "fcm_cluster": QVariant.Int, "label": QVariant.String, "area": QVariant.Double}
    assert {name: types.get(name) for name in expected} == expected
    for feature in _features(layer):
        segment = feature["segment_id"]
        assert feature["chip_id"] == result.segment_chip[segment]
        assert feature["fcm_cluster"] == result.segment_fcm_cluster[segment]
        assert feature["umap_x"] == pytest.approx(float(result.segment_umap[segment, 0]))
        assert feature["umap_y"] == pytest.approx(float(result.segment_umap[segment, 1]))
        assert feature["label"] == NULL  # empty, for the user to fill in


def test_chips_layer(written: Path) -> None:
    from qgis.core import NULL, QgsCoordinateReferenceSystem, QgsRectangle

    layer = _layer(written, CHIPS_LAYER)
    assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:32633")
    features = _features(layer)
    assert [f["chip_id"] for f in features] == [0, 1]
    assert [f["n_segments"] for f in features] == [3, 3]
    left, top = 500_000.0, 5_300_000.0
    chip_w, chip_h = CHIP_WIDTH * PIXEL, HEIGHT * PIXEL
    assert features[0].geometry().boundingBox() == QgsRectangle(left, top - chip_h,
                                                                 left + chip_w, top)
    assert features[1].geometry().boundingBox() == QgsRectangle(left + chip_w, top - chip_h,
                                                                 left + 2 * chip_w, top)
    assert features[0]["umap_x"] == pytest.approx(0.5)
    assert features[0]["umap_y"] == pytest.approx(-1.0)
    # A NaN UMAP row (chip without an embedding) is written as NULL, not as NaN.
    assert features[1]["umap_x"] == NULL and features[1]["umap_y"] == NULL


def test_attribute_tables(written: Path) -> None:
    from qgis.core import QgsWkbTypes

    result = make_result()
    embeddings = _layer(written, EMBEDDINGS_TABLE)
    assert embeddings.wkbType() == QgsWkbTypes.NoGeometry
    assert [f.name() for f in embeddings.fields() if f.name() != "fid"] == \
        ["segment_id"] + [f"e{d}" for d in range(EMBEDDING_DIMS)]
    rows = _features(embeddings)
    assert len(rows) == result.n_segments
    values = np.array([[f[f"e{d}"] for d in range(EMBEDDING_DIMS)] for f in rows])
    np.testing.assert_allclose(values, result.segment_embedding, rtol=1e-6)

    neighbours = _layer(written, NEIGHBOURS_TABLE)
    pairs = [(f["chip_id"], f["neighbour_id"], f["similarity"]) for f in _features(neighbours)]
    assert [(a, b) for a, b, _ in pairs] == [(0, 1), (1, 0)]  # the -1 padding is skipped
    assert [s for _, _, s in pairs] == pytest.approx([0.75, 0.75])

    metadata = {f["key"]: f["value"] for f in _layer(written, METADATA_TABLE).getFeatures()}
    assert metadata["source"] == METADATA["source"]
    assert metadata["parameters"] == METADATA["parameters"]
    assert metadata["area_unit"].startswith("square metre")


def test_geographic_crs_area_is_ellipsoidal(qgis_app, tmp_path: Path) -> None:
    from qgis.core import QgsCoordinateReferenceSystem

    path = tmp_path / "wgs84.gpkg"
    result = make_result()
    write_labelling_geopackage(path, result, GEOGRAPHIC_GRID, METADATA)
    layer = _layer(path, SEGMENTS_LAYER)
    assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:4326")
    geod = Geod(ellps="WGS84")
    for feature in _features(layer):
        segment = feature["segment_id"]
        rows, cols = np.nonzero(result.segment_ids == segment)
        expected = 0.0
        for row, col in zip(rows, cols):  # each pixel on the ellipsoid, independently of QGIS
            x0, y0 = GEOGRAPHIC_GRID.transform * (col, row + 1)
            x1, y1 = GEOGRAPHIC_GRID.transform * (col + 1, row)
            expected += abs(geod.geometry_area_perimeter(box(x0, y0, x1, y1))[0])
        assert 5_000 * len(rows) < expected < 10_000 * len(rows)  # about 71.6 m x 111.2 m
        assert feature["area"] == pytest.approx(expected, rel=1e-4)
        # The geometry itself stays in degrees, in the raster's CRS.
        assert feature.geometry().area() == pytest.approx(len(rows) * DEGREE_PIXEL**2)
    metadata = {f["key"]: f["value"] for f in _layer(path, METADATA_TABLE).getFeatures()}
    assert "ellipsoid" in metadata["area_unit"]


def test_missing_folder_is_a_clear_error(qgis_app, tmp_path: Path) -> None:
    path = tmp_path / "no_such_folder" / "embedding.gpkg"
    with pytest.raises(ValueError, match="does not exist"):
        write_labelling_geopackage(path, make_result(), UTM_GRID, METADATA)
    assert _leftovers(tmp_path) == []


def test_read_only_folder_is_a_clear_error(qgis_app, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: a read-only folder is still writable, nothing to test")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ValueError, match="not writable"):
            write_labelling_geopackage(folder / "x.gpkg", make_result(), UTM_GRID, METADATA)
        assert _leftovers(folder) == []
    finally:
        folder.chmod(stat.S_IRWXU)


def test_not_a_gpkg_name_is_a_clear_error(qgis_app, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.gpkg"):
        write_labelling_geopackage(tmp_path / "x.shp", make_result(), UTM_GRID, METADATA)
    assert _leftovers(tmp_path) == []


def test_mismatched_grid_is_a_clear_error(qgis_app, tmp_path: Path) -> None:
    grid = RasterGrid(HEIGHT + 1, WIDTH, UTM_GRID.crs_wkt, UTM_GRID.transform)
    with pytest.raises(ValueError, match="20x30"):
        write_labelling_geopackage(tmp_path / "x.gpkg", make_result(), grid, METADATA)
    assert _leftovers(tmp_path) == []


def test_cancel_while_writing_leaves_nothing(qgis_app, tmp_path: Path) -> None:
    """A cancel after the polygons, while layers are written, removes the temporary file; an
    existing file of the same name is left as it was."""
    path = tmp_path / "embedding.gpkg"
    path.write_bytes(b"previous run")
    progress: list[float] = []

    def cancelled() -> bool:
        return bool(progress) and progress[-1] >= 0.5

    monitor = Monitor(on_progress=progress.append, is_cancelled=cancelled)
    with pytest.raises(Cancelled):
        write_labelling_geopackage(path, make_result(), UTM_GRID, METADATA, monitor)
    assert progress and max(progress) >= 0.5
    assert _leftovers(tmp_path) == ["embedding.gpkg"]
    assert path.read_bytes() == b"previous run"


def test_rewrite_replaces_the_file(written: Path, tmp_path: Path) -> None:
    path = tmp_path / "again.gpkg"
    path.write_bytes(b"not a geopackage")
    write_labelling_geopackage(path, make_result(), UTM_GRID, METADATA)
    assert _layer(path, SEGMENTS_LAYER).featureCount() == 6
    assert _leftovers(tmp_path) == ["again.gpkg"]


def test_segment_outside_every_chip_is_still_written(qgis_app, tmp_path: Path) -> None:
    """A result whose chips do not cover all segment pixels (not the agreed layout) falls back
    to polygonizing the whole raster: no pixel is lost."""
    result = make_result()
    result.chip_windows = np.array([[0, 0, HEIGHT, CHIP_WIDTH], [0, CHIP_WIDTH, 10, CHIP_WIDTH]],
                                   dtype=np.int64)
    path = tmp_path / "fallback.gpkg"
    write_labelling_geopackage(path, result, UTM_GRID, METADATA)
    features = _features(_layer(path, SEGMENTS_LAYER))
    for feature in features:
        expected = result.segment_pixel_count[feature["segment_id"]] * PIXEL * PIXEL
        assert feature.geometry().area() == pytest.approx(expected)
