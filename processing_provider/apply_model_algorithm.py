"""Processing algorithm: apply a saved clustering model to a raster, tile by tile."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsProcessingParameterEnum, QgsProcessingParameterFile

from engine.device import DEVICE_CHOICES
from engine.ms2anet import ALGORITHM_NAME as MS2ANET
from engine.ms2anet import MS2ANet, predict_raster, read_model_file
from processing_provider import outputs
from processing_provider.base import HSIAlgorithm, OutputFiles

HELP = """
<p>Applies a clustering model saved by <i>MS2A-Net clustering</i> (its <i>Model file</i> output)
to a raster: every valid pixel gets the cluster of its nearest k-means centre in the model's
learned feature space, so clusters keep their numbers from raster to raster. The raster must
have the band layout the model was trained on (same band count; the model's band selection is
used).</p>
<p>The raster is read and written tile by tile, so memory use does not grow with its size, and
the result equals clustering it in one piece. Nodata pixels are written as 0; the output has a
paletted style.</p>
<p>Only MS2A-Net models are supported for now. SCDSC cannot save a model yet; any other file
gives an error that says what it is.</p>
"""


class ApplyModelAlgorithm(HSIAlgorithm):
    MODEL = "MODEL"
    OUTPUT = "OUTPUT"

    algorithm_id = "applymodel"
    display_name = "Apply clustering model"
    help_text = HELP

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

    def run_algorithm(self, parameters, context, feedback, monitor,
                      written: OutputFiles) -> dict[str, Any]:
        label_path = self.output_path(parameters, self.OUTPUT, context)
        outputs.check_writable(label_path)
        model_path = self.parameterAsFile(parameters, self.MODEL, context)
        algorithm = read_model_file(model_path).get("algorithm")
        if algorithm != MS2ANET:
            raise ValueError(
                f"'{model_path}' is a model of the '{algorithm}' algorithm; only MS2A-Net "
                "models can be applied for now."
            )
        model = MS2ANet.load(model_path, device=self.device(parameters, context))
        source_path = self.input_raster_path(parameters, context)
        written.add(label_path)
        summary = predict_raster(model, source_path, label_path, monitor=monitor.stage(0.0, 0.97))
        outputs.paletted_style(label_path, model.n_clusters)
        feedback.pushInfo(
            f"{summary.n_valid} valid pixels clustered in {summary.seconds:.1f} s; cluster "
            "sizes " + ", ".join(str(size) for size in summary.cluster_sizes)
        )
        monitor.progress(1.0)
        return {self.OUTPUT: label_path}
