"""Never destroy a user's file (issue 17): failed runs leave existing files as they were, an
output may not be an input, writes are probed before the work, outputs respect the umask, and
model files are reproducible byte for byte.

Every data-loss case uses a real file and compares its checksum before and after. The runs are
tiny (a 24x26-pixel scene, MS2A-Net with a few iterations) so the module stays fast.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from engine import safe_files
from engine.demo_scene import DemoScene, make_demo_scene
from engine.kmeans import cancellable_kmeans, same_clustering
from engine.monitor import Cancelled, Monitor

os.environ.setdefault("OMP_NUM_THREADS", "1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3
MS2A_FAST = {"N_CLUSTERS": K, "ITERATIONS": 3, "SEED": 0, "DEVICE": 1}
SCDSC_FAST = {"N_CLUSTERS": K, "EPOCHS": 2, "PRETRAIN_STEPS": 2, "SEED": 0, "DEVICE": 1}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> DemoScene:
    return make_demo_scene(tmp_path_factory.mktemp("safety_scene"), height=24, width=26,
                           n_bands=9, n_classes=K, seed=0, nodata_border=1)


@pytest.fixture(scope="module")
def processing_module(qgis_app):
    import processing

    return processing


@pytest.fixture(scope="module")
def ten_band_model(processing_module, tmp_path_factory) -> Path:
    """An MS2A-Net model trained on a 10-band raster (so a 9-band raster does not fit it)."""
    folder = tmp_path_factory.mktemp("ten_band")
    scene10 = make_demo_scene(folder, height=20, width=20, n_bands=10, n_classes=K, seed=1)
    model = folder / "model10.pt"
    processing_module.run("hsicluster:ms2anet", {
        "INPUT": str(scene10.cube_path), "OUTPUT": str(folder / "c.tif"),
        "OUTPUT_MODEL": str(model), **MS2A_FAST})
    return model


@pytest.fixture(scope="module")
def nine_band_model(processing_module, scene, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nine_band")
    model = folder / "model9.pt"
    processing_module.run("hsicluster:ms2anet", {
        "INPUT": str(scene.cube_path), "OUTPUT": str(folder / "c.tif"),
        "OUTPUT_MODEL": str(model), **MS2A_FAST})
    return model


def _fails(processing_module, algorithm: str, parameters: dict, *keywords: str) -> str:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException) as caught:
        processing_module.run(algorithm, parameters)
    message = str(caught.value)
    assert any(k.lower() in message.lower() for k in keywords), message
    assert "Traceback" not in message
    return message


# ------------------------------------------------------------------------------ 1. cleanup


def test_failed_apply_keeps_the_input_when_output_is_the_input(
        processing_module, scene, ten_band_model, tmp_path) -> None:
    """Issue 17.1: OUTPUT = INPUT with a model that does not fit: the input survives."""
    source = tmp_path / "x.tif"
    shutil.copy(scene.cube_path, source)
    before = sha256(source)
    _fails(processing_module, "hsicluster:applymodel",
           {"INPUT": str(source), "MODEL": str(ten_band_model), "OUTPUT": str(source)},
           "is the input", "band")
    assert source.is_file() and sha256(source) == before
    assert hidden_leftovers(tmp_path) == []


def test_failed_apply_keeps_an_existing_output_and_its_style(
        processing_module, scene, ten_band_model, tmp_path) -> None:
    """Issue 17.1: a failing run leaves an existing output and its .qml byte for byte."""
    output = tmp_path / "existing.tif"
    shutil.copy(scene.truth_path, output)
    style = output.with_suffix(".qml")
    style.write_text("<qgis>the user's own style</qgis>\n")
    aux = Path(f"{output}.aux.xml")
    aux.write_text("<PAMDataset></PAMDataset>\n")
    sums = {path: sha256(path) for path in (output, style, aux)}
    _fails(processing_module, "hsicluster:applymodel",
           {"INPUT": str(scene.cube_path), "MODEL": str(ten_band_model), "OUTPUT": str(output)},
           "band")
    assert {path: sha256(path) for path in (output, style, aux)} == sums
    assert hidden_leftovers(tmp_path) == []


def test_failure_after_the_first_output_restores_what_existed(
        processing_module, scene, tmp_path) -> None:
    """A run that fails after writing its label raster (a cancel while writing the next
    output) puts the earlier label raster back and removes the new soft raster."""
    from qgis.core import QgsProcessingException, QgsProcessingFeedback

    output, soft = tmp_path / "labels.tif", tmp_path / "soft.tif"
    shutil.copy(scene.truth_path, output)
    before = sha256(output)

    class CancelAfterLabels(QgsProcessingFeedback):
        def setProgress(self, value):  # noqa: N802 - Qt naming
            super().setProgress(value)
            if output.with_suffix(".qml").exists():  # the label raster and style are written
                self.cancel()

    with pytest.raises(QgsProcessingException, match="cancelled"):
        processing_module.run("hsicluster:ms2anet", {
            "INPUT": str(scene.cube_path), "OUTPUT": str(output), "OUTPUT_FEATURES": str(soft),
            **MS2A_FAST}, feedback=CancelAfterLabels())
    assert sha256(output) == before
    assert not soft.exists() and not output.with_suffix(".qml").exists()
    assert hidden_leftovers(tmp_path) == []


def test_successful_run_replaces_an_existing_output_and_drops_stale_sidecars(
        processing_module, scene, nine_band_model, tmp_path) -> None:
    output = tmp_path / "again.tif"
    shutil.copy(scene.cube_path, output)
    Path(f"{output}.aux.xml").write_text("<PAMDataset>stale</PAMDataset>\n")
    processing_module.run("hsicluster:applymodel", {
        "INPUT": str(scene.cube_path), "MODEL": str(nine_band_model), "OUTPUT": str(output)})
    with rasterio.open(output) as dataset:
        assert dataset.count == 1
    aux = Path(f"{output}.aux.xml")  # QGIS may write a new one; the old one is gone
    assert not aux.exists() or "stale" not in aux.read_text()
    assert "paletted" in output.with_suffix(".qml").read_text()
    assert hidden_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ 2. same file


@pytest.mark.parametrize("algorithm", ["scdsc", "ms2anet", "applymodel"])
def test_output_equal_to_input_is_refused_before_any_work(
        processing_module, scene, nine_band_model, tmp_path, algorithm: str) -> None:
    source = tmp_path / "input.tif"
    shutil.copy(scene.cube_path, source)
    before = sha256(source)
    parameters = {"INPUT": str(source), "OUTPUT": str(source)}
    if algorithm == "applymodel":
        parameters["MODEL"] = str(nine_band_model)
    else:
        parameters.update(SCDSC_FAST if algorithm == "scdsc" else MS2A_FAST)
    _fails(processing_module, f"hsicluster:{algorithm}", parameters, "is the input")
    assert sha256(source) == before


def test_same_file_through_a_symlink_and_a_relative_path(
        processing_module, scene, tmp_path, monkeypatch) -> None:
    source = tmp_path / "input.tif"
    shutil.copy(scene.cube_path, source)
    before = sha256(source)
    link = tmp_path / "link.tif"
    link.symlink_to(source)
    for output in (str(link), "input.tif", f"{tmp_path}/./sub/../input.tif"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path)
        _fails(processing_module, "hsicluster:ms2anet",
               {"INPUT": str(source), "OUTPUT": output, **MS2A_FAST}, "is the input")
    assert sha256(source) == before
    hard = tmp_path / "hard.tif"
    os.link(source, hard)
    _fails(processing_module, "hsicluster:ms2anet",
           {"INPUT": str(source), "OUTPUT": str(hard), **MS2A_FAST}, "is the input")
    assert sha256(source) == before


def test_soft_output_equal_to_the_label_output_is_refused(processing_module, scene,
                                                          tmp_path) -> None:
    output = tmp_path / "clusters.tif"
    _fails(processing_module, "hsicluster:scdsc",
           {"INPUT": str(scene.cube_path), "OUTPUT": str(output), "OUTPUT_SOFT": str(output),
            **SCDSC_FAST}, "same file")
    _fails(processing_module, "hsicluster:ms2anet",
           {"INPUT": str(scene.cube_path), "OUTPUT": str(output),
            "OUTPUT_FEATURES": str(tmp_path / "clusters.tiff"), **MS2A_FAST}, "same file")
    assert not output.exists() and hidden_leftovers(tmp_path) == []


def test_case_insensitive_names_are_the_same_file(tmp_path) -> None:
    """file_identity folds case only where the folder does (probed, not guessed)."""
    probe = safe_files.probe_folder(tmp_path)
    first = safe_files.file_identity(tmp_path / "Out.tif", case_insensitive=True)
    second = safe_files.file_identity(tmp_path / "out.TIF", case_insensitive=True)
    assert first == second
    assert safe_files.file_identity(tmp_path / "Out.tif", case_insensitive=False) != \
        safe_files.file_identity(tmp_path / "out.TIF", case_insensitive=False)
    existing = tmp_path / "data.tif"
    existing.write_bytes(b"x")
    other_case = tmp_path / "DATA.tif"
    if probe.case_insensitive:
        assert safe_files.file_identity(other_case) == safe_files.file_identity(existing)
    else:
        assert safe_files.file_identity(other_case) != safe_files.file_identity(existing)


# ------------------------------------------------------------------------------ 5. probing


def test_output_under_proc_is_refused_before_any_work(processing_module, scene) -> None:
    """As root os.access says /proc is writable; creating the file shows it is not."""
    started = time.monotonic()
    _fails(processing_module, "hsicluster:scdsc",
           {"INPUT": str(scene.cube_path), "OUTPUT": "/proc/hsi_cluster_test.tif",
            **dict(SCDSC_FAST, EPOCHS=5000)}, "Cannot write")
    # 5000 epochs would take minutes: the refusal came before the work.
    assert time.monotonic() - started < 60


def test_probe_folder_creates_and_removes_a_file(tmp_path) -> None:
    probe = safe_files.probe_folder(tmp_path)
    assert probe.folder == tmp_path
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):
        safe_files.probe_folder("/proc")


# ------------------------------------------------------------------------------ engine pieces


def test_ledger_rolls_back_created_and_restores_existing(tmp_path) -> None:
    existing, created = tmp_path / "old.tif", tmp_path / "new.tif"
    existing.write_bytes(b"precious")
    Path(f"{existing}.aux.xml").write_text("aux")
    ledger = safe_files.OutputLedger()
    with pytest.raises(RuntimeError):
        with ledger.active():
            ledger.claim(existing)
            ledger.claim(created)
            assert not Path(f"{existing}.aux.xml").exists()  # moved aside while running
            with safe_files.atomic_output(existing) as temporary:
                temporary.write_bytes(b"replacement")
            created.write_bytes(b"half")
            raise RuntimeError("the run fails")
    assert existing.read_bytes() == b"precious"
    assert Path(f"{existing}.aux.xml").read_text() == "aux"
    assert not created.exists()
    assert hidden_leftovers(tmp_path) == []


def test_ledger_commit_keeps_new_files_and_drops_backups(tmp_path) -> None:
    existing = tmp_path / "old.gpkg"
    existing.write_bytes(b"old")
    ledger = safe_files.OutputLedger()
    with ledger.active():
        ledger.claim(existing)
        with safe_files.atomic_output(existing) as temporary:
            temporary.write_bytes(b"new")
    assert existing.read_bytes() == b"new"
    assert hidden_leftovers(tmp_path) == []


def test_outputs_respect_the_umask(tmp_path) -> None:
    """Issue 12.10: files are created 0o666 minus the umask, not 0600."""
    previous = os.umask(0o022)
    try:
        target = tmp_path / "shared.tif"
        with safe_files.atomic_output(target) as temporary:
            temporary.write_bytes(b"data")
        assert target.stat().st_mode & 0o777 == 0o644
        os.umask(0o002)
        with safe_files.atomic_output(tmp_path / "group.tif") as temporary:
            temporary.write_bytes(b"data")
        assert (tmp_path / "group.tif").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(previous)


def test_processing_output_respects_the_umask(processing_module, scene, nine_band_model,
                                              tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        output = tmp_path / "applied.tif"
        processing_module.run("hsicluster:applymodel", {
            "INPUT": str(scene.cube_path), "MODEL": str(nine_band_model),
            "OUTPUT": str(output)})
    finally:
        os.umask(previous)
    assert output.stat().st_mode & 0o777 == 0o644


def test_sigterm_removes_temporaries_and_restores_claimed_files(tmp_path) -> None:
    """A process killed by SIGTERM while writing leaves neither its hidden temporary file nor a
    half-replaced output; it still dies of SIGTERM."""
    existing = tmp_path / "out.tif"
    existing.write_bytes(b"the user's file")
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from engine import safe_files
ledger = safe_files.OutputLedger()
with safe_files.cleanup_on_termination(), ledger.active():
    ledger.claim({str(existing)!r})
    with safe_files.atomic_output({str(existing)!r}) as temporary:
        temporary.write_bytes(b"half written")
        print("writing", flush=True)
        time.sleep(60)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".out-") for p in tmp_path.iterdir())
    process.terminate()
    assert process.wait(timeout=30) == -15
    assert existing.read_bytes() == b"the user's file"
    assert hidden_leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ 11. models


def test_model_files_are_byte_identical_for_the_same_seed(processing_module, scene,
                                                          tmp_path) -> None:
    """Issue 17.11: the zip records no longer carry the random temporary name."""
    for algorithm, settings in (("ms2anet", MS2A_FAST), ("scdsc", SCDSC_FAST)):
        models = []
        for run in ("a", "b"):
            model = tmp_path / f"{algorithm}_{run}.pt"
            processing_module.run(f"hsicluster:{algorithm}", {
                "INPUT": str(scene.cube_path), "OUTPUT": str(tmp_path / f"{algorithm}{run}.tif"),
                "OUTPUT_MODEL": str(model), **settings})
            models.append(model)
        assert models[0].read_bytes() == models[1].read_bytes(), algorithm
        assert sha256(tmp_path / f"{algorithm}a.tif") == sha256(tmp_path / f"{algorithm}b.tif")


def test_cancellable_kmeans_equals_scikit_learn() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(3)
    points = rng.normal(size=(600, 6)).astype(np.float32)
    points[:200] += 3.0
    for seed in (0, 1):
        expected = KMeans(4, n_init=10, random_state=seed).fit_predict(points)
        np.testing.assert_array_equal(cancellable_kmeans(points, 4, 10, seed), expected)
    assert same_clustering(np.array([0, 0, 1, 2]), np.array([5, 5, 3, 1]))
    assert not same_clustering(np.array([0, 0, 1, 2]), np.array([5, 5, 5, 1]))
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        cancellable_kmeans(points, 4, 10, 0, Monitor(is_cancelled=cancelled))


def test_umap_after_a_cancelled_umap_does_not_hang() -> None:
    """A cancel raised inside umap-learn's tqdm bar must not leave tqdm's lock taken for the
    next UMAP (which runs in another thread): the second fit finishes."""
    script = """
