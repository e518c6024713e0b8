"""QGIS Processing provider of HSI Cluster: thin algorithms that translate between QGIS and the
engine. Every algorithm derives from :class:`processing_provider.base.HSIAlgorithm`."""
