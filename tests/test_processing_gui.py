"""What a desktop user meets (issue 12): the real dialogs, outputs loaded the way Processing
loads them (``handleAlgorithmResults``, through ``runAndLoadResults`` and through a
``QgsProcessingAlgRunnerTask`` as the algorithm dialog runs it), the help panel text, the
toolbox search, the outputs' statistics and the Python warnings on start.

Data are tiny (the 40x48 demo scene) and training short, so the module takes about a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr, osr

from engine.demo_scene import DemoScene, make_demo_scene
from engine.raster_io import read_labels

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "evaluate_dialog_probe.py"
K = 3
SCDSC_FAST = {"N_CLUSTERS": K, "EPOCHS": 5, "PRETRAIN_STEPS": 5, "SEED": 0, "DEVICE": 1}
MS2ANET_FAST = {"N_CLUSTERS": K, "ITERATIONS": 5, "SEED": 0, "DEVICE": 1}
LABELLING_FAST = {"N_FCM_CLUSTERS": 3, "CHIP_SIZE": 32, "SEGMENTS_PER_CHIP": 30,
                  "N_NEIGHBOURS": 4, "UNET_EPOCHS": 1, "GNN_EPOCHS": 2, "SEED": 0, "DEVICE": 1}
PIXEL_AREA_M2 = 100.0  # the demo scene has 10 m pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> DemoScene:
    return make_demo_scene(tmp_path_factory.mktemp("scene"), height=40, width=48, n_bands=12,
                           n_classes=K, seed=0, nodata_border=2)


@pytest.fixture(scope="module")
def processing_module(qgis_app):
    import processing

    return processing


@pytest.fixture
def project(qgis_app):
    """QgsProject.instance(), emptied before and after (runAndLoadResults loads into it)."""
    from qgis.core import QgsProject

    instance = QgsProject.instance()
    instance.removeAllMapLayers()
    yield instance
    instance.removeAllMapLayers()
    instance.layerTreeRoot().removeAllChildren()


def _polygons(path: Path) -> Path:
    driver = ogr.GetDriverByName("GPKG")
    dataset = driver.CreateDataSource(str(path))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    layer = dataset.CreateLayer("reference", srs=srs, geom_type=ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("landcover", ogr.OFTString))
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetField("landcover", "water")
    feature.SetGeometry(ogr.CreateGeometryFromWkt(
        "POLYGON((0 0,100 0,100 -100,0 -100,0 0))"))
    layer.CreateFeature(feature)
    dataset = None
    return path


def _algorithms(qgis_app):
    from qgis.core import QgsApplication

    provider = QgsApplication.processingRegistry().providerById("hsicluster")
    assert provider is not None
    return provider.algorithms()


def _loaded(project, name: str):
    layers = project.mapLayersByName(name)
    names = sorted(layer.name() for layer in project.mapLayers().values())
    assert len(layers) == 1, f"no single layer named {name!r}; loaded: {names}"
    return layers[0]


def _paletted_classes(layer) -> list[tuple[int, str]]:
    from qgis.core import QgsPalettedRasterRenderer

    renderer = layer.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer), type(renderer).__name__
    return [(int(c.value), c.label) for c in renderer.classes()]


def _legend_labels(layer) -> list[str]:
    """What the Layers panel shows under the layer."""
    from qgis.core import QgsMapLayerLegend

    legend = layer.legend() or QgsMapLayerLegend.defaultRasterLegend(layer)
    from qgis.core import QgsLayerTreeLayer

    node = QgsLayerTreeLayer(layer)
    return [item.data(0) for item in legend.createLayerTreeModelLegendNodes(node)]


# ------------------------------------------------------------------------------------ 1. crash
def test_evaluate_dialog_takes_rasters_without_crashing(scene: DemoScene, tmp_path) -> None:
    """QGIS 3.22 died (SIGSEGV) opening Evaluate clustering with a raster in the project or
    choosing a raster as reference: the class field's parent parameter accepted rasters. The
    real dialog, the batch dialog and every widget with a raster as the active layer, in a
    child process so a crash fails this test instead of killing pytest."""
    polygons = _polygons(tmp_path / "reference.gpkg")
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(REPO_ROOT), str(scene.truth_path), str(polygons)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert proc.returncode == 0, (f"exit {proc.returncode} (-11/139 = segfault)\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = [line[3:] for line in proc.stdout.splitlines() if line.startswith("OK ")]
    for expected in ("dialog opened", "raster chosen as REFERENCE_RASTER",
                     "raster chosen as REFERENCE_POLYGONS", "polygons chosen as REFERENCE_POLYGONS",
                     "batch dialog opened", "widgets with a raster as active layer",
                     "raster set on REFERENCE_POLYGONS (active-layer widgets)"):
        assert expected in steps, steps
    assert "DONE" in proc.stdout


def test_evaluate_parameters_give_no_widget_a_raster_field_parent(qgis_app) -> None:
    from qgis.core import QgsApplication, QgsProcessing, QgsProcessingParameterDefinition

    algorithm = QgsApplication.processingRegistry().createAlgorithmById(
        "hsicluster:evaluateclustering")
    field = algorithm.parameterDefinition("CLASS_FIELD")
    parent = algorithm.parameterDefinition(field.parentLayerParameterName())
    assert parent.name() == "REFERENCE_POLYGONS"
    assert parent.dataTypes() == [QgsProcessing.TypeVectorPolygon]
    legacy = algorithm.parameterDefinition("REFERENCE")
    assert legacy.flags() & QgsProcessingParameterDefinition.FlagHidden


# ------------------------------------------------------------------------------------ 4. help
def test_help_text_has_no_hard_line_breaks(qgis_app) -> None:
    algorithms = _algorithms(qgis_app)
    assert len(algorithms) >= 5
    for algorithm in algorithms:
        text = algorithm.shortHelpString()
        assert "\n" not in text and "\r" not in text, algorithm.id()
        assert text.startswith("<p>") and text.count("<p>") >= 2, algorithm.id()
        assert "  " not in text, algorithm.id()


# ------------------------------------------------------------------------------------ 6. tags
@pytest.mark.parametrize("word,expected", [
    ("hyperspectral", {"scdsc", "ms2anet", "applymodel", "evaluateclustering",
                       "labellingembedding"}),
    ("unsupervised", {"scdsc", "ms2anet", "labellingembedding"}),
    ("umap", {"labellingembedding"}),
    ("clustering", {"scdsc", "ms2anet", "applymodel", "evaluateclustering",
                    "labellingembedding"}),
    ("accuracy", {"evaluateclustering"}),
])
def test_toolbox_search_finds_the_algorithms_by_tag(qgis_app, word, expected) -> None:
    """The toolbox's own filter model (what its search box drives)."""
    from qgis.core import QgsApplication
    from qgis.gui import QgsProcessingToolboxModel, QgsProcessingToolboxProxyModel

    model = QgsProcessingToolboxProxyModel(None, QgsApplication.processingRegistry())
    model.setFilterString(word)
    source = model.toolboxModel()
    found = set()

    def walk(parent):
        for row in range(model.rowCount(parent)):
            index = model.index(row, 0, parent)
            algorithm = source.algorithmForIndex(model.mapToSource(index))
            if algorithm is not None and algorithm.provider().id() == "hsicluster":
                found.add(algorithm.name())
            walk(index)

    walk(model.index(-1, -1))
    assert isinstance(source, QgsProcessingToolboxModel)
    assert expected <= found, f"{word!r} found {sorted(found)}"


