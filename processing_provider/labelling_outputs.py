"""The GeoPackage of the graph-labelling embedding (see brief GRAPH_INTERFACE.md).

One file, five layers:

* ``segments``: one MultiPolygon per segment (the pixels of ``segment_ids``, polygonized and
  grouped per id) with ``segment_id``, ``chip_id``, ``n_pixels``, ``umap_x``, ``umap_y``,
  ``fcm_cluster`` (1..C), ``label`` (empty text, for the user) and ``area``;
* ``chips``: one Polygon per chip window with ``chip_id``, ``umap_x``, ``umap_y``, ``n_segments``;
* ``segment_embeddings``: ``segment_id``, ``e0``..``e{E-1}`` (no geometry);
* ``chip_neighbours``: ``chip_id``, ``neighbour_id``, ``similarity`` (no geometry);
* ``hsi_cluster_metadata``: ``key``, ``value`` text pairs (no geometry).

Everything is in the raster's CRS. ``area`` is in square metres on the ellipsoid for a
geographic CRS (a planar area in degrees² would be useless for comparing segments), else in CRS
units². The file is written to a temporary name next to the target and renamed at the end, so a
failure or a cancel leaves no half-written GeoPackage behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from affine import Affine
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsDistanceArea,
    QgsGeometry,
)

from engine.graph_result import GraphLabellingResult
from engine.monitor import Monitor, silent
from engine.raster_io import RasterGrid, atomic_output

SEGMENTS_LAYER = "segments"
CHIPS_LAYER = "chips"
EMBEDDINGS_TABLE = "segment_embeddings"
NEIGHBOURS_TABLE = "chip_neighbours"
METADATA_TABLE = "hsi_cluster_metadata"

# Rows per transaction: one transaction per table would hold a whole tile's segments in the
# journal; one per row is orders of magnitude slower in SQLite.
ROWS_PER_TRANSACTION = 20_000


def layer_uri(path: str | os.PathLike, layer_name: str) -> str:
    """The OGR URI QGIS opens one layer of a GeoPackage by."""
    return f"{path}|layername={layer_name}"


def wrote_labelling_geopackage(path: str | os.PathLike, algorithm: str) -> bool:
    """Whether ``path`` is a GeoPackage whose metadata table names ``algorithm`` as its writer
    (or an empty file): only such a file may be replaced by a new labelling embedding."""
    if Path(path).stat().st_size == 0:
        return True
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        dataset = ogr.Open(str(path))
        table = dataset.GetLayerByName(METADATA_TABLE) if dataset is not None else None
        if table is None:
            return False
        for feature in table:
            if feature.GetField("key") == "algorithm" and feature.GetField("value") == algorithm:
                return True
        return False
    finally:
        gdal.PopErrorHandler()


def area_unit(grid: RasterGrid) -> str:
    """What the ``area`` field measures for rasters on this grid."""
    if not grid.crs_wkt:
        return "square units of the raster's transform (no CRS)"
    reference = _spatial_reference(grid.crs_wkt)
    if reference.IsGeographic():
        return "square metres on the CRS's ellipsoid"
    return f"square {reference.GetLinearUnitsName() or 'CRS unit'} (planar, in the raster's CRS)"


def write_labelling_geopackage(
    path: str | os.PathLike,
    result: GraphLabellingResult,
    grid: RasterGrid,
    metadata: Mapping[str, str],
    monitor: Monitor | None = None,
) -> Path:
    """Write ``result`` as the labelling GeoPackage at ``path`` (replaced if it exists).

    ``metadata`` goes to the ``hsi_cluster_metadata`` table as text (the ``area_unit`` key is
    added). Raises ``ValueError`` when the result does not fit the grid or the folder cannot be
    written; ``Cancelled`` when the monitor is cancelled (nothing is left behind either way).
    """
    monitor = monitor or silent()
    _check_result(result, grid)
    target = Path(path)
    if target.suffix.lower() != ".gpkg":
        raise ValueError(
            f"'{target}' is not a GeoPackage name: the labelling embedding is written as one "
            "GeoPackage with several layers. Give the output a .gpkg extension."
        )
    spatial_reference = _spatial_reference(grid.crs_wkt) if grid.crs_wkt else None
    with atomic_output(target) as temporary:
        temporary.unlink()  # the GeoPackage driver creates the file itself
        driver = ogr.GetDriverByName("GPKG")
        dataset = driver.CreateDataSource(str(temporary))
        if dataset is None:
            raise ValueError(f"GDAL cannot create the GeoPackage '{temporary}': "
                             f"{gdal.GetLastErrorMsg()}")
        try:
            polygons = _segment_polygons(result.segment_ids, result.chip_windows, grid,
                                         result.n_segments, monitor.stage(0.0, 0.5))
            _write_segments(dataset, spatial_reference, result, polygons, grid,
                            monitor.stage(0.5, 0.8))
            _write_chips(dataset, spatial_reference, result, grid)
            monitor.progress(0.85)
            _write_embeddings(dataset, result, monitor.stage(0.85, 0.97))
            _write_chip_neighbours(dataset, result)
            _write_metadata(dataset, {**metadata, "area_unit": area_unit(grid)})
            monitor.progress(1.0)
        finally:
            dataset = None  # close before the rename (or before the temporary file is removed)
    return target


# ------------------------------------------------------------------------------------ checks


def _check_result(result: GraphLabellingResult, grid: RasterGrid) -> None:
    shape = (grid.height, grid.width)
    if result.segment_ids.shape != shape:
        raise ValueError(
            f"The segment map is {result.segment_ids.shape[0]}x{result.segment_ids.shape[1]} "
            f"pixels but the raster is {grid.height}x{grid.width}."
        )
    n = result.n_segments
    for name in ("segment_pixel_count", "segment_fcm_cluster", "segment_umap",
                 "segment_embedding"):
        if getattr(result, name).shape[0] != n:
            raise ValueError(f"{name} has {getattr(result, name).shape[0]} rows for {n} segments.")
    if result.segment_ids.max(initial=-1) >= n:
        raise ValueError(f"The segment map holds ids >= {n}, the number of segments.")


def _spatial_reference(wkt: str) -> osr.SpatialReference:
    reference = osr.SpatialReference()
    reference.ImportFromWkt(wkt)
    # Keep x = easting/longitude: GDAL 3 would otherwise use lat/lon order for EPSG:4326.
    reference.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return reference


# ------------------------------------------------------------------------------------ geometry


def _polygonize_windows(segment_ids: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The windows to polygonize one by one: the chips, whose segments never cross a chip
    boundary, so memory stays at one chip; the whole raster if some segment pixel lies outside
    every chip (then the result does not follow the agreed layout, but is still written right).
    """
    covered = np.zeros(segment_ids.shape, dtype=bool)
    for row, col, height, width in windows.tolist():
        covered[row:row + height, col:col + width] = True
    if len(windows) and not ((segment_ids >= 0) & ~covered).any():
        return np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    return np.array([[0, 0, *segment_ids.shape]], dtype=np.int64)


