"""Shared base of the HSI Cluster Processing algorithms: parameters, IO, feedback and errors.

A subclass declares its identity and help text as class attributes, adds its own parameters in
``define_parameters`` and does its work in ``run``. The base turns engine errors (``ValueError``)
into ``QgsProcessingException`` with the engine's advice, turns a cancel into a clear message, and
removes every output already written when a run fails, so nothing half-written is left behind.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBand,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
)

from engine.cluster_stats import ClusterStatistics, cluster_statistics
from engine.device import DEVICE_CHOICES
from engine.monitor import Cancelled, Monitor
from engine.raster_io import RasterData, RasterGrid, read_raster, write_float_raster
from processing_provider import outputs, styles

# Tags of every algorithm (the toolbox search matches them); subclasses add their own.
COMMON_TAGS = ("hsi", "hyperspectral", "multispectral", "unsupervised", "remote sensing",
               "imagery", "hsi cluster")


def reflow_html(text: str) -> str:
    """Help HTML as one line: QGIS's help panel shows every newline of the source as a
    paragraph gap, so only the HTML tags may structure the text."""
    return re.sub(r"\s+", " ", text).strip()


def feedback_monitor(feedback: QgsProcessingFeedback | None) -> Monitor:
    """An engine Monitor that reports to (and takes cancels from) QGIS feedback."""
    if feedback is None:
        return Monitor()
    return Monitor(
        on_progress=lambda fraction: feedback.setProgress(100.0 * fraction),
        is_cancelled=feedback.isCanceled,
        on_info=feedback.pushInfo,
        on_warning=feedback.pushWarning,
    )


class OutputFiles:
    """Paths this run has written; removed again if the run fails."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def add(self, *paths: str | os.PathLike) -> None:
        self.paths.extend(Path(p) for p in paths)

    def remove_all(self) -> None:
        for path in self.paths:
            for candidate in (path, path.with_suffix(".qml"), Path(f"{path}.aux.xml")):
                if candidate.exists():
                    candidate.unlink()