# ------------------------------------------------------------------------------------ 2, 5, 8
def test_scdsc_outputs_load_styled_and_named(scene: DemoScene, processing_module, project,
                                             tmp_path) -> None:
    """runAndLoadResults -> handleAlgorithmResults, the path of the algorithm dialog's 'Open
    output file after running': paletted clusters with named classes, named after the
    algorithm and the input; soft assignments and polygons styled too."""
    from qgis.core import (
        QgsCategorizedSymbolRenderer,
        QgsProcessingFeedback,
        QgsSingleBandPseudoColorRenderer,
    )

    class Recording(QgsProcessingFeedback):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def pushInfo(self, info):  # noqa: N802 - Qt naming
            self.lines.append(info)
            super().pushInfo(info)

    feedback = Recording()
    processing_module.runAndLoadResults("hsicluster:scdsc", {
        "INPUT": str(scene.cube_path), **SCDSC_FAST, "OUTPUT": "TEMPORARY_OUTPUT",
        "OUTPUT_SOFT": "TEMPORARY_OUTPUT", "OUTPUT_POLYGONS": str(tmp_path / "polygons.gpkg"),
    }, feedback=feedback)
    name = Path(scene.cube_path).stem
    clusters = _loaded(project, f"SCDSC clusters ({name})")
    classes = _paletted_classes(clusters)
    assert classes == [(c, f"Cluster {c}") for c in range(1, K + 1)]
    assert [label for label in _legend_labels(clusters) if label.startswith("Cluster")] == \
        [f"Cluster {c}" for c in range(1, K + 1)]
    soft = _loaded(project, f"SCDSC soft assignments ({name})")
    assert isinstance(soft.renderer(), QgsSingleBandPseudoColorRenderer)
    assert soft.renderer().classificationMax() == 1.0
    polygons = project.mapLayersByName(f"SCDSC cluster polygons ({name})")
    # A file the user named keeps its file name when QGIS prefers file names (the default).
    polygons = polygons or project.mapLayersByName("polygons")
    assert len(polygons) == 1
    renderer = polygons[0].renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer)
    assert renderer.classAttribute() == "cluster"
    assert [c.label() for c in renderer.categories()] == [f"Cluster {c}" for c in range(1, K + 1)]

    # 8. Per-cluster statistics in the log and in the raster's metadata.
    labels, _ = read_labels(clusters.source())
    counts = np.bincount(labels.ravel(), minlength=K + 1)[1:]
    dataset = gdal.Open(clusters.source())
    metadata = dataset.GetMetadata()
    dataset = None
    assert metadata["AREA_UNIT"] == "square metre"
    assert metadata["ALGORITHM"] == "hsicluster:scdsc"
    for cluster in range(1, K + 1):
        assert int(metadata[f"CLUSTER_{cluster}_PIXELS"]) == counts[cluster - 1]
        assert float(metadata[f"CLUSTER_{cluster}_AREA"]) == pytest.approx(
            counts[cluster - 1] * PIXEL_AREA_M2)
        assert any(line.strip().startswith(f"Cluster {cluster}: {counts[cluster - 1]:,} pixels")
                   for line in feedback.lines), feedback.lines