def _segment_polygons(segment_ids: np.ndarray, windows: np.ndarray, grid: RasterGrid,
                      n_segments: int, monitor: Monitor) -> list[ogr.Geometry]:
    """One MultiPolygon per segment id (empty MultiPolygon for an id without pixels).

    gdal.Polygonize traces each 4-connected region of equal id exactly along pixel edges; a
    segment in several pieces (pixels touching only diagonally, or split by nodata) gets one
    part per piece. The pieces of one id never overlap, so collecting them as parts of a
    MultiPolygon is the dissolve, without a costly geometric union.
    """
    multipolygons = [ogr.Geometry(ogr.wkbMultiPolygon) for _ in range(n_segments)]
    windows = _polygonize_windows(segment_ids, windows)
    memory_driver = gdal.GetDriverByName("MEM")
    vector_driver = ogr.GetDriverByName("Memory")
    for index, (row, col, height, width) in enumerate(windows.tolist()):
        chip = memory_driver.Create("", width, height, 1, gdal.GDT_Int32)
        chip.SetGeoTransform((grid.transform * Affine.translation(col, row)).to_gdal())
        band = chip.GetRasterBand(1)
        band.SetNoDataValue(-1)
        band.WriteArray(np.ascontiguousarray(
            segment_ids[row:row + height, col:col + width], dtype=np.int32))
        vector = vector_driver.CreateDataSource("")
        pieces = vector.CreateLayer("pieces", geom_type=ogr.wkbPolygon)
        pieces.CreateField(ogr.FieldDefn("segment_id", ogr.OFTInteger))
        if gdal.Polygonize(band, band.GetMaskBand(), pieces, 0, [], callback=None) != 0:
            raise ValueError(f"GDAL could not polygonize the segments: {gdal.GetLastErrorMsg()}")
        pieces.ResetReading()
        for feature in pieces:
            multipolygons[feature.GetField(0)].AddGeometry(feature.GetGeometryRef())
        pieces = vector = band = chip = None
        monitor.progress((index + 1) / len(windows))
    return multipolygons


