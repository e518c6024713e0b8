"""Opens the real *Evaluate clustering* dialog offscreen and feeds rasters to its widgets.

Run as a script (``python evaluate_dialog_probe.py REPO CLUSTERS POLYGONS``) by
``tests/test_processing_gui.py``: QGIS 3.22 crashed (SIGSEGV in
``QgsProcessingFieldWidgetWrapper::setParentLayerWrapperValue``) when the class field's parent
parameter held a raster, which would kill pytest itself, so the dialog lives in its own process
and the test reads its exit status. Prints one ``OK <step>`` line per step survived.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main(repo: str, clusters_path: str, polygons_path: str) -> int:
    sys.path.insert(0, repo)
    from qgis.core import (
        QgsApplication,
        QgsProcessingContext,
        QgsProject,
        QgsRasterLayer,
        QgsVectorLayer,
    )

    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], True)
    app.initQgis()
    sys.path.append("/usr/share/qgis/python/plugins")
    from processing.core.Processing import Processing
    from processing.gui.AlgorithmDialog import AlgorithmDialog
    from qgis.gui import QgsGui, QgsProcessingGui, QgsProcessingParameterWidgetContext

    Processing.initialize()
    from processing_provider.provider import HSIClusterProvider

    provider = HSIClusterProvider()
    QgsApplication.processingRegistry().addProvider(provider)

    project = QgsProject.instance()
    raster = QgsRasterLayer(clusters_path, "clusters", "gdal")
    polygons = QgsVectorLayer(polygons_path, "reference polygons", "ogr")
    assert raster.isValid() and polygons.isValid()
    # The raster first: a map-layer combo that must show a layer starts with the first one.
    project.addMapLayer(raster)
    project.addMapLayer(polygons)
    algorithm_id = "hsicluster:evaluateclustering"
    context = QgsProcessingContext()

    def step(name: str) -> None:
        app.processEvents()
        print(f"OK {name}", flush=True)

    # 1. The dialog as the toolbox opens it.
    dialog = AlgorithmDialog(QgsApplication.processingRegistry().createAlgorithmById(
        algorithm_id))
    dialog.show()
    step("dialog opened")
    wrappers = dialog.mainWidget().wrappers

    # 2. A raster chosen in every layer widget of the dialog (a widget that cannot take it
    # must refuse it, not crash), then the polygons where they belong.
    for name, wrapper in wrappers.items():
        parameter = dialog.algorithm().parameterDefinition(name)
        if parameter is not None and parameter.type() in ("raster", "vector", "layer",
                                                           "source"):
            wrapper.setParameterValue(raster, context)
            step(f"raster chosen as {name}")
    for name in ("REFERENCE_POLYGONS", "REFERENCE"):
        if name in wrappers:
            wrappers[name].setParameterValue(polygons, context)
            step(f"polygons chosen as {name}")
    dialog.close()

    # The batch dialog builds its own widgets for every row.
    from processing.gui.BatchAlgorithmDialog import BatchAlgorithmDialog

    batch = BatchAlgorithmDialog(QgsApplication.processingRegistry().createAlgorithmById(
        algorithm_id))
    batch.show()
    step("batch dialog opened")
    batch.close()

    # 3. Every parameter's widget built with the raster as QGIS's active layer (what the
    # dialog gets from iface.activeLayer() in desktop QGIS), then linked as the dialog does.
    algorithm = QgsApplication.processingRegistry().createAlgorithmById(algorithm_id)
    widget_context = QgsProcessingParameterWidgetContext()
    widget_context.setProject(project)
    widget_context.setActiveLayer(raster)
    registry = QgsGui.processingGuiRegistry()
    built, widgets = [], []
    for parameter in algorithm.parameterDefinitions():
        if parameter.isDestination() or parameter.flags() & parameter.FlagHidden:
            continue
        wrapper = registry.createParameterWidgetWrapper(parameter, QgsProcessingGui.Standard)
        if wrapper is None:
            continue
        wrapper.setWidgetContext(widget_context)
        widgets.append(wrapper.createWrappedWidget(context))
        built.append(wrapper)
    for wrapper in built:
        wrapper.postInitialize(built)
    step("widgets with a raster as active layer")
    for wrapper in built:
        if wrapper.parameterDefinition().type() in ("raster", "vector", "layer", "source"):
            wrapper.setParameterValue(raster, context)
            step(f"raster set on {wrapper.parameterDefinition().name()} (active-layer widgets)")
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
