"""The QGIS-side worker client with real worker processes and a real QgsProcessingFeedback:
events reach the feedback, cancel stops the worker (escalating to a kill), and every way a
worker can fail (error event, crash, SIGKILL, memory limit, garbage, no result, no Python)
becomes a QgsProcessingException with the run's outputs removed."""

from __future__ import annotations

import ast
import os
import signal
import sys
from pathlib import Path

import pytest

from processing_provider import worker_client
from processing_provider.worker_client import WorkerRun, run_job

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_HANDLERS = ("--handlers", "tests.worker_jobs")


@pytest.fixture
def feedback(qgis_app):
    from qgis.core import QgsProcessingFeedback

    feedback = QgsProcessingFeedback()
    feedback.progress_values = []
    feedback.progressChanged.connect(feedback.progress_values.append)
    return feedback


def _run(job: dict, feedback, tmp_path: Path, **options):
    options.setdefault("worker_args", TEST_HANDLERS)
    options.setdefault("job_dir", str(tmp_path / "jobs"))
    options.setdefault("root", str(REPO_ROOT))
    run = WorkerRun(job, feedback, sys.executable, **options)
    return run, run.run


def _expect_failure(job: dict, feedback, tmp_path: Path, match: str, **options) -> WorkerRun:
    from qgis.core import QgsProcessingException

    run, start = _run(job, feedback, tmp_path, **options)
    with pytest.raises(QgsProcessingException, match=match):
        start()
    return run


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "jobs")


def test_client_feeds_progress_info_warnings_and_console(feedback, tmp_path) -> None:
    out = tmp_path / "out.txt"
    run, start = _run({"algorithm": "test.steps", "parameters": {"steps": 5},
                       "outputs": {"out": str(out)}}, feedback, tmp_path)
    result = start()
    assert result["outputs"] == {"out": str(out)} and result["figures"] == {"steps": 5}
    assert out.is_file()
    assert feedback.progress_values and feedback.progress_values[-1] == 100.0
    log = feedback.textLog()
    assert "a warning for the user" in log and f"pid {run.process.pid}" in log
    assert "noise from print()" in log  # stderr reaches the log as console output
    assert "Rerun it by hand" in log and Path(run.job_path).is_file()
    assert run.command()[1:4] == ["-m", "engine.worker", run.job_path]


