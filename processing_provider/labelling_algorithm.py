"""Processing algorithm: build the graph-labelling embedding (segments, chips, UMAP) as a
GeoPackage for interactive labelling."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBand,
    QgsProcessingParameterEnum,
    QgsProcessingParameterVectorDestination,
)

from engine.gnn import GNN_CHOICES
from engine.graph_labelling import GraphLabelling
from processing_provider import outputs, styles
from processing_provider.base import HSIAlgorithm, OutputFiles
from processing_provider.labelling_outputs import (
    CHIPS_LAYER,
    SEGMENTS_LAYER,
    layer_uri,
    write_labelling_geopackage,
    wrote_labelling_geopackage,
)

GNN_LABELS = {"gcn": "GCN (graph convolution, best in the paper)",
              "gatv2": "GATv2 (graph attention)"}

# Band-centre wavelengths (nm) the RGB guess looks for: Sentinel-2 B4, B3, B2.
RGB_WAVELENGTHS_NM = (665.0, 560.0, 490.0)
WAVELENGTH_TOLERANCE_NM = 40.0
# Sentinel-2 band names of red, green and blue (also Landsat 8/9's).
RGB_SENTINEL2_NAMES = ("4", "3", "2")

HELP = """
<p>Builds the embedding of the <b>graph-based labelling tool</b>: the scene is cut into chips,
each chip into SLIC segments, and every segment gets a position in a 2-d map (UMAP) such that
segments of similar content <i>and similar surroundings</i> lie close together. Label the
segments (or whole chips) of one region of that map at once, in the HSI Cluster dock widget or
in the attribute table.</p>
<p>Pipeline: fuzzy c-means on all selected bands gives soft targets (C clusters); a U-Net trained
on the chips against those memberships gives 64 activation maps per pixel; SLIC on the three RGB
bands gives about <i>segments per chip</i> segments per chip; each segment is a graph node whose
features are the mean activations inside it, linked to its <i>k</i> geographically nearest
segments; a 3-layer GNN (GCN or GATv2) trained against the segments' mean memberships gives the
embedding (output of layer 2), which UMAP projects to 2-d. Chips are compared by
Hungarian-matched segment embeddings, and the chip x chip similarity is projected by UMAP too.
</p>
<p><b>RGB bands.</b> SLIC segments the RGB bands only, as in the paper. Left empty, they are
guessed from the band descriptions: the words red/green/blue, then centre wavelengths near 665,
560 and 490 nm (e.g. "B4 (665 nm)"), then Sentinel-2 band names B4, B3, B2; otherwise the 3rd,
2nd and 1st of the used bands (bands 3, 2, 1 of the file without a band selection). The RGB
bands must be among the selected bands.</p>
<p><b>Laptop-size U-Net.</b> The paper's U-Net (5 levels, 64 to 1024 kernels, 31 M parameters)
trained for hours on a desktop GPU. The defaults here are a smaller U-Net (see <i>U-Net
depth</i> and <i>U-Net width</i>: {depth} down-sampling steps, {width} kernels in the first
level, doubling per level) and few epochs, so a Sentinel-2 scene of about a million pixels runs
in minutes on a laptop CPU; the activations are averaged per segment anyway, so a deeper decoder
adds little. The chip size must be at least 2^depth pixels. Raise depth, width and epochs when a
GPU is available.</p>
<p><b>Output</b>: one GeoPackage, in the raster's CRS, with the layers
<ul>
<li><i>segments</i> (the Segments output): one (multi)polygon per segment with
<code>segment_id</code>, <code>chip_id</code>, <code>n_pixels</code>, the 2-d embedding
<code>umap_x</code>/<code>umap_y</code>, the fuzzy c-means cluster of largest mean membership
<code>fcm_cluster</code> (1..C), an empty text field <code>label</code> for your labels, and
<code>area</code> (square metres on the ellipsoid for a geographic CRS, else CRS units
squared);</li>
<li><i>chips</i> (the Chips output): one polygon per chip with its 2-d chip embedding
<code>umap_x</code>/<code>umap_y</code> (empty for a chip without segments) and
<code>n_segments</code>;</li>
<li><i>segment_embeddings</i>: the full GNN embedding of each segment (<code>e0</code>...);</li>
<li><i>chip_neighbours</i>: each chip's most similar chips and their matched similarity;</li>
<li><i>hsi_cluster_metadata</i>: source raster, parameters, CRS, date and plugin version.</li>
</ul></p>
<p>Nodata pixels belong to no segment. The same seed gives the same embedding on the same
machine.</p>
<p>Reference: "Leveraging Convolutional and Graph Networks for an Unsupervised Remote Sensing
Labelling Tool" (graph-based labelling tool for Sentinel-2 imagery), 2025.</p>
"""


def _engine_default(name: str):
    """A default of GraphLabelling's constructor: one place decides the defaults."""
    return inspect.signature(GraphLabelling.__init__).parameters[name].default


