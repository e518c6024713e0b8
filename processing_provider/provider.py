"""The HSI Cluster Processing provider (toolbox group, batch, modeler and qgis_process)."""

from __future__ import annotations

import traceback
from pathlib import Path

from qgis.core import Qgis, QgsMessageLog, QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from processing_provider.algorithms import all_algorithms

ICON_PATH = Path(__file__).resolve().parent.parent / "icon.svg"


class HSIClusterProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "hsicluster"

    def name(self) -> str:
        return "HSI Cluster"

    def longName(self) -> str:
        return "HSI Cluster: unsupervised mapping of hyperspectral and multispectral imagery"

    def icon(self) -> QIcon:
        for candidate in (ICON_PATH, Path(__file__).resolve().parent.parent
                          / "hsi_cluster_plugin" / "icon.svg"):
            if candidate.exists():
                return QIcon(str(candidate))
        return super().icon()

    def loadAlgorithms(self) -> None:
        # An exception escaping loadAlgorithms aborts qgis_process.bin (SIGABRT) and can take
        # the desktop down: log it instead, the toolbox then shows no HSI Cluster algorithms.
        try:
            algorithms = all_algorithms()
        except Exception:  # noqa: BLE001 - anything here must not reach Qt
            QgsMessageLog.logMessage(traceback.format_exc(), "HSI Cluster", Qgis.Critical)
            return
        for algorithm in algorithms:
            self.addAlgorithm(algorithm)

    def supportedOutputRasterLayerExtensions(self) -> list[str]:
        # Outputs are written by rasterio's GeoTIFF driver.
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:
        return ["gpkg"]
