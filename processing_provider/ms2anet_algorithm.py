"""Processing algorithm: MS2A-Net clustering."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingParameterEnum,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from engine.ms2anet import CODE_CHANNELS, LEARNING_RATES, SETTINGS, MS2ANet
from engine.raster_io import read_grid
from processing_provider import outputs, styles
from processing_provider.base import HSIAlgorithm, OutputFiles

HELP = """
<p>Unsupervised clustering of a hyper- or multispectral raster with <b>MS2A-Net</b>, a
multiscale spectral-spatial association network: an autoencoder whose spatial stream (three 5x5
convolutions with dilation 1, 2 and 4) gives a 36-d code of every pixel, and whose
spectral-association stream helps reconstruct the image. The code is clustered with k-means.</p>
<p>Every valid pixel is clustered; nodata pixels (and bands that are entirely nodata) are left
out of training and k-means and written as 0. The cluster raster has the input's grid and CRS,
values 1..k and a paletted style.</p>
<p><b>Setting.</b> <i>adaptive</i> (default): Adam at 1e-2 (the paper's 1e-3 stops far from the
network's objective in 800 iterations), and k-means on the standardised spectra beside the code,
the code's share of the variance set by the scene: half the mean correlation between a pixel's
spectrum and those of the pixels the code mixes in (logged). Where neighbours differ (fine
structures, mixed pixels) the spectra lead; where they are alike the code's context counts up to
as much as the spectra. <i>paper</i>: the published configuration (Adam 1e-3, constant, k-means
on the 36-d code).</p>
<p><b>Parameters.</b> <i>lambda</i> weighs the spectral-mean constraint (0.1 in the paper).
<i>Iterations</i>: Adam steps (800 in the paper); the weights with the lowest loss are kept.
<i>Learning rate</i> (advanced, empty = the setting's: 1e-2 adaptive, 1e-3 paper).
<i>Training sample size</i> (pixels, default 65,536 = 256 x 256): a scene with at most this
many pixels trains in one piece, as in the paper; a larger scene trains on one random crop
(area) of about this many pixels per iteration, so training time and memory stay bounded
whatever the scene size (a larger sample: slower, closer to the paper).
The cluster raster is computed tile by tile with an 8-pixel halo, so tiling does not change it.
</p>
<p><b>Outputs.</b> Optionally the 36-band code (the clustering features) and a model file
(.pt) that <i>Apply clustering model</i> applies to other rasters of the same band layout.</p>
<p>Reference: Rafiezadeh Shahi, K., Ghamisi, P., Rasti, B., Scheunders, P., Gloaguen, R.,
"Unsupervised Hyperspectral Image Clustering Using a Multiscale Spectral-Spatial Association
Network", IEEE Journal of Selected Topics in Applied Earth Observations and Remote Sensing, 2022,
doi:10.1109/JSTARS.2022.3198137.</p>
"""


class MS2ANetClusteringAlgorithm(HSIAlgorithm):
    N_CLUSTERS = "N_CLUSTERS"
    SETTING = "SETTING"
    LAMBDA = "LAMBDA"
    ITERATIONS = "ITERATIONS"
    LEARNING_RATE = "LEARNING_RATE"
    TRAINING_PIXELS = "TRAINING_PIXELS"
    OUTPUT = "OUTPUT"
    OUTPUT_FEATURES = "OUTPUT_FEATURES"
    OUTPUT_MODEL = "OUTPUT_MODEL"

    algorithm_id = "ms2anet"
    display_name = "MS2A-Net clustering"
    help_text = HELP
    extra_tags = ("ms2a-net", "ms2anet", "clustering", "deep clustering", "autoencoder",
                  "k-means", "classification", "segmentation")

    def define_parameters(self) -> None:
        self.add_input_raster()
        self.add_integer(self.N_CLUSTERS, "Number of clusters", 5, 2, 1000)
        self.add_band_selection()
        self.addParameter(QgsProcessingParameterEnum(
            self.SETTING, "Setting (adaptive, or the paper's configuration)",
            options=list(SETTINGS), defaultValue=0,
        ))
        self.add_double(self.LAMBDA, "lambda: weight of the spectral-mean constraint", 0.1, 0.0)
        self.add_integer(self.ITERATIONS, "Training iterations", 800, 1, 100_000)
        # Optional: empty means the setting's learning rate.
        learning_rate = QgsProcessingParameterNumber(
            self.LEARNING_RATE,
            "Learning rate (empty: the setting's, "
            + ", ".join(f"{LEARNING_RATES[name]:g} {name}" for name in SETTINGS) + ")",
            QgsProcessingParameterNumber.Double, None, True, 1e-7, 1.0,
        )
        learning_rate.setFlags(learning_rate.flags() | QgsProcessingParameterNumber.FlagAdvanced)
        self.addParameter(learning_rate)
        self.add_integer(self.TRAINING_PIXELS, "Training sample size (pixels)", 65536, 64,
                         advanced=True)
        self.add_seed_and_device()
        self.add_raster_output(self.OUTPUT, "Clusters")
        self.add_raster_output(self.OUTPUT_FEATURES, f"MS2A-Net code ({CODE_CHANNELS} bands)",
                               optional=True)
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_MODEL, "Model file", "MS2A-Net model (*.pt)", optional=True,
            createByDefault=False,
        ))

    def run_algorithm(self, parameters, context, feedback, monitor,
                      written: OutputFiles) -> dict[str, Any]:
        label_path = self.output_path(parameters, self.OUTPUT, context)
        features_path = self.output_path(parameters, self.OUTPUT_FEATURES, context)
        model_path = (self.parameterAsFileOutput(parameters, self.OUTPUT_MODEL, context)
                      if parameters.get(self.OUTPUT_MODEL) else "")
        for path in (label_path, features_path, model_path):
            if path:
                outputs.check_writable(path)

        raster = self.read_input(parameters, context, monitor.stage(0.0, 0.02))
        source_path = self.input_raster_path(parameters, context)
        n_clusters = self.parameterAsInt(parameters, self.N_CLUSTERS, context)
        learning_rate = parameters.get(self.LEARNING_RATE)
        model = MS2ANet(
            n_clusters=n_clusters,
            setting=SETTINGS[self.parameterAsEnum(parameters, self.SETTING, context)],
            lam=self.parameterAsDouble(parameters, self.LAMBDA, context),
            iterations=self.parameterAsInt(parameters, self.ITERATIONS, context),
            learning_rate=(None if learning_rate in (None, "") else
                           self.parameterAsDouble(parameters, self.LEARNING_RATE, context)),
            training_pixels=self.parameterAsInt(parameters, self.TRAINING_PIXELS, context),
            seed=self.seed(parameters, context),
            device=self.device(parameters, context),
        )
        # The band count of the file (not of the kept bands) is what an applied model checks.
        source_band_count = _band_count(source_path)
        result = model.fit(raster.cube, raster.valid, monitor.stage(0.02, 0.95),
                           band_numbers=raster.band_numbers,
                           source_band_count=source_band_count,
                           return_features=bool(features_path),
                           band_names=raster.band_names)
        feedback.pushInfo(
            f"Kept the weights of iteration {result.chosen_iteration} (lowest loss "
            f"{min(result.loss_history):.5f}); "
            + ", ".join(f"{stage} {sec:.1f} s" for stage, sec in result.seconds.items())
        )

        source = self.input_layer_name(parameters, context)
        results: dict[str, Any] = {}
        results[self.OUTPUT] = self.write_labels(label_path, result.labels, raster.grid,
                                                 n_clusters, written, feedback=feedback)
        self.style_output(label_path, self.OUTPUT, styles.style_clusters(n_clusters),
                          f"MS2A-Net clusters ({source})")
        if features_path:
            results[self.OUTPUT_FEATURES] = self.write_float_stack(
                features_path, result.features, raster.valid, raster.grid,
                [f"MS2A-Net code {j}" for j in range(1, CODE_CHANNELS + 1)], written,
            )
            self.style_output(features_path, self.OUTPUT_FEATURES, styles.style_image((1, 2, 3)),
                              f"MS2A-Net code ({source})")
        monitor.check()
        if model_path:
            written.add(model_path)
            model.save(model_path)
            results[self.OUTPUT_MODEL] = model_path
        monitor.progress(1.0)
        return results


def _band_count(path: str) -> int:
    import rasterio

    read_grid(path)  # gives the project's clear error for a file GDAL cannot read
    with rasterio.open(path) as dataset:
        return dataset.count
