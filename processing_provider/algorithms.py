"""The list of algorithms the provider offers."""

from __future__ import annotations

from qgis.core import QgsProcessingAlgorithm


def all_algorithms() -> list[QgsProcessingAlgorithm]:
    from processing_provider.evaluate_algorithm import EvaluateClusteringAlgorithm
    from processing_provider.scdsc_algorithm import SCDSCClusteringAlgorithm

    return [SCDSCClusteringAlgorithm(), EvaluateClusteringAlgorithm()]