def test_client_source_is_qgis_side_code() -> None:
    """Python 3.9 syntax at runtime (ast of 3.9 grammar) and no heavy imports."""
    source = Path(worker_client.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "qgis" in imported
    assert not imported & {"torch", "numpy", "rasterio", "scipy", "sklearn", "osgeo"}


def test_cancel_stops_a_cooperative_worker_and_removes_its_output(feedback, tmp_path) -> None:
    out = tmp_path / "out.txt"
    feedback.progressChanged.connect(lambda value: value > 0 and feedback.cancel())
    run = _expect_failure({"algorithm": "test.steps",
                           "parameters": {"steps": 400, "step_seconds": 0.05},
                           "outputs": {"out": str(out)}}, feedback, tmp_path, "was cancelled")
    assert run.process.returncode == 3  # the worker stopped itself at its next check
    assert _leftovers(tmp_path) == []


def test_cancel_kills_a_worker_that_ignores_it(feedback, tmp_path) -> None:
    out = tmp_path / "out.txt"
    feedback.progressChanged.connect(lambda value: value > 0 and feedback.cancel())
    run = _expect_failure({"algorithm": "test.ignore_cancel", "outputs": {"out": str(out)}},
                          feedback, tmp_path, "was cancelled")
    assert run.process.returncode == -signal.SIGKILL  # cancel line, SIGTERM, then SIGKILL
    assert _leftovers(tmp_path) == []  # the half-written temporary file is gone too


def test_sigkilled_worker_is_a_clear_error_and_leaves_nothing(feedback, tmp_path) -> None:
    out = tmp_path / "out.txt"
    run = _expect_failure({"algorithm": "test.sigkill", "outputs": {"out": str(out)}},
                          feedback, tmp_path, "killed by SIGKILL.*memory runs out")
    assert run.process.returncode == -signal.SIGKILL
    assert _leftovers(tmp_path) == []


def test_crashing_worker_is_a_clear_error(feedback, tmp_path) -> None:
    _expect_failure({"algorithm": "test.crash"}, feedback, tmp_path,
                    "killed by SIGSEGV.*crash in a native library")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_AS needs POSIX")
def test_worker_past_its_memory_limit_is_a_clear_error(feedback, tmp_path) -> None:
    limit = 700 * 1024 * 1024
    run = _expect_failure({"algorithm": "test.allocate", "parameters": {"megabytes": 2048}},
                          feedback, tmp_path, "ran out of memory", memory_limit_bytes=limit)
    assert run.error["kind"] == "memory"
    # Under the same limit a small allocation works: the limit, not the job, was the cause.
    result = run_job({"algorithm": "test.allocate", "parameters": {"megabytes": 64}}, feedback,
                     sys.executable, worker_args=TEST_HANDLERS, job_dir=str(tmp_path / "jobs"),
                     root=str(REPO_ROOT), memory_limit_bytes=limit)
    assert result["figures"]["allocated"] == 64 * 1024 * 1024


def test_error_events_become_exceptions_with_the_traceback_in_the_log(feedback, tmp_path):
    _expect_failure({"algorithm": "test.fail", "parameters": {"kind": "input"}}, feedback,
                    tmp_path, "^The input is wrong in a way the user can fix.$")
    _expect_failure({"algorithm": "test.fail"}, feedback, tmp_path,
                    "internal error .*RuntimeError: a bug deep in the engine")
    assert "Traceback" in feedback.textLog() and "worker_jobs.py" in feedback.textLog()


def test_unknown_algorithm(feedback, tmp_path) -> None:
    _expect_failure({"algorithm": "nonsense"}, feedback, tmp_path,
                    "Unknown algorithm 'nonsense'.*applymodel.*ms2anet.*selftest")


@pytest.mark.parametrize("mode, match", [
    ("garbage", "not a protocol event .*this is no event"),
    ("silent", "exited without a result"),
    ("exit3", "exited with code 3 without a result"),
])
def test_misbehaving_worker_processes(feedback, tmp_path, mode, match) -> None:
    out = tmp_path / "out.txt"
    _expect_failure({"algorithm": "any", "outputs": {"out": str(out)}}, feedback, tmp_path,
                    match, worker_module="tests.fake_worker", worker_args=("--mode", mode))
    assert not out.exists()


def test_missing_python_says_how_to_set_up_the_environment(feedback, tmp_path) -> None:
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="Set up Python environment"):
        run_job({"algorithm": "selftest"}, feedback, str(tmp_path / "gone" / "python"),
                job_dir=str(tmp_path))


def test_existing_outputs_are_kept_when_a_run_fails(feedback, tmp_path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("from an earlier run")
    _expect_failure({"algorithm": "test.fail", "outputs": {"out": str(out)}}, feedback,
                    tmp_path, "internal error")
    assert out.read_text() == "from an earlier run"


def test_worker_environment_drops_qgis_python_variables(tmp_path) -> None:
    env = worker_client.worker_environment(
        str(tmp_path), threads=2,
        base={"PYTHONHOME": "C:/OSGeo4W/apps/Python39", "PYTHONPATH": "C:/qgis/python",
              "PATH": "/usr/bin"})
    assert "PYTHONHOME" not in env and env["PYTHONPATH"] == str(tmp_path)
    assert env["OMP_NUM_THREADS"] == "2" and env["PATH"] == "/usr/bin"


def test_spare_worker_takes_the_job_on_stdin_and_a_dead_one_is_replaced(feedback, tmp_path):
    spare = worker_client.SpareWorker(sys.executable, preload=["engine.raster_io"],
                                      worker_args=TEST_HANDLERS, root=str(REPO_ROOT))
    out = tmp_path / "out.txt"
    run, start = _run({"algorithm": "test.steps", "parameters": {"steps": 3},
                       "outputs": {"out": str(out)}}, feedback, tmp_path, spare=spare)
    result = start()
    assert run.process is spare.process and result["figures"] == {"steps": 3}
    assert out.is_file() and not spare.take()  # a spare serves one job

    dead = worker_client.SpareWorker(sys.executable, worker_args=TEST_HANDLERS,
                                     root=str(REPO_ROOT))
    dead.process.kill()
    dead.process.wait()
    run, start = _run({"algorithm": "test.steps", "parameters": {"steps": 1},
                       "outputs": {"out": str(tmp_path / "again.txt")}}, feedback, tmp_path,
                      spare=dead)
    assert start()["figures"] == {"steps": 1} and run.process is not dead.process
    dead.close()
    unused = worker_client.SpareWorker(sys.executable, root=str(REPO_ROOT))
    unused.close()
    assert unused.process.returncode is not None