def _area_function(grid: RasterGrid):
    """Area of an OGR geometry: ellipsoidal m² for a geographic CRS, else planar."""
    if grid.crs_wkt and _spatial_reference(grid.crs_wkt).IsGeographic():
        crs = QgsCoordinateReferenceSystem.fromWkt(grid.crs_wkt)
        calculator = QgsDistanceArea()
        calculator.setSourceCrs(crs, QgsCoordinateTransformContext())
        ellipsoid = crs.ellipsoidAcronym() or "EPSG:7030"  # WGS 84 when the CRS names none
        if not calculator.setEllipsoid(ellipsoid):
            calculator.setEllipsoid("EPSG:7030")

        def ellipsoidal_area(geometry: ogr.Geometry) -> float:
            converted = QgsGeometry()
            converted.fromWkb(geometry.ExportToIsoWkb())
            return calculator.measureArea(converted)

        return ellipsoidal_area
    return lambda geometry: geometry.GetArea()


# ------------------------------------------------------------------------------------ layers


def _create_layer(dataset, name: str, spatial_reference, geometry_type, fields) -> ogr.Layer:
    options = ["FID=fid"]
    if geometry_type == ogr.wkbNone:
        options.append("ASPATIAL_VARIANT=GPKG_ATTRIBUTES")
    layer = dataset.CreateLayer(name, srs=spatial_reference, geom_type=geometry_type,
                                options=options)
    if layer is None:
        raise ValueError(f"GDAL cannot create the layer '{name}': {gdal.GetLastErrorMsg()}")
    for field_name, field_type in fields:
        if layer.CreateField(ogr.FieldDefn(field_name, field_type)) != 0:
            raise ValueError(f"GDAL cannot create the field '{name}.{field_name}'.")
    return layer


def _add(layer: ogr.Layer, feature: ogr.Feature) -> None:
    if layer.CreateFeature(feature) != 0:
        raise ValueError(
            f"GDAL could not write to the layer '{layer.GetName()}': {gdal.GetLastErrorMsg()}"
        )


def _finite_or_null(feature: ogr.Feature, field: str, value: float) -> None:
    if np.isfinite(value):
        feature.SetField(field, float(value))
    else:
        feature.SetFieldNull(field)


def _write_segments(dataset, spatial_reference, result: GraphLabellingResult,
                    polygons: list[ogr.Geometry], grid: RasterGrid, monitor: Monitor) -> None:
    layer = _create_layer(dataset, SEGMENTS_LAYER, spatial_reference, ogr.wkbMultiPolygon, [
        ("segment_id", ogr.OFTInteger), ("chip_id", ogr.OFTInteger),
        ("n_pixels", ogr.OFTInteger), ("umap_x", ogr.OFTReal), ("umap_y", ogr.OFTReal),
        ("fcm_cluster", ogr.OFTInteger), ("label", ogr.OFTString), ("area", ogr.OFTReal),
    ])
    area = _area_function(grid)
    definition = layer.GetLayerDefn()
    layer.StartTransaction()
    for segment in range(result.n_segments):
        feature = ogr.Feature(definition)
        feature.SetField("segment_id", segment)
        feature.SetField("chip_id", int(result.segment_chip[segment]))
        feature.SetField("n_pixels", int(result.segment_pixel_count[segment]))
        _finite_or_null(feature, "umap_x", result.segment_umap[segment, 0])
        _finite_or_null(feature, "umap_y", result.segment_umap[segment, 1])
        feature.SetField("fcm_cluster", int(result.segment_fcm_cluster[segment]))
        feature.SetFieldNull("label")
        geometry = polygons[segment]
        feature.SetField("area", float(area(geometry)) if not geometry.IsEmpty() else 0.0)
        feature.SetGeometry(geometry)
        _add(layer, feature)
        _commit_in_batches(layer, segment + 1, result.n_segments, monitor)
    layer.CommitTransaction()


