"""HSI Cluster science core: pure numpy/torch/rasterio, never imports QGIS."""
