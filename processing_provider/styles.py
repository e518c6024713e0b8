"""Styles of the outputs, applied when Processing loads them.

Processing (the algorithm dialog, the batch dialog, the modeler, ``processing.runAndLoadResults``)
loads an output without reading the ``.qml`` beside it, so each output that is loaded gets a
:class:`StylePostProcessor` in the context's layer details: Processing calls it with the loaded
layer, after adding it to the project. The ``.qml`` files are still written beside the rasters
for layers added by hand.

Every function here takes a layer and changes only its renderer (and, for the segments, nothing
that is stored in the data), so a style can be applied again at any time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsContrastEnhancement,
    QgsFillSymbol,
    QgsMultiBandColorRenderer,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterBandStats,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

from engine.quicklook import default_palette
from processing_provider import segment_style

LayerStyle = Callable[[object], None]

# Stretch of image renderers: the 2nd to 98th percentile of each band (QGIS's cumulative cut).
CUMULATIVE_CUT = (0.02, 0.98)


def cluster_colours(n_classes: int) -> list[QColor]:
    """The project's cluster palette (the same as the quicklooks), cluster 1 first."""
    return [QColor(*rgb) for rgb in default_palette(n_classes)]


# ------------------------------------------------------------------------------------ rasters
def cluster_renderer(layer: QgsRasterLayer, n_classes: int,
                     class_name: str = "Cluster") -> QgsPalettedRasterRenderer:
    """Paletted renderer of a label raster: value c is "Cluster c" in the palette's colour."""
    classes = [
        QgsPalettedRasterRenderer.Class(value, colour, f"{class_name} {value}")
        for value, colour in enumerate(cluster_colours(n_classes), start=1)
    ]
    return QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)


def style_clusters(n_classes: int, class_name: str = "Cluster") -> LayerStyle:
    def apply(layer: QgsRasterLayer) -> None:
        layer.setRenderer(cluster_renderer(layer, n_classes, class_name))
    return apply


def style_soft_assignments(n_classes: int) -> LayerStyle:
    """Band 1 (the soft assignment to cluster 1, 0..1) from white to cluster 1's colour; the
    user picks another band in the layer properties to see another cluster."""
    def apply(layer: QgsRasterLayer) -> None:
        colour = cluster_colours(max(n_classes, 1))[0]
        ramp = QgsColorRampShader(0.0, 1.0)
        ramp.setColorRampType(QgsColorRampShader.Interpolated)
        ramp.setColorRampItemList([
            QgsColorRampShader.ColorRampItem(0.0, QColor("#ffffff"), "0 (not cluster 1)"),
            QgsColorRampShader.ColorRampItem(0.5, _blend("#ffffff", colour, 0.5), "0.5"),
            QgsColorRampShader.ColorRampItem(1.0, colour, "1 (cluster 1)"),
        ])
        shader = QgsRasterShader(0.0, 1.0)
        shader.setRasterShaderFunction(ramp)
        renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
        renderer.setClassificationMin(0.0)
        renderer.setClassificationMax(1.0)
        layer.setRenderer(renderer)
    return apply


def style_image(bands: Sequence[int]) -> LayerStyle:
    """Multiband colour of three bands (1-based, red/green/blue), each stretched between its 2nd
    and 98th percentile, as QGIS's cumulative cut does."""
    red, green, blue = (int(band) for band in bands)

    def apply(layer: QgsRasterLayer) -> None:
        provider = layer.dataProvider()
        renderer = QgsMultiBandColorRenderer(provider, red, green, blue)
        enhancements = []
        for band in (red, green, blue):
            enhancement = QgsContrastEnhancement(provider.dataType(band))
            enhancement.setContrastEnhancementAlgorithm(
                QgsContrastEnhancement.StretchToMinimumMaximum, True)
            low, high = _cumulative_cut(layer, band)
            enhancement.setMinimumValue(low)
            enhancement.setMaximumValue(high)
            enhancements.append(enhancement)
        renderer.setRedContrastEnhancement(enhancements[0])
        renderer.setGreenContrastEnhancement(enhancements[1])
        renderer.setBlueContrastEnhancement(enhancements[2])
        layer.setRenderer(renderer)
    return apply


def _cumulative_cut(layer: QgsRasterLayer, band: int) -> tuple[float, float]:
    """The band's 2nd and 98th percentiles (QGIS estimates them from a sample of the raster)."""
    low, high = layer.dataProvider().cumulativeCut(band, *CUMULATIVE_CUT)
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        stats = layer.dataProvider().bandStatistics(band, QgsRasterBandStats.Min
                                                    | QgsRasterBandStats.Max)
        low, high = stats.minimumValue, stats.maximumValue
        if high <= low:
            high = low + 1.0
    return float(low), float(high)


def _blend(first: str, second: QColor, weight: float) -> QColor:
    a = QColor(first)
    return QColor(round(a.red() * (1 - weight) + second.red() * weight),
                  round(a.green() * (1 - weight) + second.green() * weight),
                  round(a.blue() * (1 - weight) + second.blue() * weight))


