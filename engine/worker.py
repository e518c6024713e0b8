"""The engine's worker process: run one job, report JSON events on stdout.

Usage::

    python -m engine.worker job.json          # the job from a file
    python -m engine.worker - < job.json      # the job from stdin (then stdin stays a control
                                              # channel: a line "cancel" stops the job)

The job and event formats are defined in :mod:`engine.job_protocol`. The worker keeps the
protocol clean: before any job code runs, file descriptor 1 is pointed at stderr, so whatever a
library prints (Python ``print``, C code writing to fd 1, progress bars) lands in the log, and
events go through a private duplicate of the original stdout.

Cancel: a line ``cancel`` on stdin, or SIGTERM, makes :class:`engine.monitor.Cancelled` raise at
the job's next progress check. With ``--stdin-control`` (what the QGIS client passes) the end
of stdin means the caller is gone, which cancels too.

Handlers import their heavy dependencies when they run, so the worker starts fast and a package
missing from the environment fails only the jobs that need it, with a message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine import job_protocol as protocol
from engine.job_protocol import Job, JobError
from engine.monitor import Cancelled, Monitor

# ----------------------------------------------------------------------------- events


class EventWriter:
    """Writes events, one JSON line each, to the private protocol stream (thread-safe)."""

    # Progress is throttled: an engine may report thousands of steps.
    MIN_PROGRESS_STEP = 0.002
    MIN_PROGRESS_SECONDS = 0.2

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._lock = threading.Lock()
        self._last_fraction = -1.0
        self._last_stage: str | None = None
        self._last_time = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        line = protocol.event_line(event, **fields)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # the caller is gone (or closed the pipe): nobody to tell

    def progress(self, fraction: float, stage: str) -> None:
        now = time.monotonic()
        if (stage == self._last_stage and fraction < 1.0
                and abs(fraction - self._last_fraction) < self.MIN_PROGRESS_STEP
                and now - self._last_time < self.MIN_PROGRESS_SECONDS):
            return
        self._last_fraction, self._last_stage, self._last_time = fraction, stage, now
        self.emit(protocol.PROGRESS, fraction=round(float(fraction), 6), stage=stage)

    def info(self, message: str) -> None:
        self.emit(protocol.INFO, message=str(message))

    def warning(self, message: str) -> None:
        self.emit(protocol.WARNING, message=str(message))

    def error(self, kind: str, message: str, trace: str = "") -> None:
        self.emit(protocol.ERROR, kind=kind, message=message, traceback=trace)

    def result(self, outputs: dict[str, str], figures: dict[str, Any]) -> None:
        self.emit(protocol.RESULT, outputs=outputs, figures=figures)


def isolate_stdout() -> TextIO:
    """Point fd 1 (and ``sys.stdout``) at stderr; return a private stream on the old stdout."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", newline="\n", buffering=1)


# ----------------------------------------------------------------------------- cancel


