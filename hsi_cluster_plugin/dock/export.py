"""Export labelled segments to a GeoPackage layer (optionally one dissolved feature per label),
in the segment layer's CRS, and add it to the project with a categorized renderer."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsFields,
    QgsGeometry,
    QgsProject,
    QgsRendererCategory,
    QgsSymbol,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

from .colours import palette_hex
from .labelling import LABEL_FIELD


class ExportError(ValueError):
    pass


def _labelled_request(field: str) -> QgsFeatureRequest:
    quoted = '"' + field.replace('"', '""') + '"'
    return QgsFeatureRequest().setFilterExpression(f"{quoted} IS NOT NULL AND {quoted} <> ''")


def export_labelled_segments(
    layer: QgsVectorLayer,
    path: str | Path,
    layer_name: str = "labelled_segments",
    dissolve: bool = False,
    field: str = LABEL_FIELD,
) -> tuple[str, int]:
    """Write the segments that have a label (edits not yet saved included) to ``layer_name`` in
    the GeoPackage ``path`` (created, or the layer replaced if the file exists). Returns the
    layer URI and the number of features written."""
    if layer.fields().indexOf(field) < 0:
        raise ExportError(f"layer '{layer.name()}' has no '{field}' field: label segments first")
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        raise ExportError(f"{path}: the export is a GeoPackage, give a .gpkg file name")
    features = list(layer.getFeatures(_labelled_request(field)))
    if not features:
        raise ExportError(f"layer '{layer.name()}' has no labelled segments to export")

    if dissolve:
        fields = QgsFields()
        fields.append(QgsField(field, QVariant.String))
        fields.append(QgsField("n_segments", QVariant.Int))
        fields.append(QgsField("area", QVariant.Double))
        groups: dict[str, list[QgsGeometry]] = defaultdict(list)
        for f in features:
            groups[str(f[field])].append(f.geometry())
        out = []
        for label in sorted(groups):
            geometry = QgsGeometry.unaryUnion(groups[label])
            geometry.convertToMultiType()
            feature = QgsFeature(fields)
            feature.setGeometry(geometry)
            feature.setAttributes([label, len(groups[label]), geometry.area()])
            out.append(feature)
    else:
        # The source "fid" would clash with the new file's own feature ids: leave it out.
        keep = [i for i, f in enumerate(layer.fields()) if f.name().lower() != "fid"]
        fields = QgsFields()
        for i in keep:
            fields.append(layer.fields().at(i))
        out = []
        for f in features:
            feature = QgsFeature(fields)
            geometry = QgsGeometry(f.geometry())
            geometry.convertToMultiType()
            feature.setGeometry(geometry)
            attrs = f.attributes()
            feature.setAttributes([attrs[i] for i in keep])
            out.append(feature)

    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = layer_name
    options.fileEncoding = "UTF-8"
    if path.exists():
        options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer
    writer = QgsVectorFileWriter.create(
        str(path), fields, QgsWkbTypes.multiType(QgsWkbTypes.Polygon), layer.crs(),
        QgsProject.instance().transformContext(), options)
    if writer.hasError() != QgsVectorFileWriter.NoError:
        message = writer.errorMessage()
        del writer
        raise ExportError(f"could not write {path}: {message}")
    ok = writer.addFeatures(out)
    error = writer.errorMessage()
    del writer  # closes the file
    if not ok:
        raise ExportError(f"writing features to {path} failed: {error}")
    return f"{path}|layername={layer_name}", len(out)


def categorized_renderer(field: str, colours: dict[str, str], labels) -> \
        QgsCategorizedSymbolRenderer:
    categories = []
    for i, label in enumerate(sorted({str(x) for x in labels})):
        symbol = QgsSymbol.defaultSymbol(QgsWkbTypes.PolygonGeometry)
        symbol.setColor(QColor(colours.get(label) or palette_hex(i)))
        categories.append(QgsRendererCategory(label, symbol, label))
    return QgsCategorizedSymbolRenderer(field, categories)


def add_export_to_project(
    uri: str, name: str, colours: dict[str, str], field: str = LABEL_FIELD,
    project: QgsProject | None = None,
) -> QgsVectorLayer:
    layer = QgsVectorLayer(uri, name, "ogr")
    if not layer.isValid():
        raise ExportError(f"the exported layer {uri} could not be opened")
    labels = layer.uniqueValues(layer.fields().indexOf(field))
    layer.setRenderer(categorized_renderer(field, colours, labels))
    (project or QgsProject.instance()).addMapLayer(layer)
    return layer