class HSIAlgorithm(QgsProcessingAlgorithm):
    """Base class; subclasses set the class attributes and implement the two hooks."""

    INPUT = "INPUT"
    BANDS = "BANDS"
    SEED = "SEED"
    DEVICE = "DEVICE"

    algorithm_id = ""
    display_name = ""
    group_name = "Clustering"
    group_id = "clustering"
    help_text = ""
    extra_tags: tuple[str, ...] = ()

    # ---------------------------------------------------------------- identity
    def name(self) -> str:
        return self.algorithm_id

    def displayName(self) -> str:
        return self.display_name

    def group(self) -> str:
        return self.group_name

    def groupId(self) -> str:
        return self.group_id

    def shortHelpString(self) -> str:
        return reflow_html(self.help_text)

    def tags(self) -> list[str]:
        return list(dict.fromkeys((*COMMON_TAGS, *self.extra_tags)))

    def createInstance(self) -> QgsProcessingAlgorithm:
        return type(self)()

    def initAlgorithm(self, config: dict | None = None) -> None:
        self.define_parameters()

    # ---------------------------------------------------------------- hooks
    def define_parameters(self) -> None:
        """Subclasses add their parameters here."""

    def run_algorithm(self, parameters: dict, context: QgsProcessingContext,
            feedback: QgsProcessingFeedback, monitor: Monitor,
            written: OutputFiles) -> dict[str, Any]:
        """Subclasses do their work here and return the output dictionary."""
        return {}

    # ---------------------------------------------------------------- the run
    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        monitor = feedback_monitor(feedback)
        written = OutputFiles()
        self._styled_outputs = []
        try:
            return self.run_algorithm(parameters, context, feedback, monitor, written)
        except Cancelled:
            written.remove_all()
            raise QgsProcessingException(
                f"{self.display_name} was cancelled; no output was written."
            ) from None
        except ValueError as error:
            written.remove_all()
            raise QgsProcessingException(str(error)) from error
        except BaseException:
            written.remove_all()
            raise

    # ---------------------------------------------------------------- loading the outputs
    def style_output(self, key: str, output: str, style: styles.LayerStyle, name: str,
                     move_to_bottom: bool = False) -> None:
        """Give the layer ``key`` (an output path or layer URI) of output ``output`` the style
        and layer name ``name`` if Processing loads it when the run completes (dialog, batch,
        modeler, runAndLoadResults). Applied in :meth:`postProcessAlgorithm`, which runs in the
        main thread with the context Processing loads the layers from."""
        self._styled_outputs.append((key, output, style, name, move_to_bottom))

    def postProcessAlgorithm(self, context: QgsProcessingContext,  # noqa: N802 - Qt naming
                             feedback: QgsProcessingFeedback) -> dict[str, Any]:
        for key, output, style, name, move_to_bottom in getattr(self, "_styled_outputs", []):
            definition = (self.parameterDefinition(output) or self.outputDefinition(output))
            default_names = [output]
            if definition is not None:
                default_names.append(definition.description())
            styles.style_on_load(context, key, style, name, default_names, move_to_bottom)
        self._styled_outputs = []
        return {}  # a non-empty dictionary would replace the results of processAlgorithm

    def input_layer_name(self, parameters: dict, context: QgsProcessingContext) -> str:
        """The input's layer name (a file's base name when it is no project layer)."""
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        return layer.name() if layer is not None else "input"

    # ---------------------------------------------------------------- parameter helpers
    def add_input_raster(self, description: str = "Input raster (multi- or hyperspectral)"):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, description))

    def add_band_selection(self) -> None:
        self.addParameter(QgsProcessingParameterBand(
            self.BANDS, "Bands to use (all when empty)", None, self.INPUT, optional=True,
            allowMultiple=True,
        ))

    def add_integer(self, name: str, description: str, default: int, minimum: int,
                    maximum: int | None = None, advanced: bool = False) -> None:
        parameter = QgsProcessingParameterNumber(
            name, description, QgsProcessingParameterNumber.Integer, default, False, minimum,
            maximum if maximum is not None else 2**31 - 1,
        )
        self._add(parameter, advanced)

    def add_double(self, name: str, description: str, default: float, minimum: float,
                   maximum: float | None = None, advanced: bool = False) -> None:
        parameter = QgsProcessingParameterNumber(
            name, description, QgsProcessingParameterNumber.Double, default, False, minimum,
            maximum if maximum is not None else 1e12,
        )
        self._add(parameter, advanced)

    def add_seed_and_device(self) -> None:
        self.add_integer(self.SEED, "Random seed (same seed, same result)", 0, 0, advanced=True)
        self._add(QgsProcessingParameterEnum(
            self.DEVICE, "Device", options=list(DEVICE_CHOICES), defaultValue=0,
        ), advanced=True)

    def add_raster_output(self, name: str, description: str, optional: bool = False) -> None:
        self.addParameter(QgsProcessingParameterRasterDestination(
            name, description, optional=optional, createByDefault=not optional,
        ))

    def add_vector_output(self, name: str, description: str, optional: bool = True) -> None:
        self.addParameter(QgsProcessingParameterVectorDestination(
            name, description, optional=optional, createByDefault=not optional,
        ))

    def _add(self, parameter, advanced: bool) -> None:
        if advanced:
            parameter.setFlags(parameter.flags()
                               | QgsProcessingParameterNumber.FlagAdvanced)
        self.addParameter(parameter)

    # ---------------------------------------------------------------- reading
    def seed(self, parameters: dict, context: QgsProcessingContext) -> int:
        return self.parameterAsInt(parameters, self.SEED, context)

    def device(self, parameters: dict, context: QgsProcessingContext) -> str:
        return DEVICE_CHOICES[self.parameterAsEnum(parameters, self.DEVICE, context)]

    def input_raster_path(self, parameters: dict, context: QgsProcessingContext) -> str:
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(
                "The input is not a raster layer QGIS can open. Choose a GeoTIFF or another "
                "GDAL raster."
            )
        if layer.providerType() != "gdal":
            raise QgsProcessingException(
                f"The input layer '{layer.name()}' comes from the '{layer.providerType()}' data "
                "provider; only file rasters read by GDAL are supported. Export it to a GeoTIFF "
                "first (Raster ▸ Conversion ▸ Translate)."
            )
        return layer.source()

    def read_input(self, parameters: dict, context: QgsProcessingContext,
                   monitor: Monitor) -> RasterData:
        bands = self.parameterAsInts(parameters, self.BANDS, context) or None
        return read_raster(self.input_raster_path(parameters, context), bands=bands,
                           monitor=monitor)

    def output_path(self, parameters: dict, name: str, context: QgsProcessingContext) -> str:
        """'' when an optional output was skipped."""
        value = parameters.get(name)
        if value is None:
            return ""
        return self.parameterAsOutputLayer(parameters, name, context) or ""

    # ---------------------------------------------------------------- writing
    def write_labels(self, path: str, labels: np.ndarray, grid: RasterGrid, n_classes: int,
                     written: OutputFiles, class_name: str = "Cluster",
                     feedback: QgsProcessingFeedback | None = None) -> str:
        """Label raster (0 = nodata, 1..k) in the smallest unsigned type + a paletted QML; the
        per-cluster pixel counts and areas go to the log and the raster's metadata."""
        outputs.check_writable(path)
        written.add(path)
        outputs.write_label_raster_with_style(path, labels, grid, n_classes, class_name)
        self.report_statistics(path, cluster_statistics(labels, n_classes, grid.transform,
                                                        grid.crs_wkt), feedback, class_name)
        return path

    def report_statistics(self, path: str, statistics: ClusterStatistics,
                          feedback: QgsProcessingFeedback | None,
                          class_name: str = "Cluster") -> None:
        if feedback is not None:
            feedback.pushInfo(f"Clusters ({statistics.total_pixels:,} pixels, one pixel = "
                              f"{statistics.pixel_area:.6g} {statistics.area_unit}):")
            for line in statistics.lines(class_name):
                feedback.pushInfo("  " + line)
        outputs.write_statistics_metadata(path, statistics,
                                          {"ALGORITHM": f"hsicluster:{self.algorithm_id}"})

    def write_float_stack(self, path: str, bands: np.ndarray, valid: np.ndarray,
                          grid: RasterGrid, names: list[str], written: OutputFiles) -> str:
        outputs.check_writable(path)
        written.add(path)
        write_float_raster(path, bands, valid, grid, names)
        return path
