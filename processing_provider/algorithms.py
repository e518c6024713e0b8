"""The list of algorithms the provider offers."""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm


def all_algorithms() -> list[QgsProcessingAlgorithm]:
    from processing_provider.apply_model_algorithm import ApplyModelAlgorithm
    from processing_provider.evaluate_algorithm import EvaluateClusteringAlgorithm
    from processing_provider.labelling_algorithm import LabellingEmbeddingAlgorithm
    from processing_provider.ms2anet_algorithm import MS2ANetClusteringAlgorithm
    from processing_provider.scdsc_algorithm import SCDSCClusteringAlgorithm

    return [SCDSCClusteringAlgorithm(), EvaluateClusteringAlgorithm(),
            MS2ANetClusteringAlgorithm(), ApplyModelAlgorithm(), LabellingEmbeddingAlgorithm()]