def test_ms2anet_outputs_styled_through_the_dialog_task(scene: DemoScene, processing_module,
                                                        project, tmp_path) -> None:
    """The algorithm dialog runs a QgsProcessingAlgRunnerTask (processAlgorithm in a worker
    thread with a copy of the context) and then handleAlgorithmResults; then Apply
    clustering model through runAndLoadResults."""
    from processing.gui.Postprocessing import handleAlgorithmResults
    from qgis.core import (
        QgsApplication,
        QgsMultiBandColorRenderer,
        QgsProcessingAlgRunnerTask,
        QgsProcessingContext,
        QgsProcessingFeedback,
        QgsProcessingOutputLayerDefinition,
    )

    algorithm = QgsApplication.processingRegistry().createAlgorithmById("hsicluster:ms2anet")
    context = QgsProcessingContext()
    context.setProject(project)
    feedback = QgsProcessingFeedback()
    model_path = str(tmp_path / "model.pt")
    parameters = {
        "INPUT": str(scene.cube_path), **MS2ANET_FAST,
        "OUTPUT": QgsProcessingOutputLayerDefinition("TEMPORARY_OUTPUT", project),
        "OUTPUT_FEATURES": QgsProcessingOutputLayerDefinition("TEMPORARY_OUTPUT", project),
        "OUTPUT_MODEL": model_path,
    }
    task = QgsProcessingAlgRunnerTask(algorithm, parameters, context, feedback)
    finished = []
    task.executed.connect(lambda ok, results: finished.append((ok, results)))
    QgsApplication.taskManager().addTask(task)
    deadline = 600
    import time

    start = time.monotonic()
    while not finished and time.monotonic() - start < deadline:
        QgsApplication.processEvents()
        time.sleep(0.02)
    assert finished and finished[0][0], finished
    assert handleAlgorithmResults(algorithm, context, feedback)
    name = Path(scene.cube_path).stem
    clusters = _loaded(project, f"MS2A-Net clusters ({name})")
    assert _paletted_classes(clusters) == [(c, f"Cluster {c}") for c in range(1, K + 1)]
    code = _loaded(project, f"MS2A-Net code ({name})")
    assert isinstance(code.renderer(), QgsMultiBandColorRenderer)
    assert gdal.Info(clusters.source()).count("CLUSTER_") == 2 * K

    processing_module.runAndLoadResults("hsicluster:applymodel", {
        "INPUT": str(scene.cube_path), "MODEL": model_path, "OUTPUT": "TEMPORARY_OUTPUT",
    })
    applied = _loaded(project, f"MS2A-Net clusters ({name}, model model)")
    assert _paletted_classes(applied) == [(c, f"Cluster {c}") for c in range(1, K + 1)]
    assert "CLUSTER_1_PIXELS" in gdal.Info(applied.source())


