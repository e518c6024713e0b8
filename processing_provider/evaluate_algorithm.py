"""Processing algorithm: evaluate a cluster raster against reference labels."""

from __future__ import annotations

from typing import Any

import numpy as np
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterField,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorLayer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from engine.metrics import score_clustering
from engine.raster_io import RasterGrid, read_labels
from processing_provider.base import HSIAlgorithm, OutputFiles

HELP = """
<p>Scores a cluster raster (0 = nodata, clusters 1..k) against reference labels: give
<i>either</i> a label raster (0 = unlabelled) as <i>Reference label raster</i> <i>or</i> a
polygon layer as <i>Reference polygons</i> with its <i>Class field</i> (numeric codes or class
names), not both. Clusters
are matched to classes with the Hungarian algorithm before overall accuracy (OA), Cohen's kappa
and per-class accuracy are computed; NMI and ARI need no matching. Only pixels that have both a
reference label and a cluster are scored.</p>
<p>A reference on another grid is resampled (nearest neighbour) onto the cluster raster's grid;
polygons are reprojected to the raster's CRS and burnt in at pixel centres.</p>
"""


class EvaluateClusteringAlgorithm(HSIAlgorithm):
    REFERENCE_RASTER = "REFERENCE_RASTER"
    REFERENCE_POLYGONS = "REFERENCE_POLYGONS"
    # Before the reference was split in two: a raster or a polygon layer. Kept, hidden (no
    # widget is ever made for it), so scripts and qgis_process calls that pass it still run.
    REFERENCE = "REFERENCE"
    CLASS_FIELD = "CLASS_FIELD"
    OUTPUT_TABLE = "OUTPUT_TABLE"

    algorithm_id = "evaluateclustering"
    display_name = "Evaluate clustering"
    group_name = "Evaluation"
    group_id = "evaluation"
    help_text = HELP
    extra_tags = ("evaluation", "accuracy", "validation", "clustering", "kappa", "nmi", "ari",
                  "overall accuracy", "hungarian", "reference", "ground truth")

    def define_parameters(self) -> None:
        # The class field's parent is a polygon-only parameter: QGIS's field widget fetches the
        # fields of its parent's layer, and a raster there crashed QGIS (SIGSEGV in
        # QgsProcessingFieldWidgetWrapper::setParentLayerWrapperValue). So the raster and the
        # polygon reference are two parameters, exactly one of them given.
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Cluster raster"))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.REFERENCE_RASTER, "Reference label raster (or give reference polygons)",
            optional=True,
        ))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.REFERENCE_POLYGONS, "Reference polygons (or give a reference label raster)",
            types=[QgsProcessing.TypeVectorPolygon], optional=True,
        ))
        self.addParameter(QgsProcessingParameterField(
            self.CLASS_FIELD, "Class field of the reference polygons", None,
            self.REFERENCE_POLYGONS, optional=True,
        ))
        legacy = QgsProcessingParameterMapLayer(
            self.REFERENCE, "Reference labels (deprecated: use the raster or polygon reference)",
            optional=True, types=[QgsProcessing.TypeRaster, QgsProcessing.TypeVectorPolygon],
        )
        legacy.setFlags(legacy.flags() | QgsProcessingParameterDefinition.FlagHidden)
        self.addParameter(legacy)
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.OUTPUT_TABLE, "Per-class accuracy", QgsProcessing.TypeVector, optional=True,
            createByDefault=False,
        ))
        for name, description in (("OA", "Overall accuracy"), ("NMI", "NMI"),
                                  ("KAPPA", "Cohen's kappa"), ("ARI", "Adjusted Rand index"),
                                  ("N_SCORED", "Scored pixels")):
            self.addOutput(QgsProcessingOutputNumber(name, description))

    def _given(self, parameters: dict, name: str) -> bool:
        return parameters.get(name) not in (None, "")

    def reference_problem(self, parameters: dict, context) -> str | None:
        """What is wrong with the reference parameters (None when they are fine)."""
        given = [name for name in (self.REFERENCE_RASTER, self.REFERENCE_POLYGONS,
                                   self.REFERENCE) if self._given(parameters, name)]
        if not given:
            return ("No reference given: choose a reference label raster or reference polygons "
                    "(with their class field).")
        if len(given) > 1:
            return ("Give one reference, not both: a reference label raster or reference "
                    f"polygons (got {' and '.join(given)}).")
        if given == [self.REFERENCE_POLYGONS] and not self._given(parameters, self.CLASS_FIELD):
            return ("Reference polygons need a class field: choose the field that holds the "
                    "class of each polygon.")
        return None

    def checkParameterValues(self, parameters, context):  # noqa: N802 - Qt naming
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        problem = self.reference_problem(parameters, context)
        return (False, problem) if problem else (True, "")

    def _reference_layer(self, parameters: dict, context):
        problem = self.reference_problem(parameters, context)
        if problem:
            raise QgsProcessingException(problem)
        if self._given(parameters, self.REFERENCE_RASTER):
            layer = self.parameterAsRasterLayer(parameters, self.REFERENCE_RASTER, context)
        elif self._given(parameters, self.REFERENCE_POLYGONS):
            layer = self.parameterAsVectorLayer(parameters, self.REFERENCE_POLYGONS, context)
        else:
            layer = self.parameterAsLayer(parameters, self.REFERENCE, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(
                "The reference layer cannot be opened: choose a label raster or a polygon layer "
                "QGIS can read.")
        return layer

    def check_parameters(self, parameters, context) -> None:
        super().check_parameters(parameters, context)
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is not None and layer.isValid() and layer.bandCount() != 1:
            raise ValueError(
                f"The cluster raster '{layer.name()}' has {layer.bandCount()} bands; a cluster "
                "raster has one band of cluster numbers (the output of SCDSC, MS2A-Net or "
                "Apply clustering model). Choose the clustering result, not the image."
            )

    def run_algorithm(self, parameters, context, feedback, monitor,
                      written: OutputFiles) -> dict[str, Any]:
        cluster_path = self.input_raster_path(parameters, context)
        predicted, grid = read_labels(cluster_path)
        check_label_values(cluster_path, "cluster raster")
        reference_layer = self._reference_layer(parameters, context)
        class_names: dict[int, str] = {}
        if isinstance(reference_layer, QgsRasterLayer):
            check_label_values(reference_layer.source().split("|")[0], "reference raster")
            reference = _reference_raster_on_grid(reference_layer.source(), grid, feedback)
        elif isinstance(reference_layer, QgsVectorLayer):
            field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
            if not field:
                raise QgsProcessingException(
                    "A polygon reference needs a class field: choose the field that holds the "
                    "class of each polygon."
                )
            reference, class_names = _rasterize_polygons(reference_layer, field, grid)
        else:
            raise QgsProcessingException("The reference must be a raster or a polygon layer.")
        monitor.progress(0.5)

        scores = score_clustering(reference, predicted)
        feedback.pushInfo(
            f"OA {scores.overall_accuracy:.4f}  NMI {scores.nmi:.4f}  kappa {scores.kappa:.4f}  "
            f"ARI {scores.ari:.4f}  on {scores.n_scored} pixels"
        )
        for class_id, accuracy in sorted(scores.per_class_accuracy.items()):
            name = class_names.get(class_id, str(class_id))
            feedback.pushInfo(f"  class {name}: accuracy {accuracy:.4f}")

        results: dict[str, Any] = {"OA": scores.overall_accuracy, "NMI": scores.nmi,
                                   "KAPPA": scores.kappa, "ARI": scores.ari,
                                   "N_SCORED": scores.n_scored}
        if parameters.get(self.OUTPUT_TABLE) is not None:
            results[self.OUTPUT_TABLE] = self._write_table(parameters, context, reference,
                                                           scores, class_names)
        monitor.progress(1.0)
        return results

    def _write_table(self, parameters, context, reference, scores, class_names) -> str:
        fields = QgsFields()
        fields.append(QgsField("class", QVariant.String))
        fields.append(QgsField("class_code", QVariant.Int))
        fields.append(QgsField("cluster", QVariant.Int))
        fields.append(QgsField("pixels", QVariant.Int))
        fields.append(QgsField("accuracy", QVariant.Double))
        sink, destination = self.parameterAsSink(parameters, self.OUTPUT_TABLE, context, fields,
                                                 QgsWkbTypes.NoGeometry)
        if sink is None:
            raise QgsProcessingException(
                f"The per-class accuracy table '{parameters.get(self.OUTPUT_TABLE)}' could not "
                "be created. Choose a writable folder and a vector format (e.g. .gpkg or .csv)."
            )
        cluster_of_class = {class_id: cluster for cluster, class_id in scores.mapping.items()}
        for class_id, accuracy in sorted(scores.per_class_accuracy.items()):
            feature = QgsFeature(fields)
            feature.setAttributes([
                class_names.get(class_id, str(class_id)), int(class_id),
                int(cluster_of_class.get(class_id, 0)), int((reference == class_id).sum()),
                float(accuracy),
            ])
            if not sink.addFeature(feature, QgsFeatureSink.FastInsert):
                raise QgsProcessingException(
                    f"Writing the per-class accuracy table '{destination}' failed: "
                    f"{sink.lastError() or 'the file could not be written'}."
                )
        if hasattr(sink, "flushBuffer") and not sink.flushBuffer():
            raise QgsProcessingException(
                f"Writing the per-class accuracy table '{destination}' failed: "
                f"{sink.lastError() or 'the file could not be written'}."
            )
        return destination


# A raster with more distinct values than this is no cluster or class raster (reflectance, an
# index, a DEM): scoring it would give meaningless figures.
MAX_LABEL_VALUES = 1000


def check_label_values(path: str, what: str) -> None:
    """ValueError unless ``path``'s band 1 holds whole numbers with at most MAX_LABEL_VALUES
    distinct values (block by block; stops at the first offence)."""
    import rasterio

    seen: set[int] = set()
    with rasterio.open(path) as dataset:
        nodata = dataset.nodata
        for _, window in dataset.block_windows(1):
            values = dataset.read(1, window=window)
            if nodata is not None:
                values = values[values != nodata]
            if np.issubdtype(values.dtype, np.floating):
                values = values[np.isfinite(values)]
                if np.any(values != np.round(values)):
                    raise ValueError(
                        f"The {what} '{path}' holds fractional values (such as "
                        f"{values[values != np.round(values)][0]:g}); cluster and class rasters "
                        "hold whole numbers (0 = nodata). Choose a clustering result or a "
                        "label raster."
                    )
            seen.update(np.unique(values).astype(np.int64).tolist())
            if len(seen) > MAX_LABEL_VALUES:
                raise ValueError(
                    f"The {what} '{path}' holds more than {MAX_LABEL_VALUES} distinct values; "
                    "that is no cluster or class raster (an image band?). Choose a clustering "
                    "result or a label raster."
                )


def _reference_raster_on_grid(path: str, grid: RasterGrid, feedback) -> np.ndarray:
    reference, reference_grid = read_labels(path)
    if reference_grid == grid:
        return reference
    feedback.pushWarning("The reference raster is on another grid; it is resampled (nearest "
                         "neighbour) onto the cluster raster's grid.")
    width, height = grid.width, grid.height
    left, top = grid.transform.c, grid.transform.f
    right = left + grid.transform.a * width
    bottom = top + grid.transform.e * height
    warped = gdal.Warp("", path, format="MEM", width=width, height=height,
                       outputBounds=(left, min(top, bottom), right, max(top, bottom)),
                       dstSRS=grid.crs_wkt or None, resampleAlg="near")
    values = warped.GetRasterBand(1).ReadAsArray().astype(np.int64)
    nodata = warped.GetRasterBand(1).GetNoDataValue()
    if nodata is not None:
        values[values == nodata] = 0
    values[values < 0] = 0
    return values


def _rasterize_polygons(layer: QgsVectorLayer, field: str,
                        grid: RasterGrid) -> tuple[np.ndarray, dict[int, str]]:
    """Burn the class of each polygon (reprojected to the grid's CRS) at pixel centres."""
    index = layer.fields().indexOf(field)
    if index < 0:
        raise QgsProcessingException(f"The reference layer has no field '{field}'.")
    values = [feature[field] for feature in layer.getFeatures()]
    numeric = all(isinstance(v, (int, float)) and v == int(v) for v in values if v is not None)
    if numeric:
        codes = {v: int(v) for v in values if v is not None}
        names: dict[int, str] = {}
    else:
        ordered = sorted({str(v) for v in values if v is not None})
        codes = {name: position for position, name in enumerate(ordered, start=1)}
        names = {position: name for name, position in codes.items()}

    spatial_reference = osr.SpatialReference()
    if grid.crs_wkt:
        spatial_reference.ImportFromWkt(grid.crs_wkt)
    transform = None
    if grid.crs_wkt and layer.crs().isValid():
        target = QgsCoordinateReferenceSystem.fromWkt(grid.crs_wkt)
        if target != layer.crs():
            transform = QgsCoordinateTransform(layer.crs(), target, QgsProject.instance())
    memory = ogr.GetDriverByName("Memory").CreateDataSource("reference")
    burn_layer = memory.CreateLayer("reference", srs=spatial_reference, geom_type=ogr.wkbPolygon)
    burn_layer.CreateField(ogr.FieldDefn("code", ogr.OFTInteger))
    for feature in layer.getFeatures():
        value = feature[field]
        if value is None or feature.geometry().isEmpty():
            continue
        geometry = feature.geometry()
        if transform is not None:
            geometry.transform(transform)
        ogr_feature = ogr.Feature(burn_layer.GetLayerDefn())
        ogr_feature.SetField("code", codes[value if numeric else str(value)])
        ogr_feature.SetGeometry(ogr.CreateGeometryFromWkb(bytes(geometry.asWkb())))
        burn_layer.CreateFeature(ogr_feature)
    target_raster = gdal.GetDriverByName("MEM").Create("", grid.width, grid.height, 1,
                                                       gdal.GDT_Int32)
    target_raster.SetGeoTransform(grid.transform.to_gdal())
    if grid.crs_wkt:
        target_raster.SetProjection(grid.crs_wkt)
    gdal.RasterizeLayer(target_raster, [1], burn_layer, options=["ATTRIBUTE=code"])
    reference = target_raster.GetRasterBand(1).ReadAsArray().astype(np.int64)
    reference[reference < 0] = 0
    return reference, names
