"""The engine worker as a real process: job in (file or stdin), JSON events out, cancel by a
stdin line and by SIGTERM, library noise kept out of the protocol, atomic outputs, and the real
MS2A-Net / Apply model handlers against the in-process engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import job_protocol as protocol
from engine.demo_scene import make_demo_scene
from engine.raster_io import read_labels

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_HANDLERS = ["--handlers", "tests.worker_jobs"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _write_job(folder: Path, job: dict) -> Path:
    path = folder / "job.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    return path


def run_worker(job_path: str, *args: str, stdin: str = "", timeout: float = 300):
    """Run the worker to its end; (exit code, events, stderr). Every stdout line must parse."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.worker", str(job_path), *args],
        input=stdin, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT,
        timeout=timeout,
    )
    events = [protocol.parse_event(line) for line in proc.stdout.splitlines()]
    return proc.returncode, events, proc.stderr


def _last(events: list[dict], kind: str) -> dict:
    matching = [e for e in events if e["event"] == kind]
    assert matching, f"no {kind} event in {events}"
    return matching[-1]


def start_worker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.worker", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(), cwd=REPO_ROOT,
    )


def _read_until_progress(process: subprocess.Popen) -> list[dict]:
    events = []
    for line in process.stdout:
        events.append(protocol.parse_event(line))
        if events[-1]["event"] == "progress" and events[-1]["fraction"] > 0:
            return events
    raise AssertionError(f"the worker ended before any progress: {events}")


def _finish(process: subprocess.Popen, events: list[dict]) -> tuple[int, list[dict]]:
    out, _ = process.communicate(timeout=60)
    events += [protocol.parse_event(line) for line in out.splitlines()]
    return process.returncode, events


def _hidden_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ protocol


def test_job_round_trip_and_validation() -> None:
    job = protocol.Job(algorithm="ms2anet", parameters={"n_clusters": 4},
                       inputs={"raster": "/a.tif"}, outputs={"labels": "/b.tif", "model": ""},
                       seed=3, device="cpu", threads=1)
    back = protocol.parse_job(job.to_json())
    assert back.outputs == {"labels": "/b.tif"}  # an empty optional output is dropped
    assert back.seed == 3 and back.threads == 1 and back.parameters == {"n_clusters": 4}
    for bad, message in [({"algorithm": ""}, "no algorithm"),
                         ({"algorithm": "x", "seed": -1}, "seed"),
                         ({"algorithm": "x", "threads": 0}, "threads"),
                         ({"algorithm": "x", "outputs": {"a": 3}}, "outputs['a']"),
                         ({"algorithm": "x", "protocol": 99}, "protocol version")]:
        with pytest.raises(protocol.JobError, match=message.replace("[", r"\[")):
            protocol.Job.from_dict(bad)
    with pytest.raises(protocol.JobError, match="not valid JSON"):
        protocol.parse_job("{nope")
    assert protocol.event_line("result", figures={"x": float("nan"), "y": np.int64(2)}) == \
        '{"event": "result", "figures": {"x": null, "y": 2}}'


def test_steps_job_keeps_library_noise_out_of_the_protocol(tmp_path) -> None:
    out = tmp_path / "out.txt"
    job = _write_job(tmp_path, {"algorithm": "test.steps", "parameters": {"steps": 4},
                                "outputs": {"out": str(out)}})
    code, events, stderr = run_worker(job, *TEST_HANDLERS)
    assert code == protocol.EXIT_OK
    result = _last(events, "result")
    assert result["outputs"] == {"out": str(out)} and result["figures"] == {"steps": 4}
    assert out.read_text() == "".join(f"step {i}\n" for i in range(4))
    assert "noise from print()" in stderr and "noise written to fd 1" in stderr
    assert _last(events, "warning")["message"] == "a warning for the user"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e["stage"] for e in events if e["event"] == "progress"} == {"stepping"}


def test_unknown_algorithm_names_the_known_ones(tmp_path) -> None:
    code, events, _ = run_worker(_write_job(tmp_path, {"algorithm": "kmeans++"}))
    assert code == protocol.EXIT_BAD_JOB
    error = _last(events, "error")
    assert error["kind"] == "job" and "Unknown algorithm 'kmeans++'" in error["message"]
    for known in ("selftest", "ms2anet", "applymodel"):
        assert known in error["message"]


def test_bad_job_files(tmp_path) -> None:
    code, events, _ = run_worker(tmp_path / "missing.json")
    assert code == protocol.EXIT_BAD_JOB and "does not exist" in _last(events, "error")["message"]
    broken = tmp_path / "broken.json"
    broken.write_text("{\"algorithm\": ", encoding="utf-8")
    code, events, _ = run_worker(broken)
    assert code == protocol.EXIT_BAD_JOB and "not valid JSON" in _last(events, "error")["message"]
    code, events, _ = run_worker("-", stdin="")
    assert code == protocol.EXIT_BAD_JOB and "No job on stdin" in _last(events, "error")["message"]


