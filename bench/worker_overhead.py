"""What running a job in the worker process costs over running it inside the calling process.

The same MS2A-Net job on a small demo raster is run, alternately,

* in-process: the worker's own ``run_job`` called in this Python, with torch and the engine
  already imported (as they are inside QGIS today), and
* through the worker: ``processing_provider.worker_client.run_job`` with a real
  QgsProcessingFeedback, i.e. a new Python process that imports the engine, reads the job file,
  streams events and writes the outputs (what a QGIS run will do).

* through a preloaded worker: a ``SpareWorker`` started ahead of time with ``--preload``
  (untimed, as if started while the user fills in the dialog), then given the job by the client;
  timed from the job to the result.

The difference of the medians is the worker's overhead (issue 11 asks for under 3 s); the time
to the worker's first event shows how much of it is the start-up (Python + torch import). All
runs must give the same labels (same seed). Last, a long job is cancelled during training: the
time from the cancel to the client's exception (issue 11: under 2 s), and the same for a worker
that ignores the cancel and has to be killed. Appends one JSON line to bench/results.jsonl.

    python -m bench.worker_overhead [--repeats 3] [--iterations 100] [--size 64] [--no-log]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run_all import machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="raster height and width")
    parser.add_argument("--bands", type=int, default=16)
    parser.add_argument("--no-log", action="store_true", help="do not append to results.jsonl")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from qgis.core import QgsApplication, QgsProcessingException, QgsProcessingFeedback

    from engine import job_protocol as protocol
    from engine import worker
    from engine.demo_scene import make_demo_scene
    from engine.raster_io import read_labels
    from processing_provider.worker_client import SpareWorker, run_job

    torch.set_num_threads(1)
    app = QgsApplication([], False)
    app.initQgis()
    folder = Path(tempfile.mkdtemp(prefix="worker-overhead-"))
    scene = make_demo_scene(folder / "scene", height=args.size, width=args.size,
                            n_bands=args.bands, n_classes=4)

    def job(label: str) -> dict:
        return {"algorithm": "ms2anet",
                "parameters": {"n_clusters": 4, "iterations": args.iterations},
                "inputs": {"raster": str(scene.cube_path)},
                "outputs": {"labels": str(folder / f"{label}.tif")},
                "seed": 0, "device": "cpu", "threads": 1}

    # Warm the in-process side (imports, first torch call) as QGIS would be after one run.
    worker.run_job(protocol.Job.from_dict(job("warm")), worker.EventWriter(io.StringIO()),
                   lambda: False)
    def warm_worker(job_dict: dict) -> float:
        """A SpareWorker started ahead with --preload (its start and imports untimed, as if
        started while the user fills in the dialog), then the job through the client."""
        spare = SpareWorker(sys.executable, preload=worker.PRELOAD_MODULES["ms2anet"],
                            threads=1)
        assert protocol.parse_event(spare.process.stdout.readline())["event"] == \
            protocol.READY
        started = time.perf_counter()
        run_job(job_dict, QgsProcessingFeedback(), sys.executable, job_dir=str(folder),
                spare=spare)
        return time.perf_counter() - started

    in_process, through_worker, first_event, warm = [], [], [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        code = worker.run_job(protocol.Job.from_dict(job(f"in_{repeat}")),
                              worker.EventWriter(io.StringIO()), lambda: False)
        in_process.append(time.perf_counter() - started)
        assert code == protocol.EXIT_OK, code

        feedback = QgsProcessingFeedback()
        seen: list[float] = []
        feedback.progressChanged.connect(lambda _v, seen=seen: seen or seen.append(
            time.perf_counter()))
        started = time.perf_counter()
        run_job(job(f"worker_{repeat}"), feedback, sys.executable, job_dir=str(folder))
        through_worker.append(time.perf_counter() - started)
        first_event.append(seen[0] - started if seen else float("nan"))
        warm.append(warm_worker(job(f"warm_{repeat}")))
        print(f"repeat {repeat}: in-process {in_process[-1]:.2f} s, worker "
              f"{through_worker[-1]:.2f} s (first event after {first_event[-1]:.2f} s), "
              f"preloaded worker {warm[-1]:.2f} s", flush=True)

    # Cancel: a long MS2A-Net job, cancelled at its first training progress; time from the
    # cancel to run_job's exception (the worker stops at its next check, or is killed).
    cancel_seconds = []
    for repeat in range(args.repeats):
        long_job = job(f"cancelled_{repeat}")
        long_job["parameters"]["iterations"] = 100_000
        feedback = QgsProcessingFeedback()
        cancelled_at: list[float] = []

        def cancel_in_training(value, feedback=feedback, cancelled_at=cancelled_at):
            if value > 2.5 and not cancelled_at:  # 2 % is the end of reading the raster
                cancelled_at.append(time.perf_counter())
                feedback.cancel()

        feedback.progressChanged.connect(cancel_in_training)
        try:
            run_job(long_job, feedback, sys.executable, job_dir=str(folder))
        except QgsProcessingException:
            pass
        cancel_seconds.append(time.perf_counter() - cancelled_at[0])
        assert not (folder / f"cancelled_{repeat}.tif").exists()
    print(f"cancel to stop: {', '.join(f'{c:.2f}' for c in cancel_seconds)} s", flush=True)

    # A worker that ignores the cancel (tests/worker_jobs.py's test.ignore_cancel: SIGTERM
    # ignored, no progress checks) must be killed: time from the cancel to the exception.
    kill_seconds = []
    for repeat in range(args.repeats):
        feedback = QgsProcessingFeedback()
        cancelled_at = []

        def cancel_at_once(value, feedback=feedback, cancelled_at=cancelled_at):
            if value > 0 and not cancelled_at:
                cancelled_at.append(time.perf_counter())
                feedback.cancel()

        feedback.progressChanged.connect(cancel_at_once)
        try:
            run_job({"algorithm": "test.ignore_cancel",
                     "outputs": {"out": str(folder / f"ignored_{repeat}.txt")}}, feedback,
                    sys.executable, job_dir=str(folder),
                    worker_args=("--handlers", "tests.worker_jobs"))
        except QgsProcessingException:
            pass
        kill_seconds.append(time.perf_counter() - cancelled_at[0])
        assert not (folder / f"ignored_{repeat}.txt").exists()
    print(f"cancel to killed: {', '.join(f'{c:.2f}' for c in kill_seconds)} s", flush=True)

    identical = all(
        np.array_equal(read_labels(folder / f"in_{r}.tif")[0],
                       read_labels(folder / f"{kind}_{r}.tif")[0])
        for r in range(args.repeats) for kind in ("worker", "warm"))
    row = {
        "bench": "worker_overhead",
        "scene": f"demo {args.size}x{args.size}x{args.bands}",
        "method": "ms2anet",
        "iterations": args.iterations,
        "repeats": args.repeats,
        "seconds": round(statistics.median(through_worker), 2),
        "in_process_seconds": round(statistics.median(in_process), 2),
        "overhead_seconds": round(statistics.median(through_worker)
                                  - statistics.median(in_process), 2),
        "first_event_seconds": round(statistics.median(first_event), 2),
        "preloaded_worker_seconds": round(statistics.median(warm), 2),
        "preloaded_overhead_seconds": round(statistics.median(warm)
                                            - statistics.median(in_process), 2),
        "labels_identical": identical,
        "cancel_seconds_max": round(max(cancel_seconds), 2),
        "killed_after_cancel_seconds_max": round(max(kill_seconds), 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.worker_overhead " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
    }
    print(json.dumps(row))
    if not args.no_log:
        with open(REPO / "bench" / "results.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
    app.exitQgis()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
