"""Shared base of the HSI Cluster Processing algorithms: parameters, IO, feedback and errors.

A subclass declares its identity and help text as class attributes, adds its own parameters in
``define_parameters`` and does its work in ``run``. The base turns engine errors (``ValueError``)
into ``QgsProcessingException`` with the engine's advice, turns a cancel into a clear message, and
removes every output already written when a run fails, so nothing half-written is left behind.
"""

from __future__ import annotations

import math
import os
import re
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from osgeo import gdal
from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputLayerDefinition,
    QgsProcessingParameterBand,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
    QgsProject,
    QgsProperty,
)
from rasterio.errors import RasterioError

from engine import safe_files
from engine.cluster_stats import ClusterStatistics, cluster_statistics
from engine.device import DEVICE_CHOICES
from engine.monitor import Cancelled, Monitor
from engine.raster_io import RasterData, RasterGrid, read_raster, write_float_raster
from engine.safe_files import OutputLedger
from processing_provider import outputs, styles

# Tags of every algorithm (the toolbox search matches them); subclasses add their own.
COMMON_TAGS = ("hsi", "hyperspectral", "multispectral", "unsupervised", "remote sensing",
               "imagery", "hsi cluster")


def reflow_html(text: str) -> str:
    """Help HTML as one line: QGIS's help panel shows every newline of the source as a
    paragraph gap, so only the HTML tags may structure the text."""
    return re.sub(r"\s+", " ", text).strip()


# What the writers produce: GeoTIFF rasters (rasterio), GeoPackage vectors (OGR). Declared to
# QGIS by the provider, so its file dialogs offer only these; other names are refused before
# any work instead of getting a GeoTIFF named .png.
RASTER_EXTENSIONS = ("tif", "tiff")
VECTOR_EXTENSIONS = ("gpkg",)


def _format_name(extensions: tuple[str, ...]) -> str:
    return "a GeoTIFF" if extensions == RASTER_EXTENSIONS else "a GeoPackage"


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


