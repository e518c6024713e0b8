"""The style of a labelling ``segments`` layer: outlines over the image, labelled segments filled
in their label's colour.

Used when Processing loads the segments and, while labelling, by the embedding dock, which
rebuilds the renderer whenever labels change so the map follows the labels. Only PyQGIS is
imported here: the dock works without the Processing dependencies.
"""

from __future__ import annotations

from collections.abc import Iterable

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsRendererCategory,
    QgsSingleSymbolRenderer,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

LABEL_FIELD = "label"
OUTLINE_COLOUR = "#ffff00"  # yellow reads on most imagery
CHIP_OUTLINE_COLOUR = "#00ffff"
LABEL_FILL_OPACITY = 0.6
UNLABELLED = "unlabelled"
# Set on a layer whose renderer this module made: the dock keeps only such renderers in step
# with the labels, never a style the user chose.
LIVE_PROPERTY = "hsi_cluster/live_label_style"


def outline_symbol(colour: str, width_mm: float = 0.26) -> QgsFillSymbol:
    return QgsFillSymbol.createSimple({
        "color": "0,0,0,0", "style": "no", "outline_color": colour,
        "outline_width": str(width_mm), "outline_width_unit": "MM",
    })


def filled_symbol(colour: str, opacity: float = LABEL_FILL_OPACITY,
                  outline: str = OUTLINE_COLOUR) -> QgsFillSymbol:
    fill = QColor(colour)
    fill.setAlphaF(opacity)
    return QgsFillSymbol.createSimple({
        "color": f"{fill.red()},{fill.green()},{fill.blue()},{fill.alpha()}",
        "style": "solid", "outline_color": outline, "outline_width": "0.26",
        "outline_width_unit": "MM",
    })


def segments_renderer(labels: Iterable[tuple[str, str]],
                      field: str = LABEL_FIELD) -> QgsCategorizedSymbolRenderer:
    """``labels``: (label, '#rrggbb') pairs. One legend entry per label, filled in its colour;
    every other value (no label yet: NULL or empty) is drawn as an outline only."""
    categories = [QgsRendererCategory(label, filled_symbol(colour), label)
                  for label, colour in labels]
    # A category whose value is "" is QGIS's "all other values" (NULL included).
    categories.append(QgsRendererCategory("", outline_symbol(OUTLINE_COLOUR), UNLABELLED))
    return QgsCategorizedSymbolRenderer(field, categories)


def apply_segments_style(layer: QgsVectorLayer, labels: Iterable[tuple[str, str]] = ()) -> None:
    layer.setRenderer(segments_renderer(labels))
    layer.setCustomProperty(LIVE_PROPERTY, True)
    layer.triggerRepaint()
    layer.emitStyleChanged()


def is_live(layer: QgsVectorLayer) -> bool:
    return bool(layer.customProperty(LIVE_PROPERTY, False)) and isinstance(
        layer.renderer(), QgsCategorizedSymbolRenderer)


def apply_chips_style(layer: QgsVectorLayer) -> None:
    layer.setRenderer(QgsSingleSymbolRenderer(outline_symbol(CHIP_OUTLINE_COLOUR, 0.6)))
    layer.triggerRepaint()
    layer.emitStyleChanged()