def test_errors_for_the_user_and_bugs_carry_a_separate_traceback(tmp_path) -> None:
    code, events, _ = run_worker(_write_job(tmp_path, {"algorithm": "test.fail",
                                                       "parameters": {"kind": "input"}}),
                                 *TEST_HANDLERS)
    error = _last(events, "error")
    assert code == protocol.EXIT_ERROR and error["kind"] == "input"
    assert error["message"] == "The input is wrong in a way the user can fix."
    code, events, _ = run_worker(_write_job(tmp_path, {"algorithm": "test.fail"}),
                                 *TEST_HANDLERS)
    error = _last(events, "error")
    assert code == protocol.EXIT_ERROR and error["kind"] == "bug"
    assert "RuntimeError: a bug deep in the engine" in error["message"]
    assert "Traceback" in error["traceback"] and "worker_jobs.py" in error["traceback"]
    assert "Traceback" not in error["message"]


def test_missing_output_folder_fails_before_any_work(tmp_path) -> None:
    job = _write_job(tmp_path, {"algorithm": "test.steps",
                                "outputs": {"out": str(tmp_path / "no" / "out.txt")}})
    code, events, _ = run_worker(job, *TEST_HANDLERS)
    error = _last(events, "error")
    assert code == protocol.EXIT_ERROR and "does not exist" in error["message"]
    assert not [e for e in events if e["event"] == "progress"]


# ------------------------------------------------------------------------------ cancel


def test_cancel_line_on_stdin_with_the_job_from_stdin(tmp_path) -> None:
    out = tmp_path / "out.txt"
    job = {"algorithm": "test.steps", "parameters": {"steps": 400, "step_seconds": 0.05},
           "outputs": {"out": str(out)}}
    process = start_worker(["-", *TEST_HANDLERS])
    # A pretty-printed job over several lines, then the stdin stays open for control lines.
    process.stdin.write(json.dumps(job, indent=2) + "\n")
    process.stdin.flush()
    events = _read_until_progress(process)
    process.stdin.write("cancel\n")
    process.stdin.flush()
    code, events = _finish(process, events)
    assert code == protocol.EXIT_CANCELLED
    assert _last(events, "error")["kind"] == "cancelled"
    assert not out.exists() and not _hidden_temporaries(tmp_path)


def test_sigterm_cancels_at_the_next_check(tmp_path) -> None:
    out = tmp_path / "out.txt"
    job = _write_job(tmp_path, {"algorithm": "test.steps",
                                "parameters": {"steps": 400, "step_seconds": 0.05},
                                "outputs": {"out": str(out)}})
    process = start_worker([str(job), *TEST_HANDLERS])
    events = _read_until_progress(process)
    process.send_signal(signal.SIGTERM)
    code, events = _finish(process, events)
    assert code == protocol.EXIT_CANCELLED
    assert "cancelled" in _last(events, "error")["message"]
    assert not out.exists() and not _hidden_temporaries(tmp_path)


def test_end_of_a_control_stdin_cancels(tmp_path) -> None:
    out = tmp_path / "out.txt"
    job = _write_job(tmp_path, {"algorithm": "test.steps",
                                "parameters": {"steps": 400, "step_seconds": 0.05},
                                "outputs": {"out": str(out)}})
    process = start_worker([str(job), "--stdin-control", *TEST_HANDLERS])
    events = _read_until_progress(process)
    process.stdin.close()  # the caller is gone
    out_text = process.stdout.read()
    process.wait(timeout=60)
    events += [protocol.parse_event(line) for line in out_text.splitlines()]
    assert process.returncode == protocol.EXIT_CANCELLED
    assert not out.exists()


# ------------------------------------------------------------------------------ real handlers


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_demo_scene(tmp_path_factory.mktemp("worker_scene"), height=36, width=40,
                           n_bands=10, n_classes=3)


def test_selftest_imports_every_engine_package(tmp_path) -> None:
    code, events, stderr = run_worker(_write_job(tmp_path, {"algorithm": "selftest",
                                                            "threads": 1}))
    assert code == protocol.EXIT_OK, stderr
    figures = _last(events, "result")["figures"]
    from engine.worker import ENGINE_PACKAGES

    assert set(figures["versions"]) == set(ENGINE_PACKAGES.values())
    assert figures["failures"] == {}
    assert all(problems == [] for problems in figures["algorithms"].values()), figures
    assert set(figures["algorithms"]) == {"scdsc", "ms2anet", "applymodel",
                                          "evaluateclustering", "labellingembedding"}
    import torch

    assert figures["versions"]["torch"] == torch.__version__
    assert figures["torch_threads"] == 1 and figures["gdal"]