import numpy as np
from engine.embedding_umap import segment_umap
from engine.monitor import Cancelled, Monitor
points = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
reports = {"n": 0}
def progress(_):
    reports["n"] += 1
try:
    segment_umap(points, monitor=Monitor(on_progress=progress,
                                         is_cancelled=lambda: reports["n"] > 20))
except Cancelled:
    print("cancelled")
print(segment_umap(points).shape)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parent.parent,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.stdout.split() == ["cancelled", "(300,", "2)"], result.stderr[-3000:]


def test_scdsc_memory_estimate_matches_the_measured_peaks() -> None:
    """Issue 17.10: the estimate reproduces the two measured whole-run peaks it was fitted to
    (bench/results.jsonl: 1,296 MB at 110,224 pixels, 2,786 MB at 880,710 pixels, 10 bands),
    grows with the scene, and the largest fitting crop fits."""
    from engine.resources import largest_scdsc_pixels, scdsc_peak_bytes

    megabytes = 2**20
    assert scdsc_peak_bytes(110_224, 10) / megabytes == pytest.approx(1296, rel=0.1)
    assert scdsc_peak_bytes(880_710, 10) / megabytes == pytest.approx(2786, rel=0.1)
    assert scdsc_peak_bytes(14_000_000, 10) > 17 * 2**30  # the 4 x 4 mosaic that ran away
    assert scdsc_peak_bytes(1_000_000, 200) > scdsc_peak_bytes(1_000_000, 10)
    largest = largest_scdsc_pixels(8 * 2**30, 10)
    assert scdsc_peak_bytes(largest, 10) <= 8 * 2**30 < scdsc_peak_bytes(largest + 1000, 10)