def guess_rgb_bands(band_numbers: Sequence[int], band_names: Sequence[str]) -> tuple[int, int, int]:
    """Red, green, blue band numbers (of the file) guessed from the band descriptions.

    In order: the words red/green/blue (not "red edge"); centre wavelengths within 40 nm of
    665/560/490 nm; Sentinel-2 names B4/B3/B2; else the 3rd, 2nd and 1st band given.
    """
    if len(band_numbers) < 3:
        raise ValueError(f"SLIC needs three RGB bands; only {len(band_numbers)} band(s) given.")
    names = [name.lower() for name in band_names]

    def by_word(word: str) -> int | None:
        hits = [band for band, name in zip(band_numbers, names)
                if re.search(rf"\b{word}\b", name) and "edge" not in name]
        return hits[0] if len(hits) == 1 else None

    def by_wavelength(target: float) -> int | None:
        best, best_distance = None, WAVELENGTH_TOLERANCE_NM
        for band, name in zip(band_numbers, names):
            for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(nm|µm|um|micrometers?)\b", name):
                nanometres = float(value) * (1.0 if unit == "nm" else 1000.0)
                if abs(nanometres - target) <= best_distance:
                    best, best_distance = band, abs(nanometres - target)
        return best

    def by_sentinel2_name(number: str) -> int | None:
        hits = [band for band, name in zip(band_numbers, names)
                if re.search(rf"(^|[^a-z0-9])b0?{number}($|[^a-z0-9])", name)]
        return hits[0] if len(hits) == 1 else None

    for rule, keys in ((by_word, ("red", "green", "blue")),
                       (by_wavelength, RGB_WAVELENGTHS_NM),
                       (by_sentinel2_name, RGB_SENTINEL2_NAMES)):
        found = [rule(key) for key in keys]
        if all(band is not None for band in found) and len(set(found)) == 3:
            return found[0], found[1], found[2]
    return band_numbers[2], band_numbers[1], band_numbers[0]


