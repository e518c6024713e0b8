"""Processing algorithm: apply a saved clustering model to a raster, tile by tile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from qgis.core import QgsProcessingParameterEnum, QgsProcessingParameterFile

from engine.cluster_stats import cluster_statistics_from_counts
from engine.device import DEVICE_CHOICES
from engine.model_file import read_model_file
from engine.ms2anet import ALGORITHM_NAME as MS2ANET
from engine.ms2anet import MS2ANet, predict_raster
from engine.raster_io import has_valid_pixel, read_grid
from engine.scdsc_model import ALGORITHM_NAME as SCDSC
from engine.scdsc_model import apply_scdsc_model
from processing_provider import outputs, styles
from processing_provider.base import HSIAlgorithm, OutputFiles

HELP = """
<p>Applies a clustering model saved by <i>MS2A-Net clustering</i> or <i>SCDSC clustering</i>
(their <i>Model file</i> output) to a raster: every valid pixel gets the cluster of the model,
so clusters keep their numbers from raster to raster (for example: train on a crop, map the
whole scene). The raster must have the band layout the model was trained on (same band count;
the model's band selection is used): another band count gives an error, band names that differ
from the training raster's a warning.</p>
<p>MS2A-Net models: the raster is read and written tile by tile with an 8-pixel overlap, so
memory use does not grow with its size and the result equals clustering it in one piece.
SCDSC models: the same, with a 5-pixel overlap (the 7x7 latent window and the encoder's two
3x3 convolutions), reflected at the raster edge as in training, so applying a model to the
raster it was trained on gives that run's labels. Nodata pixels are written as 0; the output has
a paletted style.</p>
<p>The kind of model is read from the file; a file that is no HSI Cluster model, or is damaged,
gives an error that says so.</p>
"""


class ApplyModelAlgorithm(HSIAlgorithm):
    MODEL = "MODEL"
    OUTPUT = "OUTPUT"

    algorithm_id = "applymodel"
    display_name = "Apply clustering model"
    help_text = HELP
    extra_tags = ("clustering", "model", "predict", "inference", "ms2a-net", "scdsc",
                  "classification")

    def define_parameters(self) -> None:
        self.add_input_raster()
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, "Model file", extension="pt",
        ))
        # No seed: applying a model draws nothing at random.
        self._add(QgsProcessingParameterEnum(
            self.DEVICE, "Device", options=list(DEVICE_CHOICES), defaultValue=0,
        ), advanced=True)
        self.add_raster_output(self.OUTPUT, "Clusters")

    def check_parameters(self, parameters, context) -> None:
        super().check_parameters(parameters, context)
        model_path = self.parameterAsFile(parameters, self.MODEL, context)
        header = read_model_file(model_path)  # schema-checked: a clear error for a bad file
        if header["algorithm"] not in (MS2ANET, SCDSC):
            raise ValueError(
                f"'{model_path}' is a model of the '{header['algorithm']}' algorithm; Apply "
                "clustering model applies MS2A-Net and SCDSC models."
            )
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        expected = header["source_band_count"]
        if layer is not None and layer.isValid() and layer.bandCount() != expected:
            raise ValueError(
                f"The model expects a raster with {expected} band(s) (the raster it was "
                f"trained on); the input '{layer.name()}' has {layer.bandCount()}. Apply the "
                "model to a raster of the same sensor and band layout."
            )

    def run_algorithm(self, parameters, context, feedback, monitor,
                      written: OutputFiles) -> dict[str, Any]:
        label_path = self.output_path(parameters, self.OUTPUT, context)
        outputs.check_writable(label_path)
        model_path = self.parameterAsFile(parameters, self.MODEL, context)
        header = read_model_file(model_path)
        kind = header["algorithm"]
        source_path = self.input_raster_path(parameters, context)
        bands = header["band_numbers"]
        if not has_valid_pixel(source_path, bands, monitor.stage(0.0, 0.0)):
            raise ValueError(
                f"'{source_path}' has no valid pixel in the model's bands: every pixel is nodata "
                "(or NaN/inf) in at least one of them. Check the raster's nodata value."
            )
        if kind == MS2ANET:
            model = MS2ANet.load(model_path, device=self.device(parameters, context))
            written.add(label_path)
            summary = predict_raster(model, source_path, label_path,
                                     monitor=monitor.stage(0.0, 0.97))
            n_clusters = model.n_clusters
            feedback.pushInfo(
                f"{summary.n_valid} valid pixels clustered in {summary.seconds:.1f} s; cluster "
                "sizes " + ", ".join(str(size) for size in summary.cluster_sizes)
            )
        elif kind == SCDSC:
            written.add(label_path)
            # bands=None: the model's own band selection.
            summary = apply_scdsc_model(model_path, source_path, label_path, None,
                                        monitor.stage(0.0, 0.97),
                                        device=self.device(parameters, context))
            n_clusters = _n_clusters(header, label_path)
            feedback.pushInfo(
                f"{summary.n_valid} valid pixels clustered in {summary.seconds:.1f} s; cluster "
                "sizes " + ", ".join(str(size) for size in summary.cluster_sizes)
            )
        else:
            raise ValueError(
                f"'{model_path}' is a model of the '{kind}' algorithm; Apply clustering model "
                "applies MS2A-Net and SCDSC models."
            )
        monitor.check()
        outputs.paletted_style(label_path, n_clusters)
        grid = read_grid(label_path)
        counts = (list(summary.cluster_sizes) + [0] * n_clusters)[:n_clusters]
        self.report_statistics(label_path, cluster_statistics_from_counts(
            counts, grid.transform, grid.crs_wkt), feedback)
        method = "MS2A-Net" if kind == MS2ANET else "SCDSC"
        self.style_output(label_path, self.OUTPUT, styles.style_clusters(n_clusters),
                          f"{method} clusters ({self.input_layer_name(parameters, context)}, "
                          f"model {Path(model_path).stem})")
        monitor.progress(1.0)
        return {self.OUTPUT: label_path}


def _n_clusters(header: dict, label_path: str) -> int:
    """k from the model header when it says, else the largest label (read block by block)."""
    for holder in (header, header.get("settings") or {}):
        value = holder.get("n_clusters") if isinstance(holder, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    largest = 0
    with rasterio.open(label_path) as dataset:
        for _, window in dataset.block_windows(1):
            largest = max(largest, int(np.max(dataset.read(1, window=window))))
    return max(largest, 1)
