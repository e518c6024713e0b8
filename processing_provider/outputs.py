"""QGIS-side output helpers: paletted styles for label rasters, cluster polygons as GeoPackage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from osgeo import gdal, ogr, osr
from qgis.core import QgsProcessingException, QgsRasterLayer

from engine import safe_files
from engine.cluster_stats import ClusterStatistics
from engine.raster_io import RasterGrid, atomic_output, write_label_raster


def probe_output_folder(path: str | os.PathLike) -> safe_files.FolderProbe:
    """Fail before any work is lost if ``path`` cannot be written: its folder must exist and
    take a new file (created and removed here; ``os.access`` says yes to root even under
    /proc)."""
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        raise QgsProcessingException(
            f"Cannot write '{path}': the folder '{folder}' does not exist. Choose an existing "
            "folder for the output."
        )
    if not os.access(folder, os.W_OK):
        raise QgsProcessingException(
            f"Cannot write '{path}': the folder '{folder}' is not writable. Choose another folder."
        )
    try:
        return safe_files.probe_folder(folder)
    except OSError as error:
        raise QgsProcessingException(
            f"Cannot write '{path}': creating a file in '{folder}' failed "
            f"({error.strerror or error}). Choose a folder you can write to."
        ) from None


def check_writable(path: str) -> None:
    """Fail before any work is lost if the output cannot be written."""
    probe_output_folder(path)
    if Path(path).exists() and not os.access(path, os.W_OK):
        raise QgsProcessingException(f"Cannot overwrite '{path}': the file is read-only.")


def geopackage_layers(path: str | os.PathLike) -> list[str] | None:
    """Names of the layers (and attribute tables) of a GeoPackage; None when unreadable."""
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        dataset = ogr.Open(str(path))
        if dataset is None:
            return None
        return [dataset.GetLayerByIndex(i).GetName() for i in range(dataset.GetLayerCount())]
    finally:
        gdal.PopErrorHandler()


def paletted_style(path: str, n_classes: int, class_name: str = "Cluster") -> Path:
    """Write ``<raster>.qml`` (next to the raster, so QGIS applies it when the layer is added by
    hand; Processing applies the same style through :mod:`processing_provider.styles`)."""
    from processing_provider.styles import cluster_renderer

    layer = QgsRasterLayer(path, Path(path).stem, "gdal")
    if not layer.isValid():
        raise QgsProcessingException(f"The written raster '{path}' cannot be opened by QGIS.")
    layer.setRenderer(cluster_renderer(layer, n_classes, class_name))
    style_path = Path(path).with_suffix(".qml")
    message, ok = layer.saveNamedStyle(str(style_path))
    if not ok:
        raise QgsProcessingException(f"Cannot write the style '{style_path}': {message}")
    return style_path


def write_label_raster_with_style(path: str, labels: np.ndarray, grid: RasterGrid,
                                  n_classes: int, class_name: str = "Cluster") -> None:
    write_label_raster(path, labels, grid, n_classes)
    paletted_style(path, n_classes, class_name)


def write_statistics_metadata(path: str, statistics: ClusterStatistics,
                              extra: dict[str, str] | None = None) -> None:
    """Per-cluster pixel counts and areas as GDAL metadata items of the raster (QGIS shows them
    in Layer Properties > Information; ``gdalinfo`` lists them)."""
    dataset = gdal.Open(str(path), gdal.GA_Update)
    if dataset is None:
        raise QgsProcessingException(f"Cannot open '{path}' to write its statistics: "
                                     f"{gdal.GetLastErrorMsg()}")
    items = {**(extra or {}), **statistics.metadata()}
    for key, value in items.items():
        dataset.SetMetadataItem(key, str(value))
    dataset.FlushCache()
    dataset = None


def polygonize_labels(raster_path: str, gpkg_path: str, field_name: str = "cluster") -> int:
    """One polygon per connected region of equal label (0 = nodata skipped); returns the count."""
    source = gdal.Open(raster_path)
    band = source.GetRasterBand(1)
    with atomic_output(gpkg_path) as temporary:
        temporary.unlink()  # the GeoPackage driver creates the file itself
        driver = ogr.GetDriverByName("GPKG")
        dataset = driver.CreateDataSource(str(temporary))
        if dataset is None:
            raise ValueError(f"GDAL cannot create the GeoPackage '{gpkg_path}': "
                             f"{gdal.GetLastErrorMsg()}")
        spatial_reference = None
        if source.GetProjection():
            spatial_reference = osr.SpatialReference()
            spatial_reference.ImportFromWkt(source.GetProjection())
        layer = dataset.CreateLayer(Path(gpkg_path).stem, srs=spatial_reference,
                                    geom_type=ogr.wkbPolygon)
        if layer is None or layer.CreateField(ogr.FieldDefn(field_name, ogr.OFTInteger)) != 0:
            raise ValueError(f"GDAL cannot create the polygon layer in '{gpkg_path}': "
                             f"{gdal.GetLastErrorMsg()}")
        # The band's own mask (nodata = 0) keeps nodata out of the polygons.
        if gdal.Polygonize(band, band.GetMaskBand(), layer, 0, [], callback=None) != 0:
            raise ValueError(f"GDAL could not write the cluster polygons to '{gpkg_path}': "
                             f"{gdal.GetLastErrorMsg()}")
        count = layer.GetFeatureCount()
        layer = None
        dataset = None
    source = None
    return count