def _commit_in_batches(layer, rows_written: int, total: int, monitor: Monitor) -> None:
    """Commit every ROWS_PER_TRANSACTION rows (one huge transaction is slow and memory hungry),
    reporting progress and honouring a cancel between batches."""
    if rows_written % ROWS_PER_TRANSACTION == 0:
        layer.CommitTransaction()
        monitor.progress(rows_written / total)
        layer.StartTransaction()


def _write_chips(dataset, spatial_reference, result: GraphLabellingResult,
                 grid: RasterGrid) -> None:
    layer = _create_layer(dataset, CHIPS_LAYER, spatial_reference, ogr.wkbPolygon, [
        ("chip_id", ogr.OFTInteger), ("umap_x", ogr.OFTReal), ("umap_y", ogr.OFTReal),
        ("n_segments", ogr.OFTInteger),
    ])
    n_segments = np.bincount(result.segment_chip.astype(np.int64), minlength=result.n_chips)
    definition = layer.GetLayerDefn()
    layer.StartTransaction()
    for chip, (row, col, height, width) in enumerate(result.chip_windows.tolist()):
        ring = ogr.Geometry(ogr.wkbLinearRing)
        for r, c in ((row, col), (row, col + width), (row + height, col + width),
                     (row + height, col), (row, col)):
            x, y = grid.transform * (c, r)
            ring.AddPoint_2D(x, y)
        polygon = ogr.Geometry(ogr.wkbPolygon)
        polygon.AddGeometry(ring)
        feature = ogr.Feature(definition)
        feature.SetField("chip_id", chip)
        _finite_or_null(feature, "umap_x", result.chip_umap[chip, 0])
        _finite_or_null(feature, "umap_y", result.chip_umap[chip, 1])
        feature.SetField("n_segments", int(n_segments[chip]))
        feature.SetGeometry(polygon)
        _add(layer, feature)
    layer.CommitTransaction()


def _write_embeddings(dataset, result: GraphLabellingResult, monitor: Monitor) -> None:
    embedding = np.asarray(result.segment_embedding, dtype=np.float64)
    n_dims = embedding.shape[1]
    layer = _create_layer(dataset, EMBEDDINGS_TABLE, None, ogr.wkbNone,
                          [("segment_id", ogr.OFTInteger)]
                          + [(f"e{d}", ogr.OFTReal) for d in range(n_dims)])
    definition = layer.GetLayerDefn()
    layer.StartTransaction()
    rows = embedding.tolist()  # python floats: SetField's fastest path
    for segment in range(result.n_segments):
        feature = ogr.Feature(definition)
        feature.SetField(0, segment)
        for index, value in enumerate(rows[segment], start=1):
            feature.SetField(index, value)
        _add(layer, feature)
        _commit_in_batches(layer, segment + 1, result.n_segments, monitor)
    layer.CommitTransaction()


def _write_chip_neighbours(dataset, result: GraphLabellingResult) -> None:
    layer = _create_layer(dataset, NEIGHBOURS_TABLE, None, ogr.wkbNone, [
        ("chip_id", ogr.OFTInteger), ("neighbour_id", ogr.OFTInteger),
        ("similarity", ogr.OFTReal),
    ])
    definition = layer.GetLayerDefn()
    layer.StartTransaction()
    neighbours = np.asarray(result.chip_neighbours).reshape(result.n_chips, -1)
    similarity = np.asarray(result.chip_neighbour_similarity).reshape(result.n_chips, -1)
    for chip in range(result.n_chips):
        for neighbour, value in zip(neighbours[chip].tolist(), similarity[chip].tolist()):
            if neighbour < 0:
                continue  # padding of chips with fewer neighbours
            feature = ogr.Feature(definition)
            feature.SetField("chip_id", chip)
            feature.SetField("neighbour_id", int(neighbour))
            _finite_or_null(feature, "similarity", value)
            _add(layer, feature)
    layer.CommitTransaction()


def _write_metadata(dataset, metadata: Mapping[str, str]) -> None:
    layer = _create_layer(dataset, METADATA_TABLE, None, ogr.wkbNone,
                          [("key", ogr.OFTString), ("value", ogr.OFTString)])
    definition = layer.GetLayerDefn()
    layer.StartTransaction()
    for key, value in metadata.items():
        feature = ogr.Feature(definition)
        feature.SetField("key", str(key))
        feature.SetField("value", str(value))
        _add(layer, feature)
    layer.CommitTransaction()