def plugin_version() -> str:
    metadata = Path(__file__).resolve().parent.parent / "metadata.txt"
    try:
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if line.startswith("version="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


class LabellingEmbeddingAlgorithm(HSIAlgorithm):
    RED = "RED_BAND"
    GREEN = "GREEN_BAND"
    BLUE = "BLUE_BAND"
    N_FCM_CLUSTERS = "N_FCM_CLUSTERS"
    CHIP_SIZE = "CHIP_SIZE"
    SEGMENTS_PER_CHIP = "SEGMENTS_PER_CHIP"
    COMPACTNESS = "COMPACTNESS"
    N_NEIGHBOURS = "N_NEIGHBOURS"
    GNN = "GNN"
    UNET_DEPTH = "UNET_DEPTH"
    UNET_WIDTH = "UNET_WIDTH"
    UNET_EPOCHS = "UNET_EPOCHS"
    GNN_EPOCHS = "GNN_EPOCHS"
    SEGMENTS = "SEGMENTS"
    CHIPS = "CHIPS"

    algorithm_id = "labellingembedding"
    display_name = "Build labelling embedding"
    group_name = "Labelling"
    group_id = "labelling"
    extra_tags = ("labelling", "labeling", "annotation", "umap", "embedding", "graph",
                  "gnn", "gcn", "gatv2", "u-net", "slic", "segments", "superpixels",
                  "fuzzy c-means", "sentinel-2", "clustering")

    @property
    def help_text(self) -> str:  # the base class reflows it into shortHelpString
        return HELP.format(depth=_engine_default("unet_depth"),
                           width=_engine_default("unet_width"))

    def define_parameters(self) -> None:
        self.add_input_raster()
        self.add_band_selection()
        for name, colour in ((self.RED, "Red"), (self.GREEN, "Green"), (self.BLUE, "Blue")):
            self.addParameter(QgsProcessingParameterBand(
                name, f"{colour} band for SLIC (guessed from band descriptions when empty)",
                None, self.INPUT, optional=True,
            ))
        self.add_integer(self.N_FCM_CLUSTERS, "Number of fuzzy c-means clusters (C)",
                         _engine_default("n_fcm_clusters"), 2, 255)
        self.add_integer(self.CHIP_SIZE, "Chip size (pixels)", _engine_default("chip_size"), 1)
        self.add_integer(self.SEGMENTS_PER_CHIP, "SLIC segments per chip",
                         _engine_default("segments_per_chip"), 1)
        self.add_double(self.COMPACTNESS, "SLIC compactness", _engine_default("compactness"),
                        1e-6, advanced=True)
        self.add_integer(self.N_NEIGHBOURS, "Spatial neighbours per segment (k)",
                         _engine_default("n_neighbours"), 1, 1000)
        self._add(QgsProcessingParameterEnum(
            self.GNN, "Graph neural network",
            options=[GNN_LABELS.get(kind, kind) for kind in GNN_CHOICES],
            defaultValue=GNN_CHOICES.index(_engine_default("gnn")),
        ), advanced=False)
        self.add_integer(self.UNET_DEPTH, "U-Net depth (down-sampling steps)",
                         _engine_default("unet_depth"), 1, 8, advanced=True)
        self.add_integer(self.UNET_WIDTH, "U-Net width (kernels in the first level)",
                         _engine_default("unet_width"), 1, 1024, advanced=True)
        self.add_integer(self.UNET_EPOCHS, "U-Net training epochs",
                         _engine_default("unet_epochs"), 1, 100_000, advanced=True)
        self.add_integer(self.GNN_EPOCHS, "GNN training epochs",
                         _engine_default("gnn_epochs"), 1, 100_000, advanced=True)
        self.add_seed_and_device()
        segments = QgsProcessingParameterVectorDestination(
            self.SEGMENTS, "Segments (GeoPackage with the segments, chips and embedding layers)",
            QgsProcessing.TypeVectorPolygon,
        )
        segments.setSupportsNonFileBasedOutput(False)  # several layers: a file, not memory
        self.addParameter(segments)
        self.addOutput(QgsProcessingOutputVectorLayer(
            self.CHIPS, "Chips (layer 'chips' of the Segments GeoPackage)",
            QgsProcessing.TypeVectorPolygon,
        ))

    def replaceable_geopackage(self, path: Path) -> bool:
        """Only a GeoPackage this algorithm wrote (its metadata table says so) is replaced."""
        return wrote_labelling_geopackage(path, f"hsicluster:{self.algorithm_id}")

    # ---------------------------------------------------------------- run
    def _rgb_cube_indices(self, parameters: dict, context: QgsProcessingContext,
                          band_numbers: list[int], band_names: list[str]) -> tuple[int, int, int]:
        """0-based positions in the cube of the red, green and blue bands."""
        guessed = guess_rgb_bands(band_numbers, band_names)
        chosen = []
        for name, guess in zip((self.RED, self.GREEN, self.BLUE), guessed):
            value = parameters.get(name)
            chosen.append(self.parameterAsInt(parameters, name, context)
                          if value not in (None, "") else guess)
        missing = [band for band in chosen if band not in band_numbers]
        if missing:
            raise ValueError(
                f"RGB band(s) {missing} are not among the bands used ({band_numbers}): add them "
                "to the band selection, or choose other red/green/blue bands (bands that are "
                "entirely nodata are left out)."
            )
        return tuple(band_numbers.index(band) for band in chosen)

    def run_algorithm(self, parameters, context, feedback, monitor,
                      written: OutputFiles) -> dict[str, Any]:
        path = self.output_path(parameters, self.SEGMENTS, context)
        if not path.lower().endswith(".gpkg"):
            raise ValueError(
                f"The Segments output '{path}' is not a GeoPackage: this algorithm writes one "
                ".gpkg file with several layers. Save it to a file ending in .gpkg."
            )
        outputs.check_writable(path)

        raster = self.read_input(parameters, context, monitor.stage(0.0, 0.02))
        rgb = self._rgb_cube_indices(parameters, context, raster.band_numbers,
                                     raster.band_names)
        feedback.pushInfo("SLIC on bands " + ", ".join(
            f"{raster.band_numbers[i]} ({raster.band_names[i]})" for i in rgb))
        settings = {
            "n_fcm_clusters": self.parameterAsInt(parameters, self.N_FCM_CLUSTERS, context),
            "chip_size": self.parameterAsInt(parameters, self.CHIP_SIZE, context),
            "segments_per_chip": self.parameterAsInt(parameters, self.SEGMENTS_PER_CHIP, context),
            "compactness": self.parameterAsDouble(parameters, self.COMPACTNESS, context),
            "n_neighbours": self.parameterAsInt(parameters, self.N_NEIGHBOURS, context),
            "gnn": GNN_CHOICES[self.parameterAsEnum(parameters, self.GNN, context)],
            "unet_depth": self.parameterAsInt(parameters, self.UNET_DEPTH, context),
            "unet_width": self.parameterAsInt(parameters, self.UNET_WIDTH, context),
            "unet_epochs": self.parameterAsInt(parameters, self.UNET_EPOCHS, context),
            "gnn_epochs": self.parameterAsInt(parameters, self.GNN_EPOCHS, context),
            "seed": self.seed(parameters, context),
            "device": self.device(parameters, context),
        }
        result = GraphLabelling(**settings).fit(raster.cube, raster.valid, rgb,
                                                monitor=monitor.stage(0.02, 0.9))
        seconds = result.diagnostics.get("seconds", {})
        feedback.pushInfo(
            f"{result.n_segments} segments in {result.n_chips} chips; "
            + ", ".join(f"{stage} {sec:.1f} s" for stage, sec in seconds.items())
        )
        monitor.check()

        crs = (QgsCoordinateReferenceSystem.fromWkt(raster.crs_wkt) if raster.crs_wkt
               else QgsCoordinateReferenceSystem())
        metadata = {
            "source": raster.source_path,
            "bands": json.dumps(raster.band_numbers),
            "rgb_bands": json.dumps([raster.band_numbers[i] for i in rgb]),
            "parameters": json.dumps(settings, sort_keys=True),
            "crs": crs.authid() or crs.toWkt(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "engine_version": plugin_version(),  # the engine ships with the plugin
            "algorithm": f"hsicluster:{self.algorithm_id}",
        }
        written.add(path)
        write_labelling_geopackage(path, result, raster.grid, metadata,
                                   monitor.stage(0.9, 1.0))
        segments_uri, chips_uri = layer_uri(path, SEGMENTS_LAYER), layer_uri(path, CHIPS_LAYER)
        for uri, style, name in ((segments_uri, styles.style_segments(), SEGMENTS_LAYER),
                                 (chips_uri, styles.style_chips(), CHIPS_LAYER)):
            problem = styles.save_default_style(uri, style, name)
            if problem:
                feedback.pushWarning(f"The default style of '{name}' was not saved: {problem}")
        self._load_layers_on_completion(context, path, segments_uri, chips_uri)
        source = self.input_layer_name(parameters, context)
        self.style_output(segments_uri, self.SEGMENTS, styles.style_segments(),
                          f"Segments ({source})")
        self.style_output(chips_uri, self.CHIPS, styles.style_chips(), f"Chips ({source})")
        # The image under the segments, in the colours SLIC saw, when the plugin adds it.
        self._input_image = (raster.source_path, source,
                             [raster.band_numbers[i] for i in rgb])
        return {self.SEGMENTS: segments_uri, self.CHIPS: chips_uri}

    def _load_layers_on_completion(self, context: QgsProcessingContext, path: str,
                                   segments_uri: str, chips_uri: str) -> None:
        """Load the two polygon layers by name: the bare .gpkg path would load whichever layer
        OGR lists first."""
        if not context.willLoadLayerOnCompletion(path):
            return
        layers = context.layersToLoadOnCompletion()
        details = layers.pop(path)
        layers[segments_uri] = details
        # Named like the CHIPS output, so that the name is replaced by "Chips (<input>)" in
        # postProcessAlgorithm, as for every output that has QGIS's default name.
        layers[chips_uri] = QgsProcessingContext.LayerDetails(
            self.CHIPS, details.project, self.CHIPS,
        )
        context.setLayersToLoadOnCompletion(layers)

    def postProcessAlgorithm(self, context: QgsProcessingContext,  # noqa: N802 - Qt naming
                             feedback) -> dict[str, Any]:
        """Runs in the main thread: add the input image below the segments when the segments
        are loaded and the image is not in the project yet."""
        image = getattr(self, "_input_image", None)
        self._input_image = None
        if image is not None:
            self._load_input_image(context, *image)
        return super().postProcessAlgorithm(context, feedback)

    def _load_input_image(self, context: QgsProcessingContext, source_path: str, name: str,
                          rgb_bands: list[int]) -> None:
        segments = [key for key in context.layersToLoadOnCompletion()
                    if key.endswith(f"layername={SEGMENTS_LAYER}")]
        if not segments:
            return
        project = context.layerToLoadOnCompletionDetails(segments[0]).project
        if project is None or any(
                _same_file(layer.source(), source_path) for layer in project.mapLayers().values()):
            return
        if context.willLoadLayerOnCompletion(source_path):
            return
        context.addLayerToLoadOnCompletion(source_path, QgsProcessingContext.LayerDetails(
            name, project, self.INPUT))
        self.style_output(source_path, self.INPUT, styles.style_image(rgb_bands), name,
                          move_to_bottom=True)


def _same_file(source: str, path: str) -> bool:
    try:
        return Path(source.split("|", 1)[0]).resolve() == Path(path).resolve()
    except (OSError, ValueError):
        return False