def test_post_processors_outlive_the_call(scene: DemoScene, processing_module, project) -> None:
    """The PyQGIS pitfall: a post-processor whose Python object is collected turns into the
    do-nothing C++ base. Collect garbage between the run and the loading."""
    import gc

    from processing.gui.Postprocessing import handleAlgorithmResults
    from qgis.core import (
        QgsApplication,
        QgsProcessingContext,
        QgsProcessingFeedback,
        QgsProcessingOutputLayerDefinition,
    )

    algorithm = QgsApplication.processingRegistry().createAlgorithmById("hsicluster:scdsc")
    context = QgsProcessingContext()
    context.setProject(project)
    feedback = QgsProcessingFeedback()
    results, ok = algorithm.run({
        "INPUT": str(scene.cube_path), **SCDSC_FAST,
        "OUTPUT": QgsProcessingOutputLayerDefinition("TEMPORARY_OUTPUT", project),
    }, context, feedback)
    assert ok
    gc.collect()
    handleAlgorithmResults(algorithm, context, feedback)
    clusters = _loaded(project, f"SCDSC clusters ({Path(scene.cube_path).stem})")
    assert _paletted_classes(clusters)[0] == (1, "Cluster 1")

    # A second run on the same input gets a name of its own.
    processing_module.runAndLoadResults("hsicluster:scdsc", {
        "INPUT": str(scene.cube_path), **SCDSC_FAST, "OUTPUT": "TEMPORARY_OUTPUT"})
    _loaded(project, f"SCDSC clusters ({Path(scene.cube_path).stem}) [2]")


# ------------------------------------------------------------------------------------ 7
def test_labelling_layers_show_the_image(scene: DemoScene, processing_module, project,
                                         tmp_path) -> None:
    """Segments load as outlines (labelled ones filled in their label's colour), chips as
    outlines, and the input image (not in the project yet) below them in the RGB bands SLIC
    used, stretched."""
    from qgis.core import QgsCategorizedSymbolRenderer, QgsMultiBandColorRenderer

    from processing_provider import segment_style

    output = tmp_path / "labelling.gpkg"
    processing_module.runAndLoadResults("hsicluster:labellingembedding", {
        "INPUT": str(scene.cube_path), **LABELLING_FAST, "SEGMENTS": str(output),
    })
    name = Path(scene.cube_path).stem
    segments = project.mapLayersByName(f"Segments ({name})") or project.mapLayersByName(
        "segments")
    assert len(segments) == 1, [layer.name() for layer in project.mapLayers().values()]
    segments = segments[0]
    renderer = segments.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer)
    assert renderer.classAttribute() == "label"
    unlabelled = [c for c in renderer.categories() if c.value() == ""]
    assert len(unlabelled) == 1
    assert unlabelled[0].symbol().symbolLayer(0).brushStyle() == 0  # Qt.NoBrush: outline only
    assert segment_style.is_live(segments)

    assert _loaded(project, f"Chips ({name})").renderer().symbol().symbolLayer(0).brushStyle() == 0
    image = _loaded(project, name)
    assert isinstance(image.renderer(), QgsMultiBandColorRenderer)
    assert image.renderer().redBand() != image.renderer().blueBand()
    order = [node.layer() for node in project.layerTreeRoot().findLayers()]
    assert order[-1] is image, [layer.name() for layer in order]  # drawn below the polygons

    # Added by hand (Browser, Add Layer), the segments look the same: default style in the file.
    from qgis.core import QgsVectorLayer

    by_hand = QgsVectorLayer(f"{output}|layername=segments", "segments", "ogr")
    assert isinstance(by_hand.renderer(), QgsCategorizedSymbolRenderer)
    assert segment_style.is_live(by_hand)

    # The dock labels two segments: the map fills them in the label's colour at once.
    from hsi_cluster_plugin.dock.embedding_dock import EmbeddingDock

    dock = EmbeddingDock(project=project)
    try:
        assert dock.set_layer(segments, background=False)
        fids = sorted(segments.allFeatureIds())[:2]
        segments.selectByIds(fids)
        assert dock.apply_label_to_selection("water", "#0000ff") == 2
        categories = {c.value(): c for c in segments.renderer().categories()}
        assert "water" in categories
        assert categories["water"].symbol().color().name() == "#0000ff"
        segments.rollBack()
    finally:
        dock.close_down()
        dock.deleteLater()