@pytest.mark.parametrize("package", ["hnswlib", "torch"])
def test_selftest_names_a_package_that_does_not_import(tmp_path, package) -> None:
    # A folder first on the path whose package raises on import, like a broken binary.
    broken = tmp_path / "broken"
    (broken / package).mkdir(parents=True)
    (broken / package / "__init__.py").write_text("raise OSError('libfoo.so: cannot open')\n")
    job = _write_job(tmp_path, {"algorithm": "selftest",
                                "parameters": {"packages": ["numpy", package]}})
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(broken), str(REPO_ROOT)])
    proc = subprocess.run([sys.executable, "-m", "engine.worker", str(job)], env=env,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    error = _last([protocol.parse_event(line) for line in proc.stdout.splitlines()], "error")
    assert proc.returncode == protocol.EXIT_ERROR and error["kind"] == "input"
    assert f"{package} (OSError: libfoo.so: cannot open)" in error["message"]
    assert "numpy" not in error["message"]


def test_a_missing_package_disables_only_the_algorithms_that_need_it(tmp_path) -> None:
    hidden = tmp_path / "hidden"
    (hidden / "hnswlib").mkdir(parents=True)
    # Like an uninstalled package: the import fails with ModuleNotFoundError naming it.
    (hidden / "hnswlib" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'hnswlib'\", name='hnswlib')\n")
    job = _write_job(tmp_path, {"algorithm": "selftest", "parameters": {
        "packages": ["numpy", "hnswlib"], "algorithms": ["scdsc", "ms2anet"],
        "strict": False}})
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(hidden), str(REPO_ROOT)])
    proc = subprocess.run([sys.executable, "-m", "engine.worker", str(job)], env=env,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == protocol.EXIT_OK, proc.stderr
    figures = _last([protocol.parse_event(line) for line in proc.stdout.splitlines()],
                    "result")["figures"]
    assert figures["algorithms"] == {"scdsc": ["hnswlib"], "ms2anet": []}
    assert list(figures["failures"]) == ["hnswlib"]


def test_ms2anet_job_then_apply_model_job_reproduce_the_labels(scene, tmp_path) -> None:
    labels, model = tmp_path / "clusters.tif", tmp_path / "model.pt"
    job = _write_job(tmp_path, {
        "algorithm": "ms2anet", "parameters": {"n_clusters": 3, "iterations": 30},
        "inputs": {"raster": str(scene.cube_path)},
        "outputs": {"labels": str(labels), "model": str(model)},
        "seed": 0, "device": "cpu", "threads": 1})
    code, events, stderr = run_worker(job)
    assert code == protocol.EXIT_OK, stderr
    result = _last(events, "result")
    assert result["outputs"] == {"labels": str(labels), "model": str(model)}
    trained, _ = read_labels(labels)
    assert set(np.unique(trained)) <= {0, 1, 2, 3}
    assert sum(result["figures"]["cluster_sizes"]) == int((trained > 0).sum())
    assert {"training"} <= {e["stage"] for e in events if e["event"] == "progress"}
    assert any(e["event"] == "info" and "MS2A-Net" in e["message"] for e in events)

    applied = tmp_path / "applied.tif"
    code, events, stderr = run_worker(_write_job(tmp_path, {
        "algorithm": "applymodel", "inputs": {"raster": str(scene.cube_path),
                                              "model": str(model)},
        "outputs": {"labels": str(applied)}, "threads": 1}))
    assert code == protocol.EXIT_OK, stderr
    assert _last(events, "result")["figures"]["model_kind"] == "ms2anet"
    np.testing.assert_array_equal(read_labels(applied)[0], trained)


def test_input_error_of_a_real_handler_leaves_no_output(tmp_path) -> None:
    labels = tmp_path / "clusters.tif"
    code, events, _ = run_worker(_write_job(tmp_path, {
        "algorithm": "ms2anet", "parameters": {"n_clusters": 3},
        "inputs": {"raster": str(tmp_path / "nowhere.tif")},
        "outputs": {"labels": str(labels)}}))
    error = _last(events, "error")
    assert code == protocol.EXIT_ERROR and error["kind"] == "input"
    assert "nowhere.tif" in error["message"] and "not a raster GDAL can read" in error["message"]
    assert not labels.exists()
    code, events, _ = run_worker(_write_job(tmp_path, {
        "algorithm": "ms2anet", "inputs": {"raster": "x.tif"},
        "outputs": {"labels": str(labels)}}))
    assert code == protocol.EXIT_BAD_JOB and "n_clusters" in _last(events, "error")["message"]


def test_preloaded_worker_reports_ready_then_takes_the_job_from_stdin(tmp_path) -> None:
    out = tmp_path / "out.txt"
    process = start_worker(["-", "--stdin-control", "--preload", "engine.raster_io",
                            *TEST_HANDLERS])
    assert protocol.parse_event(process.stdout.readline()) == {"event": "ready"}
    job = {"algorithm": "test.steps", "parameters": {"steps": 2}, "outputs": {"out": str(out)}}
    process.stdin.write(json.dumps(job) + "\n")
    process.stdin.flush()
    events = []
    for line in process.stdout:  # stdin stays open until the end: its end would cancel
        events.append(protocol.parse_event(line))
    code = process.wait(timeout=60)
    process.stdin.close()
    assert code == protocol.EXIT_OK and _last(events, "result")["outputs"] == {"out": str(out)}