class CancelFlag:
    """Set by a ``cancel`` line on stdin, by SIGTERM, or by the end of a control stdin."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


def watch_stdin(stream: TextIO, flag: CancelFlag, eof_cancels: bool) -> threading.Thread:
    def run() -> None:
        try:
            for line in stream:
                if line.strip().lower() == protocol.CANCEL_COMMAND:
                    flag.set("a cancel request on stdin")
        except (OSError, ValueError):
            pass
        if eof_cancels:
            flag.set("stdin closed (the caller is gone)")

    thread = threading.Thread(target=run, name="hsi-worker-stdin", daemon=True)
    thread.start()
    return thread


def install_signal_handlers(flag: CancelFlag) -> None:
    def on_signal(signum, _frame) -> None:
        flag.set(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGBREAK"):  # Windows: CTRL_BREAK_EVENT from a parent
        signal.signal(signal.SIGBREAK, on_signal)


def read_job_from_stream(stream: TextIO) -> Job:
    """Read one JSON document from ``stream`` line by line, leaving the rest (control lines)."""
    decoder = json.JSONDecoder()
    text = ""
    while True:
        line = stream.readline()
        if not line:
            break
        text += line
        stripped = text.strip()
        if not stripped:
            continue
        try:
            data, _ = decoder.raw_decode(stripped)
        except json.JSONDecodeError:
            continue
        return Job.from_dict(data)
    if not text.strip():
        raise JobError("No job on stdin: pipe a job document (JSON) into the worker.")
    return protocol.parse_job(text)  # raises the JSON error with its position


def read_job(source: str, stdin: TextIO) -> Job:
    if source == "-":
        return read_job_from_stream(stdin)
    path = Path(source)
    if not path.is_file():
        raise JobError(f"The job file '{source}' does not exist.")
    return protocol.parse_job(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- handlers


@dataclass
class JobContext:
    """What a handler gets: the job, a monitor wired to the events, and a stage label."""

    job: Job
    monitor: Monitor
    events: EventWriter
    stage_name: str = ""
    _set_stage: Callable[[str], None] | None = field(default=None, repr=False)

    def stage(self, name: str) -> None:
        """Name the stage shown with the progress from now on (e.g. "training")."""
        self.stage_name = name
        if self._set_stage is not None:
            self._set_stage(name)

    def parameter(self, name: str, default: Any = None) -> Any:
        return self.job.parameters.get(name, default)

    def input(self, name: str) -> str:
        try:
            return self.job.inputs[name]
        except KeyError:
            raise JobError(
                f"The '{self.job.algorithm}' job needs the input '{name}' (field 'inputs')."
            ) from None

    def output(self, name: str, required: bool = True) -> str:
        path = self.job.outputs.get(name, "")
        if required and not path:
            raise JobError(
                f"The '{self.job.algorithm}' job needs the output '{name}' (field 'outputs')."
            )
        return path


@dataclass
class HandlerResult:
    outputs: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[JobContext], HandlerResult]
HANDLERS: dict[str, Handler] = {}


def register(algorithm: str) -> Callable[[Handler], Handler]:
    """Decorator: ``@register("ms2anet")`` makes a function the handler of that algorithm."""

    def decorate(function: Handler) -> Handler:
        HANDLERS[algorithm] = function
        return function

    return decorate


# What a worker started ahead of time (``--preload``) should import for each algorithm: the
# modules its handler imports, plus the ones imported lazily on first use that take seconds
# (torch.optim's first optimizer imports torch._dynamo; MS2A-Net's k-means imports sklearn).
PRELOAD_MODULES: dict[str, tuple[str, ...]] = {
    "ms2anet": ("engine.ms2anet", "torch._dynamo", "sklearn.cluster"),
    "applymodel": ("engine.ms2anet", "engine.scdsc_model", "engine.model_file"),
    "selftest": (),
}


def set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# Import name -> distribution name of every package the engine uses (the selftest imports all).
ENGINE_PACKAGES = {
    "numpy": "numpy",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "rasterio": "rasterio",
    "affine": "affine",
    "psutil": "psutil",
    "torch": "torch",
    "hnswlib": "hnswlib",
    "umap": "umap-learn",
    "torch_geometric": "torch-geometric",
    "geopandas": "geopandas",
    "shapely": "shapely",
}


# What each Processing algorithm needs: its engine modules and the packages they import
# lazily (inside functions), so that a missing package disables only the algorithms using it.
ALGORITHM_MODULES: dict[str, tuple[str, ...]] = {
    "scdsc": ("engine.scdsc", "engine.scdsc_model", "engine.finch", "engine.neighbours",
              "sklearn.cluster", "hnswlib"),
    "ms2anet": ("engine.ms2anet", "sklearn.cluster"),
    "applymodel": ("engine.ms2anet", "engine.scdsc_model"),
    "evaluateclustering": ("engine.metrics", "engine.raster_io"),
    "labellingembedding": ("engine.graph_labelling", "engine.gnn", "torch_geometric.nn",
                           "umap", "skimage.segmentation"),
}


def algorithm_availability(algorithms: list[str]) -> dict[str, list[str]]:
    """For each algorithm, the packages (distribution names) or errors that stop it; [] = it
    can run. Imports are tried, not just looked up: a package whose binary fails counts."""
    missing: dict[str, list[str]] = {}
    for algorithm in algorithms:
        problems: list[str] = []
        for module in ALGORITHM_MODULES[algorithm]:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as error:
                top = (error.name or module).split(".")[0]
                name = ENGINE_PACKAGES.get(top, top)
                if name not in problems:
                    problems.append(name)
            except Exception as error:  # an installed package that fails to load
                top = module.split(".")[0]
                problems.append(f"{ENGINE_PACKAGES.get(top, module)} ({type(error).__name__}: "
                                f"{error})")
        missing[algorithm] = problems
    return missing


def _version_of(module: Any, distribution: str) -> str:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib.metadata import version as dist_version

        return dist_version(distribution)
    except Exception:
        return "unknown"


@register("selftest")
def run_selftest(context: JobContext) -> HandlerResult:
    """Import every engine dependency, report versions and which algorithms can run, do one
    tiny torch and raster round trip.

    Parameters: ``packages``, import names to check (default: all of :data:`ENGINE_PACKAGES`);
    ``algorithms``, whose availability to report (default: all of :data:`ALGORITHM_MODULES`);
    ``strict`` (default true): a package that does not import is an error; with false the
    result reports it (figures ``failures`` and ``algorithms``: algorithm -> what stops it).
    """
    names = context.parameter("packages") or list(ENGINE_PACKAGES)
    unknown = [name for name in names if name not in ENGINE_PACKAGES]
    if unknown:
        raise ValueError(f"The selftest knows no package {unknown}; it checks "
                         f"{', '.join(ENGINE_PACKAGES)}.")
    algorithms = context.parameter("algorithms") or list(ALGORITHM_MODULES)
    unknown = [name for name in algorithms if name not in ALGORITHM_MODULES]
    if unknown:
        raise ValueError(f"The selftest knows no algorithm {unknown}; it checks "
                         f"{', '.join(ALGORITHM_MODULES)}.")
    strict = context.parameter("strict", True)
    context.stage("importing packages")
    versions: dict[str, str] = {}
    failures: dict[str, str] = {}
    for position, name in enumerate(names):
        try:
            module = importlib.import_module(name)
            versions[ENGINE_PACKAGES[name]] = _version_of(module, ENGINE_PACKAGES[name])
        except Exception as error:  # ImportError, OSError from a shared library, ...
            failures[ENGINE_PACKAGES[name]] = f"{type(error).__name__}: {error}"
        context.monitor.progress(0.7 * (position + 1) / len(names))
    if failures and strict:
        listed = "; ".join(f"{dist} ({why})" for dist, why in failures.items())
        raise ValueError(
            f"The worker environment cannot import: {listed}. Set the environment up again "
            "(Plugins ▸ HSI Cluster ▸ Set up Python environment…)."
        )
    context.stage("checking the algorithms")
    figures: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": versions,
        "failures": failures,
        "algorithms": algorithm_availability(algorithms),
    }
    context.monitor.progress(0.9)
    context.stage("tiny computations")
    if "torch" in names and "torch" not in failures:
        import torch

        set_torch_threads(context.job.threads)
        product = torch.ones(8, 8) @ torch.ones(8, 8)
        if float(product.sum()) != 512.0:
            raise RuntimeError(f"torch computed {float(product.sum())} for 512")
        figures["cuda_available"] = bool(torch.cuda.is_available())
        figures["torch_threads"] = torch.get_num_threads()
    if {"rasterio", "numpy"} <= set(names) and not {"rasterio", "numpy"} & set(failures):
        figures["gdal"] = _raster_round_trip()
    context.monitor.progress(1.0)
    return HandlerResult(figures=figures)


def _raster_round_trip() -> str:
    """Write and read back a 4x4 GeoTIFF through the engine's own writer; GDAL's version."""
    import numpy as np
    import rasterio
    from affine import Affine

    from engine.raster_io import RasterGrid, read_labels, write_label_raster

    labels = np.arange(16, dtype=np.int64).reshape(4, 4) % 3 + 1
    with tempfile.TemporaryDirectory(prefix="hsi-selftest-") as folder:
        path = Path(folder) / "labels.tif"
        write_label_raster(path, labels, RasterGrid(4, 4, None, Affine.identity()), 3)
        back, _ = read_labels(path)
    if not np.array_equal(back, labels):
        raise RuntimeError("a raster written and read back through rasterio differs")
    return str(rasterio.__gdal_version__)


@register("ms2anet")
def run_ms2anet(context: JobContext) -> HandlerResult:
    """MS2A-Net: train on the input raster, write cluster labels, optionally code and model.

    Inputs ``raster``; outputs ``labels`` (required), ``features``, ``model``; parameters
    ``n_clusters`` (required), ``bands``, ``setting``, ``lam``, ``iterations``,
    ``learning_rate``, ``training_pixels`` (engine defaults when absent).
    """
    import rasterio

    from engine.raster_io import read_raster, write_float_raster, write_label_raster

    raster_path = context.input("raster")
    labels_path = context.output("labels")
    features_path = context.output("features", required=False)
    model_path = context.output("model", required=False)
    n_clusters = context.parameter("n_clusters")
    if not isinstance(n_clusters, int) or isinstance(n_clusters, bool):
        raise JobError("The 'ms2anet' job needs an integer parameter 'n_clusters'.")
    settings = {name: context.parameter(name) for name in
                ("setting", "lam", "iterations", "learning_rate", "training_pixels")
                if context.parameter(name) is not None}
    monitor = context.monitor
    context.stage("reading the raster")
    # Read before importing torch: a bad input fails in a second, not after the torch import.
    raster = read_raster(raster_path, bands=context.parameter("bands") or None,
                         monitor=monitor.stage(0.0, 0.02))
    with rasterio.open(raster_path) as dataset:
        source_band_count = dataset.count

    from engine.ms2anet import CODE_CHANNELS, MS2ANet

    set_torch_threads(context.job.threads)
    model = MS2ANet(n_clusters=n_clusters, seed=context.job.seed, device=context.job.device,
                    **settings)
    context.stage("training")
    result = model.fit(raster.cube, raster.valid, monitor.stage(0.02, 0.95),
                       band_numbers=raster.band_numbers, source_band_count=source_band_count,
                       return_features=bool(features_path), band_names=raster.band_names)
    context.stage("writing outputs")
    outputs = {"labels": str(write_label_raster(labels_path, result.labels, raster.grid,
                                                n_clusters))}
    if features_path:
        outputs["features"] = str(write_float_raster(
            features_path, result.features, raster.valid, raster.grid,
            [f"MS2A-Net code {j}" for j in range(1, CODE_CHANNELS + 1)]))
    monitor.check()
    if model_path:
        outputs["model"] = str(model.save(model_path))
    monitor.progress(1.0)
    sizes = [int((result.labels == k).sum()) for k in range(1, n_clusters + 1)]
    return HandlerResult(outputs=outputs, figures={
        "n_clusters": n_clusters,
        "cluster_sizes": sizes,
        "chosen_iteration": result.chosen_iteration,
        "lowest_loss": min(result.loss_history) if result.loss_history else None,
        "seconds": result.seconds,
    })


@register("applymodel")
def run_apply_model(context: JobContext) -> HandlerResult:
    """Apply a saved MS2A-Net or SCDSC model to a raster, window by window.

    Inputs ``raster`` and ``model``; output ``labels``. The model file's header says which kind.
    """
    from engine.model_file import read_model_file
    from engine.ms2anet import ALGORITHM_NAME as MS2ANET
    from engine.ms2anet import MS2ANet, predict_raster
    from engine.scdsc_model import ALGORITHM_NAME as SCDSC
    from engine.scdsc_model import apply_scdsc_model

    set_torch_threads(context.job.threads)
    raster_path = context.input("raster")
    model_path = context.input("model")
    labels_path = context.output("labels")
    context.stage("reading the model")
    header = read_model_file(model_path)
    kind = header["algorithm"]
    context.stage("applying the model")
    monitor = context.monitor.stage(0.0, 0.98)
    if kind == MS2ANET:
        model = MS2ANet.load(model_path, device=context.job.device)
        summary = predict_raster(model, raster_path, labels_path, monitor=monitor)
        n_clusters = model.n_clusters
    elif kind == SCDSC:
        summary = apply_scdsc_model(model_path, raster_path, labels_path, None, monitor,
                                    device=context.job.device)
        n_clusters = int((header.get("settings") or {}).get("n_clusters")
                         or len(summary.cluster_sizes))
    else:
        raise ValueError(f"'{model_path}' is a model of the '{kind}' algorithm; Apply clustering "
                         "model applies MS2A-Net and SCDSC models.")
    context.monitor.progress(1.0)
    return HandlerResult(outputs={"labels": labels_path}, figures={
        "model_kind": kind,
        "n_clusters": n_clusters,
        "n_valid": summary.n_valid,
        "cluster_sizes": list(summary.cluster_sizes),
        "seconds": summary.seconds,
    })


# ----------------------------------------------------------------------------- running


def _check_output_folders(job: Job) -> None:
    for name, path in job.outputs.items():
        folder = Path(path).parent
        if not folder.is_dir():
            raise ValueError(f"The folder of the output '{name}' ({folder}) does not exist. "
                             "Choose an existing folder.")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"The folder of the output '{name}' ({folder}) is not writable. "
                             "Choose a folder you can write to.")


@contextlib.contextmanager
def removed_on_failure(paths: list[str]) -> Iterator[None]:
    """Remove the outputs that did not exist before, if the block fails."""
    before = {path: os.path.exists(path) for path in paths}
    try:
        yield
    except BaseException:
        for path, existed in before.items():
            if existed:
                continue
            for candidate in (path, f"{path}.aux.xml"):
                with contextlib.suppress(OSError):
                    os.remove(candidate)
        raise


def run_job(job: Job, events: EventWriter, is_cancelled: Callable[[], bool]) -> int:
    """Run ``job``, reporting through ``events``; the worker's exit code."""
    handler = HANDLERS.get(job.algorithm)
    if handler is None:
        events.error(protocol.KIND_JOB,
                     f"Unknown algorithm '{job.algorithm}'. This worker runs: "
                     f"{', '.join(sorted(HANDLERS))}.")
        return protocol.EXIT_BAD_JOB
    stage = {"name": job.algorithm}

    def set_stage(name: str) -> None:
        stage["name"] = name

    monitor = Monitor(
        on_progress=lambda fraction: events.progress(fraction, stage["name"]),
        is_cancelled=is_cancelled,
        on_info=events.info,
        on_warning=events.warning,
    )
    context = JobContext(job=job, monitor=monitor, events=events, _set_stage=set_stage)
    try:
        with removed_on_failure(list(job.outputs.values())):
            _check_output_folders(job)
            monitor.check()
            result = handler(context)
    except JobError as error:
        events.error(protocol.KIND_JOB, str(error), traceback.format_exc())
        return protocol.EXIT_BAD_JOB
    except (Cancelled, KeyboardInterrupt):
        events.error(protocol.KIND_CANCELLED, f"{job.algorithm} was cancelled; no output was "
                     "written.")
        return protocol.EXIT_CANCELLED
    except MemoryError:
        events.error(protocol.KIND_MEMORY,
                     f"{job.algorithm} ran out of memory. Try a smaller raster or area, fewer "
                     "bands, or a smaller training sample; close other programs.",
                     traceback.format_exc())
        return protocol.EXIT_ERROR
    except ValueError as error:  # the engine's errors meant for the user
        events.error(protocol.KIND_INPUT, str(error), traceback.format_exc())
        return protocol.EXIT_ERROR
    except Exception as error:
        events.error(protocol.KIND_BUG,
                     f"{job.algorithm} failed with an internal error ({type(error).__name__}: "
                     f"{error}). The traceback is in the log; please report it.",
                     traceback.format_exc())
        return protocol.EXIT_ERROR
    events.result(outputs=result.outputs, figures=result.figures)
    return protocol.EXIT_OK


