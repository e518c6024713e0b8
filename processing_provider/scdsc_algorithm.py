"""Processing algorithm: SCDSC clustering."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFileDestination,
)

from engine.raster_io import pixel_size_metres
from engine.resources import available_memory_bytes, largest_scdsc_pixels, scdsc_peak_bytes
from engine.scdsc import SCDSC
from engine.scdsc_model import save_scdsc_model
from processing_provider import outputs, styles
from processing_provider.base import HSIAlgorithm, OutputFiles

SMOOTHING_WINDOWS = (3, 7)
SETTINGS = ("adaptive", "paper")  # engine.scdsc.SETTINGS, in the enum's order

HELP = """
<p>Unsupervised clustering of a hyper- or multispectral raster with <b>SCDSC</b>, scalable
context-preserving deep subspace clustering: a convolutional autoencoder learns a latent code of
each pixel's 7x7 neighbourhood, each cluster is a learned 5-d subspace of that code, and two
structure terms guide training: pixels of the same FINCH mini-cluster (spectrally similar, even
far apart) should share an assignment, and neighbouring pixels should agree (spatial smoothing of
the soft assignments).</p>
<p>Every valid pixel is clustered; nodata pixels (and bands that are entirely nodata) are left
out and written as 0. The cluster raster has the input's grid and CRS, values 1..k and a
paletted style.</p>
<p><b>Setting.</b> <i>adaptive</i> (default) fits the context to the scene: the input keeps the
standardised bands' geometry (principal components holding 99.9% of their variance, at least 8,
on one common scale, not whitened), the context scale (latent patch, smoothing window and
mini-cluster patches, 1x1 up to the paper's 7x7) is chosen from the scene (at most 50 m of
ground when the pixel size is known, so 1x1 for 20-30 m pixels, and no wider than its
semivariogram allows) and written to the log, neighbours count by their spectral similarity
(so thin roads and rivers survive), clusters start from k-means on the input spectra and the
refined target keeps the initial cluster shares instead of pulling every cluster to the same
size. <i>paper</i> is the
published configuration exactly (8 whitened components, 7x7 patch and smoothing, 17x17 FINCH
patches, DEC's target). In the adaptive setting the patch size and smoothing window below are
ignored (they are chosen from the scene).</p>
<p><b>Parameters.</b> <i>Patch size</i>: the neighbourhood of the latent code (7 in the paper).
<i>Smoothing window</i>: 3 or 7 (the paper uses 3 for Houston, 7 otherwise). <i>beta1</i>
weighs the mini-cluster term (3 in all the paper's experiments), <i>beta2</i> the spatial term
(1 to 8 in the paper). <i>Epochs</i>: joint training epochs (400 in the paper); scenes larger
than the batch train on random tiles per epoch. The epoch kept is the one with the largest share
of confident pixels (max soft assignment above 0.9), as in the reference code; no labels are
used.</p>
<p><b>Model file</b> (optional): saves the trained network, subspace bases and band scaling, so
<i>Apply clustering model</i> can map another raster with the same bands into the same clusters
(for example: train on a crop, map the whole scene).</p>
<p>Reference: Li, X. et al., "Scalable Context-Preserving Model-Aware Deep Clustering for
Hyperspectral Images", Remote Sensing 17(24), 4030, 2025, doi:10.3390/rs17244030.</p>
"""


class SCDSCClusteringAlgorithm(HSIAlgorithm):
    N_CLUSTERS = "N_CLUSTERS"
    SETTING = "SETTING"
    PATCH_SIZE = "PATCH_SIZE"
    SMOOTHING_WINDOW = "SMOOTHING_WINDOW"
    BETA1 = "BETA1"
    BETA2 = "BETA2"
    EPOCHS = "EPOCHS"
    LEARNING_RATE = "LEARNING_RATE"
    PRETRAIN_STEPS = "PRETRAIN_STEPS"
    OUTPUT = "OUTPUT"
    OUTPUT_SOFT = "OUTPUT_SOFT"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"
    OUTPUT_MODEL = "OUTPUT_MODEL"

    algorithm_id = "scdsc"
    display_name = "SCDSC clustering"
    help_text = HELP
    extra_tags = ("scdsc", "clustering", "deep clustering", "subspace clustering",
                  "autoencoder", "finch", "classification", "segmentation")

    def define_parameters(self) -> None:
        self.add_input_raster()
        self.add_integer(self.N_CLUSTERS, "Number of clusters", 5, 2, 1000)
        self.add_band_selection()
        self._add(QgsProcessingParameterEnum(
            self.SETTING, "Setting", options=["adaptive (fits the scene)", "paper (published)"],
            defaultValue=0,
        ), advanced=False)
        self.add_integer(self.PATCH_SIZE, "Patch size (odd)", 7, 1, 31, advanced=True)
        self._add(QgsProcessingParameterEnum(
            self.SMOOTHING_WINDOW, "Spatial smoothing window",
            options=[f"{w} x {w}" for w in SMOOTHING_WINDOWS], defaultValue=1,
        ), advanced=False)
        self.add_double(self.BETA1, "beta1: weight of the mini-cluster (non-local) term", 3.0, 0.0)
        self.add_double(self.BETA2, "beta2: weight of the spatial (local) term", 1.0, 0.0)
        self.add_integer(self.EPOCHS, "Training epochs", 400, 1, 100_000)
        self.add_double(self.LEARNING_RATE, "Learning rate", 1e-3, 1e-7, 1.0, advanced=True)
        self.add_integer(self.PRETRAIN_STEPS, "Autoencoder pretraining steps", 300, 0, 100_000,
                         advanced=True)
        self.add_seed_and_device()
        self.add_raster_output(self.OUTPUT, "Clusters")
        self.add_raster_output(self.OUTPUT_SOFT, "Soft assignments (k bands)", optional=True)
        self.add_vector_output(self.OUTPUT_POLYGONS, "Clusters as polygons", optional=True)
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_MODEL, "Model file (for Apply clustering model)", "SCDSC model (*.pt)",
            optional=True, createByDefault=False,
        ))

    def check_parameters(self, parameters, context) -> None:
        super().check_parameters(parameters, context)
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            return
        n_pixels = layer.width() * layer.height()
        n_bands = len(self.parameterAsInts(parameters, self.BANDS, context) or []) \
            or layer.bandCount()
        needed = scdsc_peak_bytes(n_pixels, n_bands)
        available = available_memory_bytes()
        if needed > available:
            largest = largest_scdsc_pixels(available, n_bands)
            raise QgsProcessingException(
                f"SCDSC on '{layer.name()}' ({n_pixels:,} pixels, {n_bands} bands) would need "
                f"about {needed / 2**30:.1f} GB of memory; {available / 2**30:.1f} GB are "
                f"available. Use a smaller Input raster (INPUT): clip it to at most about "
                f"{largest:,} pixels (Raster ▸ Extraction ▸ Clip Raster by Extent), train on "
                "the crop with a Model file, then map the whole scene with Apply clustering "
                "model, which works window by window."
            )

    def run_algorithm(self, parameters, context, feedback, monitor,
                      written: OutputFiles) -> dict[str, Any]:
        label_path = self.output_path(parameters, self.OUTPUT, context)
        soft_path = self.output_path(parameters, self.OUTPUT_SOFT, context)
        polygon_path = self.output_path(parameters, self.OUTPUT_POLYGONS, context)
        model_path = (self.parameterAsFileOutput(parameters, self.OUTPUT_MODEL, context)
                      if parameters.get(self.OUTPUT_MODEL) else "")
        for path in (label_path, soft_path, polygon_path, model_path):
            if path:
                outputs.check_writable(path)

        raster = self.read_input(parameters, context, monitor.stage(0.0, 0.02))
        n_clusters = self.parameterAsInt(parameters, self.N_CLUSTERS, context)
        window = SMOOTHING_WINDOWS[self.parameterAsEnum(parameters, self.SMOOTHING_WINDOW,
                                                        context)]
        setting = SETTINGS[self.parameterAsEnum(parameters, self.SETTING, context)]
        # The adaptive setting chooses patch and window from the scene.
        scene_sized = setting == "adaptive"
        model = SCDSC(
            n_clusters=n_clusters,
            setting=setting,
            patch_size=(None if scene_sized
                        else self.parameterAsInt(parameters, self.PATCH_SIZE, context)),
            smoothing_window=None if scene_sized else window,
            beta1=self.parameterAsDouble(parameters, self.BETA1, context),
            beta2=self.parameterAsDouble(parameters, self.BETA2, context),
            epochs=self.parameterAsInt(parameters, self.EPOCHS, context),
            learning_rate=self.parameterAsDouble(parameters, self.LEARNING_RATE, context),
            pretrain_steps=self.parameterAsInt(parameters, self.PRETRAIN_STEPS, context),
            seed=self.seed(parameters, context),
            device=self.device(parameters, context),
        )
        result = model.fit(raster.cube, raster.valid, monitor.stage(0.02, 0.97),
                           pixel_size_m=pixel_size_metres(raster.crs_wkt, raster.transform,
                                                          raster.height))
        feedback.pushInfo(
            f"Selected epoch {result.selected_epoch}: {result.confident_share:.1%} of pixels "
            f"assigned with max(s) > 0.9; {result.n_mini_clusters} mini-clusters; "
            + ", ".join(f"{stage} {sec:.1f} s" for stage, sec in result.seconds.items())
        )

        source = self.input_layer_name(parameters, context)
        results: dict[str, Any] = {}
        results[self.OUTPUT] = self.write_labels(label_path, result.labels, raster.grid,
                                                 n_clusters, written, feedback=feedback)
        self.style_output(label_path, self.OUTPUT, styles.style_clusters(n_clusters),
                          f"SCDSC clusters ({source})")
        if soft_path:
            results[self.OUTPUT_SOFT] = self.write_float_stack(
                soft_path, result.soft_assignments, raster.valid, raster.grid,
                [f"cluster {j} soft assignment" for j in range(1, n_clusters + 1)], written,
            )
            self.style_output(soft_path, self.OUTPUT_SOFT,
                              styles.style_soft_assignments(n_clusters),
                              f"SCDSC soft assignments ({source})")
        monitor.check()
        if polygon_path:
            written.add(polygon_path)
            count = outputs.polygonize_labels(label_path, polygon_path)
            feedback.pushInfo(f"{count} cluster polygons written")
            results[self.OUTPUT_POLYGONS] = polygon_path
            self.style_output(polygon_path, self.OUTPUT_POLYGONS,
                              styles.style_cluster_polygons(n_clusters),
                              f"SCDSC cluster polygons ({source})")
        if model_path:
            written.add(model_path)
            save_scdsc_model(model, model_path, raster.band_numbers,
                             source_band_count=raster.source_band_count)
            results[self.OUTPUT_MODEL] = model_path
        monitor.progress(1.0)
        return results