# ------------------------------------------------------------------------------------ vectors
def _fill(colour: QColor) -> QgsFillSymbol:
    """A solid fill without outline (the polygons of one cluster touch each other)."""
    return QgsFillSymbol.createSimple({
        "color": f"{colour.red()},{colour.green()},{colour.blue()},255", "style": "solid",
        "outline_style": "no",
    })


def style_cluster_polygons(n_classes: int, field: str = "cluster",
                           class_name: str = "Cluster") -> LayerStyle:
    """Categorized on the cluster field, in the cluster raster's colours and names."""
    def apply(layer: QgsVectorLayer) -> None:
        categories = [
            QgsRendererCategory(value, _fill(colour),
                                f"{class_name} {value}")
            for value, colour in enumerate(cluster_colours(n_classes), start=1)
        ]
        layer.setRenderer(QgsCategorizedSymbolRenderer(field, categories))
    return apply


def style_segments() -> LayerStyle:
    """Outlines; labelled segments (none yet when written) filled in their label's colour."""
    def apply(layer: QgsVectorLayer) -> None:
        segment_style.apply_segments_style(layer)
    return apply


def style_chips() -> LayerStyle:
    return segment_style.apply_chips_style


def save_default_style(uri: str, style: LayerStyle, name: str) -> str:
    """Store ``style`` in the GeoPackage as the layer's default style (table ``layer_styles``),
    so that the layer added by hand (Browser, Add Layer) looks as Processing loads it. Returns
    an error message, '' on success."""
    layer = QgsVectorLayer(uri, name, "ogr")
    if not layer.isValid():
        return f"cannot open {uri}"
    style(layer)
    message = layer.saveStyleToDatabase(name, "HSI Cluster default style", True, "")
    return message or ""


# ------------------------------------------------------------------------------------ loading
class StylePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Applies a style to an output layer once Processing has loaded it.

    ``move_to_bottom``: put the layer below the other layers of its group (an input image
    added with the segments must not hide them; Processing adds layers in its own order).
    """

    def __init__(self, style: LayerStyle, move_to_bottom: bool = False):
        super().__init__()
        self.style = style
        self.move_to_bottom = move_to_bottom

    def postProcessLayer(self, layer, context: QgsProcessingContext,  # noqa: N802 - Qt naming
                         feedback: QgsProcessingFeedback) -> None:
        try:
            self.style(layer)
            layer.triggerRepaint()
            layer.emitStyleChanged()
            if self.move_to_bottom:
                _move_to_bottom(layer, context)
        except Exception as error:  # noqa: BLE001 - a style must never fail the run
            if feedback is not None:
                feedback.pushWarning(f"Could not style '{layer.name()}': {error}")


def _move_to_bottom(layer, context: QgsProcessingContext) -> None:
    project = context.project()
    if project is None:
        return
    node = project.layerTreeRoot().findLayer(layer.id())
    if node is None or node.parent() is None:
        return
    parent = node.parent()
    clone = node.clone()
    parent.insertChildNode(len(parent.children()), clone)
    parent.removeChildNode(node)


# PyQGIS pitfall: the layer details hold a C++ pointer to the post-processor; a Python subclass
# whose Python object is garbage-collected turns into the C++ base class (which does nothing)
# or a dangling pointer. Processing never tells us when it is done with it, so the instances
# are kept here; ones whose C++ side was deleted (with their context) are dropped as new ones
# come in.
_ALIVE: list[StylePostProcessor] = []


def keep_alive(processor: StylePostProcessor) -> StylePostProcessor:
    from qgis.PyQt import sip

    _ALIVE[:] = [kept for kept in _ALIVE if not sip.isdeleted(kept)]
    _ALIVE.append(processor)
    return processor


def unique_layer_name(project, name: str) -> str:
    """``name``, or ``name [2]``, ``name [3]``... when the project has a layer of that name
    already (a second run on the same input), so runs stay apart in the Layers panel and in
    layer combo boxes."""
    if project is None:
        return name
    taken = {layer.name() for layer in project.mapLayers().values()}
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name} [{number}]"
    return candidate


def style_on_load(context: QgsProcessingContext, key: str, style: LayerStyle,
                  name: str = "", default_names: Sequence[str] = (),
                  move_to_bottom: bool = False) -> bool:
    """If Processing will load ``key`` (an output path or layer URI) when the run completes,
    give it ``style`` and, when its name is still one of ``default_names`` (what Processing
    would call it: the output's name or description; a modeler output keeps the name the user
    gave it), ``name``. Returns whether the layer will be loaded."""
    if not key or not context.willLoadLayerOnCompletion(key):
        return False
    details = context.layerToLoadOnCompletionDetails(key)
    if name and (not details.name or details.name in default_names):
        details.name = unique_layer_name(details.project, name)
    details.setPostProcessor(keep_alive(StylePostProcessor(style, move_to_bottom)))
    return True