# ------------------------------------------------------------------------------------ 8
def test_scdsc_progress_follows_the_measured_stage_costs() -> None:
    from engine.scdsc import SCDSC

    model = SCDSC(n_clusters=5)
    fractions = model.stage_fractions(110_224, 110_224)
    ends = [end for _, end in fractions.values()]
    assert ends == sorted(ends) and ends[-1] == 1.0
    training = fractions["training"][1] - fractions["training"][0]
    # Measured on a 332x332 crop (bench/results.jsonl): training 76 % of the time.
    assert 0.65 < training < 0.9
    short = SCDSC(n_clusters=5, epochs=10).stage_fractions(110_224, 110_224)
    assert short["training"][1] - short["training"][0] < 0.2
    large = model.stage_fractions(880_710, 880_710)
    assert large["finch"][1] > fractions["finch"][1]  # FINCH grows with the scene


# ------------------------------------------------------------------------------------ 9
def test_no_third_party_deprecation_warnings_on_start() -> None:
    """What QGIS imports when the plugin registers its algorithms, with every warning shown."""
    script = (
        "import sys, warnings\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "warnings.simplefilter('default')\n"
        "before = list(warnings.filters)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from processing_provider.algorithms import all_algorithms\n"
        "    all_algorithms()\n"
        "    import engine.gnn\n"
        "    warnings.warn_explicit('ours', DeprecationWarning, 'engine/x.py', 1,\n"
        "                           module='engine.x')\n"
        "for w in caught:\n"
        "    print('WARNING', w.category.__name__, w.filename, w.message)\n"
        "print('FILTERS_KEPT', list(warnings.filters) == before)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings_seen = [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]
    third_party = [line for line in warnings_seen if "site-packages" in line
                   and "DeprecationWarning" in line]
    assert not third_party, third_party
    assert any("ours" in line for line in warnings_seen)  # our own still surface
    assert "FILTERS_KEPT True" in proc.stdout


def test_model_output_is_styled_and_keeps_its_name(scene: DemoScene, processing_module,
                                                   project) -> None:
    """In a model (graphical modeler), the child's output is styled when the model loads it,
    and keeps the name the user gave the model output."""
    from qgis.core import (
        QgsProcessingModelAlgorithm,
        QgsProcessingModelChildAlgorithm,
        QgsProcessingModelChildParameterSource,
        QgsProcessingModelOutput,
        QgsProcessingModelParameter,
        QgsProcessingParameterRasterLayer,
    )

    model = QgsProcessingModelAlgorithm("styled", "tests")
    model.addModelParameter(QgsProcessingParameterRasterLayer("image", "image"),
                            QgsProcessingModelParameter("image"))
    child = QgsProcessingModelChildAlgorithm("hsicluster:scdsc")
    child.setChildId("scdsc")
    child.addParameterSources("INPUT", [
        QgsProcessingModelChildParameterSource.fromModelParameter("image")])
    for name, value in SCDSC_FAST.items():
        child.addParameterSources(name, [
            QgsProcessingModelChildParameterSource.fromStaticValue(value)])
    output = QgsProcessingModelOutput("my clusters")
    output.setChildOutputName("OUTPUT")
    child.setModelOutputs({"my clusters": output})
    model.addChildAlgorithm(child)
    model.updateDestinationParameters()
    destination = model.destinationParameterDefinitions()[0].name()
    processing_module.runAndLoadResults(model, {"image": str(scene.cube_path),
                                                destination: "TEMPORARY_OUTPUT"})
    clusters = _loaded(project, "my clusters")
    assert _paletted_classes(clusters) == [(c, f"Cluster {c}") for c in range(1, K + 1)]