class OutputFiles(OutputLedger):
    """The files this run writes (see ``engine.safe_files.OutputLedger``): on failure the ones it
    created are removed and the ones that existed before are restored, never deleted."""

    def add(self, *paths: str | os.PathLike) -> None:
        """Claim paths before writing them (the base claims every declared output anyway)."""
        for path in paths:
            self.claim(path)


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
    def checkParameterValues(self, parameters: dict,  # noqa: N802 - QGIS naming
                             context: QgsProcessingContext) -> tuple[bool, str]:
        problem = self.unreadable_input_file(parameters)
        if problem:
            return False, problem
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        try:
            self.check_parameters(parameters, context)
        except (QgsProcessingException, ValueError) as error:
            return False, str(error)
        return True, ""

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> dict[str, Any]:
        monitor = feedback_monitor(feedback)
        written = OutputFiles()
        self._styled_outputs = []
        with safe_files.cleanup_on_termination():
            try:
                # Again here: batch runs and scripts may skip checkParameterValues.
                self.check_parameters(parameters, context)
                for path, in_place in self.output_files(parameters, context):
                    written.claim(path, replaced_by_rename=not in_place)
                with written.active():
                    return self.run_algorithm(parameters, context, feedback, monitor, written)
            except Cancelled:
                raise QgsProcessingException(
                    f"{self.display_name} was cancelled; no output was written (files that "
                    "existed before are unchanged)."
                ) from None
            except QgsProcessingException:
                raise
            except ValueError as error:
                raise QgsProcessingException(str(error)) from error
            except MemoryError:
                raise QgsProcessingException(
                    f"{self.display_name} ran out of memory. Use a smaller raster (clip it, "
                    "Raster ▸ Extraction ▸ Clip Raster by Extent) or fewer bands, or close other "
                    "programs."
                ) from None
            except OSError as error:
                raise QgsProcessingException(
                    f"{self.display_name} could not read or write "
                    f"'{error.filename or 'a file'}': {error.strerror or error}. Check the disk "
                    "space and the permissions of the folder."
                ) from None
            except RasterioError as error:
                raise QgsProcessingException(
                    f"{self.display_name}: GDAL could not read or write a raster ({error}). "
                    "The file may be damaged or truncated; check it opens in QGIS."
                ) from None
            except Exception as error:  # noqa: BLE001 - a bug: say so without a traceback
                feedback.pushDebugInfo(traceback.format_exc())
                raise QgsProcessingException(
                    f"{self.display_name} failed unexpectedly ({type(error).__name__}: "
                    f"{error}). No output was written. This is a bug in HSI Cluster: please "
                    "report it with the log (the details are in the log at debug level)."
                ) from None

    # ---------------------------------------------------------------- checks before any work
    def unreadable_input_file(self, parameters: dict) -> str:
        """A message for a layer input given as a file path that is missing or that GDAL/OGR
        cannot open ('' when there is none): QGIS's own check says "not found" for both."""
        for definition in self.parameterDefinitions():
            value = parameters.get(definition.name())
            if definition.isDestination() or not isinstance(value, str) or not value.strip():
                continue
            if not isinstance(definition, (QgsProcessingParameterRasterLayer,
                                           QgsProcessingParameterVectorLayer,
                                           QgsProcessingParameterMapLayer,
                                           QgsProcessingParameterFeatureSource)):
                continue
            path = value.split("|")[0]
            if QgsProject.instance().mapLayer(value) is not None or \
                    QgsProject.instance().mapLayersByName(value) or "://" in path or \
                    "=" in path:
                continue  # a project layer, a database or service URI: QGIS resolves those
            if not Path(path).exists():
                return (f"'{definition.description()}': the file '{path}' does not exist. "
                        "Choose an existing file.")
            raster = isinstance(definition, QgsProcessingParameterRasterLayer)
            gdal.PushErrorHandler("CPLQuietErrorHandler")
            try:
                opened = (gdal.OpenEx(path, gdal.OF_RASTER if raster else
                                      gdal.OF_RASTER | gdal.OF_VECTOR) is not None)
            finally:
                gdal.PopErrorHandler()
            if not opened:
                kind, advice = (("a raster", "Choose a GeoTIFF or another GDAL raster.")
                                if raster else ("a layer", "Choose a file QGIS can open."))
                return (f"'{definition.description()}': '{path}' is not {kind} GDAL can read "
                        f"(damaged, or another kind of file). {advice}")
        return ""

    def check_parameters(self, parameters: dict, context: QgsProcessingContext) -> None:
        """Raise QgsProcessingException/ValueError for values no run can succeed with; cheap
        (no training, no full read), so it also runs when the dialog checks parameters."""
        for definition in self.parameterDefinitions():
            name = definition.name()
            if (isinstance(definition, QgsProcessingParameterNumber)
                    and parameters.get(name) not in (None, "")):
                value = self.parameterAsDouble(parameters, name, context)
                if not math.isfinite(value):
                    raise QgsProcessingException(
                        f"'{definition.description()}' ({name}) is {value}: give a finite number."
                    )
        if self.parameterDefinition(self.BANDS) is not None:
            bands = self.parameterAsInts(parameters, self.BANDS, context) or []
            repeated = sorted({band for band in bands if bands.count(band) > 1})
            if repeated:
                raise QgsProcessingException(
                    f"Band(s) {repeated} are selected more than once in 'Bands to use'. Select "
                    "each band once."
                )
        inputs = self.input_files(parameters, context)
        outputs_ = self.output_files(parameters, context)
        self._check_outputs(parameters, context, inputs, outputs_)

    def input_files(self, parameters: dict, context: QgsProcessingContext) -> list[Path]:
        """Files the run reads: layer sources and file parameters (outputs must differ)."""
        found: list[Path] = []
        for definition in self.parameterDefinitions():
            if definition.isDestination() or parameters.get(definition.name()) in (None, ""):
                continue
            name = definition.name()
            source = ""
            if isinstance(definition, QgsProcessingParameterFile):
                source = self.parameterAsFile(parameters, name, context)
            elif isinstance(definition, (QgsProcessingParameterRasterLayer,
                                         QgsProcessingParameterMapLayer,
                                         QgsProcessingParameterVectorLayer,
                                         QgsProcessingParameterFeatureSource)):
                layer = self.parameterAsLayer(parameters, name, context)
                if layer is not None:
                    source = layer.source()
            path = source.split("|")[0] if source else ""
            if path and Path(path).exists():
                found.append(Path(path))
        return found

    def destination_path(self, parameters: dict, definition,
                         context: QgsProcessingContext) -> str:
        """The file a destination parameter names ('' for none, a temporary output, memory or a
        database). Read from the value itself: ``parameterAsOutputLayer`` would also register
        a layer to load on completion (a new temporary name per call)."""
        value = parameters.get(definition.name())
        if isinstance(value, QgsProcessingOutputLayerDefinition):
            value = value.sink.valueAsString(context.expressionContext(), "")[0]
        elif isinstance(value, QgsProperty):
            value = value.valueAsString(context.expressionContext(), "")[0]
        text = str(value or "").strip()
        if not text or text == QgsProcessing.TEMPORARY_OUTPUT or \
                text.startswith(("memory:", "ogr:", "postgres", "spatialite:")) or "://" in text:
            return ""
        path = text.split("|")[0]
        if not Path(path).suffix and hasattr(definition, "defaultFileExtension"):
            path = f"{path}.{definition.defaultFileExtension()}"
        return os.path.abspath(path)

    def output_files(self, parameters: dict,
                     context: QgsProcessingContext) -> list[tuple[str, bool]]:
        """(path, written in place) of every file output this run will write (temporary
        outputs excepted: QGIS gives them fresh names in its own folder)."""
        files: list[tuple[str, bool]] = []
        for definition in self.destinationParameterDefinitions():
            path = self.destination_path(parameters, definition, context)
            if path:
                in_place = isinstance(definition, QgsProcessingParameterFeatureSink)
                files.append((path, in_place))
        return files

    def output_extensions(self, definition) -> tuple[str, ...] | None:
        """The extensions an output parameter accepts (None: any)."""
        if isinstance(definition, QgsProcessingParameterRasterDestination):
            return RASTER_EXTENSIONS
        if isinstance(definition, QgsProcessingParameterVectorDestination):
            return VECTOR_EXTENSIONS
        return None

    def replaceable_geopackage(self, path: Path) -> bool:
        """May this run replace the existing GeoPackage ``path``? Only when it holds nothing but
        the layer this algorithm writes there (named after the file)."""
        layers = outputs.geopackage_layers(path)
        if layers is None:  # not a GeoPackage GDAL can read: only an empty file may go
            return path.stat().st_size == 0
        return set(layers) <= {path.stem}

    def _check_outputs(self, parameters, context, inputs: list[Path],
                       files: list[tuple[str, bool]]) -> None:
        destinations = {}
        for definition in self.destinationParameterDefinitions():
            path = self.destination_path(parameters, definition, context)
            if path:
                destinations[path] = definition
        probes: dict[Path, safe_files.FolderProbe] = {}
        identities: list[tuple[tuple, str]] = []
        for path_text, _ in files:
            path = Path(path_text)
            definition = destinations.get(path_text)
            description = definition.description() if definition is not None else path.name
            extensions = self.output_extensions(definition) if definition is not None else None
            if extensions and path.suffix.lower().lstrip(".") not in extensions:
                raise QgsProcessingException(
                    f"'{path}' ({description}): this output is written as "
                    f"{_format_name(extensions)}, so its file name must end in "
                    f"{' or '.join('.' + e for e in extensions)}. Rename the output."
                )
            probe = probes.get(path.parent)
            if probe is None:
                probe = outputs.probe_output_folder(path)
                probes[path.parent] = probe
            identity = safe_files.file_identity(path, probe.case_insensitive)
            for source in inputs:
                if safe_files.file_identity(source) == identity:
                    raise QgsProcessingException(
                        f"The output '{path}' ({description}) is the input '{source}': the run "
                        "would overwrite its own input. Choose another output file name."
                    )
            if path.is_dir():
                raise QgsProcessingException(f"'{path}' ({description}) is a folder; give a "
                                             "file name.")
            if path.exists() and not os.access(path, os.W_OK):
                raise QgsProcessingException(
                    f"Cannot replace '{path}' ({description}): the file is read-only."
                )
            if (path.suffix.lower() == ".gpkg" and path.is_file()
                    and not self.replaceable_geopackage(path)):
                layers = outputs.geopackage_layers(path)
                raise QgsProcessingException(
                    f"'{path}' ({description}) already exists and was not written by "
                    f"{self.display_name} ("
                    + (f"it holds the layers {', '.join(layers)}" if layers is not None
                       else "it is no GeoPackage GDAL can read")
                    + "). This algorithm replaces the whole file, so its contents would be "
                    "lost: choose another file name (or delete the file first)."
                )
            styled = isinstance(definition, (QgsProcessingParameterRasterDestination,
                                             QgsProcessingParameterVectorDestination))
            style = safe_files.file_identity(path.with_suffix(".qml"), probe.case_insensitive)
            for source in inputs if styled else []:
                if (source.with_suffix(".qml").exists()
                        and safe_files.file_identity(source.with_suffix(".qml")) == style):
                    raise QgsProcessingException(
                        f"The output '{path}' ({description}) would replace the style file "
                        f"'{source.with_suffix('.qml')}' of the input '{source}'. Choose "
                        "another output file name."
                    )
            # Layer outputs that differ only in the extension would share one .qml style.
            stem = (safe_files.file_identity(path.with_suffix(""), probe.case_insensitive)
                    if styled else None)
            for other_identity, other in identities:
                if other_identity[0] == identity or (stem is not None
                                                     and other_identity[1] == stem):
                    raise QgsProcessingException(
                        f"Two outputs name the same file: '{other}' and '{path}' (also when only "
                        "the extension differs, they would share a .qml style). Give each "
                        "output its own file name."
                    )
            identities.append(((identity, stem), str(path)))

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