def _apply_thread_count(job: Job) -> None:
    """OpenMP/MKL read these when torch first loads (no handler has imported it yet)."""
    if job.threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = str(job.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.worker",
        description="Run one HSI Cluster job; events as JSON lines on stdout.",
    )
    parser.add_argument("job", help="the job file (JSON), or - to read the job from stdin")
    parser.add_argument("--handlers", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers more handlers)")
    parser.add_argument("--stdin-control", action="store_true",
                        help="stdin is the caller's control channel: its end cancels the job")
    parser.add_argument("--preload", action="append", default=[], metavar="MODULE",
                        help="import MODULE before reading the job, then report 'ready': a "
                             "worker started ahead of time (job from stdin) has its imports "
                             "done when the job arrives")
    args = parser.parse_args(argv)

    events = EventWriter(isolate_stdout())
    flag = CancelFlag()
    install_signal_handlers(flag)
    if args.preload:
        for module in args.preload:
            try:
                importlib.import_module(module)
            except Exception as error:  # the job will report it properly if it needs it
                print(f"preloading {module} failed: {error}", file=sys.stderr)
        events.emit(protocol.READY)
    try:
        job = read_job(args.job, sys.stdin)
    except JobError as error:
        events.error(protocol.KIND_JOB, str(error))
        return protocol.EXIT_BAD_JOB
    if args.job != "-" or not sys.stdin.closed:
        watch_stdin(sys.stdin, flag, eof_cancels=args.stdin_control)
    for module in args.handlers:
        importlib.import_module(module)
    _apply_thread_count(job)
    return run_job(job, events, flag)


if __name__ == "__main__":
    # Run the registry of the importable module ``engine.worker``, not of ``__main__``: handler
    # modules (--handlers) register into ``engine.worker.HANDLERS``.
    from engine.worker import main as _main

    code = _main()
    sys.stderr.flush()
    # os._exit, not sys.exit: the stdin watcher thread may be blocked in a read, and a normal
    # interpreter shutdown can then abort on the stdin lock. Every event is already flushed.
    os._exit(code)
