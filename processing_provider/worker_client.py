"""QGIS side of the worker protocol: run one job in a worker process and feed QGIS feedback.

The worker (``python -m engine.worker``) runs in the engine's own environment (its own Python,
torch, rasterio); this module needs only the standard library and ``qgis.core``, so it works in
any QGIS Python from 3.9 on. It

* writes the job to a JSON file (kept in QGIS's temporary folder: the log says how to rerun it
  by hand) and starts the worker with the environment's Python;
* turns the worker's events into ``QgsProcessingFeedback`` calls (progress and stage, info,
  warnings; the traceback of an internal error goes to ``reportError``), and anything the
  worker prints on stderr into console lines of the log;
* polls ``feedback.isCanceled()``: on cancel it sends ``cancel`` on the worker's stdin, waits up
  to :data:`CANCEL_GRACE_SECONDS`, then terminates and finally kills it (under 2 s in all);
* turns every way a worker can fail (an error event, a crash, a kill by the system, running
  past a memory limit, output that is not the protocol, an exit without a result) into a
  ``QgsProcessingException`` with a clear message, and removes the outputs the run created,
  including the temporary files of a worker killed while writing.

QGIS keeps running whatever the worker does.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from typing import Any

from qgis.core import QgsProcessingException, QgsProcessingFeedback

from engine import job_protocol as protocol

WORKER_MODULE = "engine.worker"
CANCEL_GRACE_SECONDS = 1.4  # after the cancel request, before SIGTERM
TERMINATE_GRACE_SECONDS = 0.2  # after SIGTERM, before SIGKILL (1.6 s + a poll in all)
POLL_SECONDS = 0.05
STDERR_TAIL_LINES = 40
# Environment variables of the QGIS process that would make another Python load QGIS's
# standard library or packages (QGIS on Windows and macOS sets them for its own Python).
_FOREIGN_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE",
                             "PYTHONEXECUTABLE", "__PYVENV_LAUNCHER__", "VIRTUAL_ENV")


def engine_root() -> str:
    """The folder holding the ``engine`` package (checkout root, or the installed plugin)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(protocol.__file__)))


def worker_environment(root: str, threads: int | None = None,
                       base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: QGIS's Python settings removed, the engine importable."""
    env = dict(os.environ if base is None else base)
    for name in _FOREIGN_PYTHON_VARIABLES:
        env.pop(name, None)
    env["PYTHONPATH"] = root
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONNOUSERSITE"] = "1"  # packages pip-installed into the user's site stay out
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    return env


def _memory_limiter(limit_bytes: int):
    """preexec_fn capping the worker's address space (POSIX; macOS does not enforce it)."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def _read_lines(stream, tag: str, sink: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            sink.put((tag, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
    except (OSError, ValueError):
        pass
    finally:
        sink.put((tag, None))


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class _OutputGuard:
    """Remembers which outputs existed before the run, removes the ones the run created."""

    def __init__(self, outputs: dict[str, str]):
        self.paths = [os.path.abspath(p) for p in outputs.values() if p]
        self.existed = {path: os.path.exists(path) for path in self.paths}
        self.temporaries_before = set(self._temporaries())

    def _temporaries(self) -> list[str]:
        # engine.raster_io.atomic_output writes ".<stem>-XXXX<suffix>" beside the target.
        found: list[str] = []
        for path in self.paths:
            folder, name = os.path.split(path)
            stem, suffix = os.path.splitext(name)
            pattern = os.path.join(glob.escape(folder), f".{glob.escape(stem)}-*{suffix}")
            found += glob.glob(pattern)
            found += glob.glob(pattern + ".aux.xml")
        return found

    def remove_created(self) -> list[str]:
        removed: list[str] = []
        candidates = [p for p in self.paths if not self.existed[p]]
        candidates += [f"{p}.aux.xml" for p in candidates]
        candidates += [t for t in self._temporaries() if t not in self.temporaries_before]
        for path in candidates:
            if os.path.exists(path):
                with contextlib.suppress(OSError):
                    os.remove(path)
                    removed.append(path)
        return removed


def _start_process(command: list[str], env: dict[str, str], root: str,
                   memory_limit_bytes: int | None, python: str) -> subprocess.Popen:
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    elif memory_limit_bytes:
        kwargs["preexec_fn"] = _memory_limiter(int(memory_limit_bytes))
    try:
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=root, **kwargs)
    except OSError as error:
        raise QgsProcessingException(
            f"Cannot start the HSI Cluster worker with '{python}' ({error}). Set the Python "
            "environment up again (Plugins ▸ HSI Cluster ▸ Set up Python environment…)."
        ) from error


class SpareWorker:
    """A worker started ahead of time (say, when an algorithm's dialog opens) that imports
    what the algorithm needs (``--preload``) and then waits for its job on stdin, so the run
    does not pay for Python's start and torch's import. Used once, by :class:`WorkerRun`
    (``spare=``); :meth:`close` stops an unused one."""

    def __init__(self, python: str, preload: list[str] | tuple[str, ...] = (),
                 worker_module: str = WORKER_MODULE,
                 worker_args: list[str] | tuple[str, ...] = (), root: str | None = None,
                 env: dict[str, str] | None = None, threads: int | None = None,
                 memory_limit_bytes: int | None = None):
        self.root = root or engine_root()
        command = [python, "-m", worker_module, "-", "--stdin-control"]
        for module in preload:
            command += ["--preload", module]
        command += list(worker_args)
        self.process = _start_process(command, worker_environment(self.root, threads, env),
                                      self.root, memory_limit_bytes, python)
        self._taken = False

    def take(self) -> bool:
        """Hand the process over (once); False if it was taken or has exited."""
        if self._taken or self.process.poll() is not None:
            return False
        self._taken = True
        return True

    def close(self) -> None:
        if not self._taken:
            self._taken = True
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
                with contextlib.suppress(OSError):
                    stream.close()


class WorkerRun:
    """One job in one worker process. Use :func:`run_job` unless you need the parts."""

    def __init__(self, job: dict[str, Any], feedback: QgsProcessingFeedback | None,
                 python: str, worker_module: str = WORKER_MODULE,
                 worker_args: list[str] | tuple[str, ...] = (), root: str | None = None,
                 env: dict[str, str] | None = None, memory_limit_bytes: int | None = None,
                 job_dir: str | None = None, title: str | None = None,
                 spare: SpareWorker | None = None):
        self.job = protocol.Job.from_dict(job).to_dict()
        self.spare = spare  # used if still waiting; its env and memory limit then apply
        self.feedback = feedback if feedback is not None else QgsProcessingFeedback()
        self.python = python
        self.worker_module = worker_module
        self.worker_args = list(worker_args)
        self.root = root or engine_root()
        self.env = worker_environment(self.root, self.job.get("threads"), env)
        self.memory_limit_bytes = memory_limit_bytes
        self.job_dir = job_dir
        self.title = title or self.job["algorithm"]
        self.job_path = ""
        self.process: subprocess.Popen | None = None
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.protocol_error = ""
        self.cancelled = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stage = ""

    # ------------------------------------------------------------------ starting
    def write_job_file(self) -> str:
        folder = self.job_dir
        if not folder:
            from qgis.core import QgsProcessingUtils

            folder = QgsProcessingUtils.tempFolder()
        os.makedirs(folder, exist_ok=True)
        name = f"hsi_cluster_job_{self.job['algorithm'].replace('.', '_')}_{uuid.uuid4().hex[:8]}"
        path = os.path.join(folder, name + ".json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.job, handle, indent=2, sort_keys=True)
        self.job_path = path
        return path

    def command(self) -> list[str]:
        return [self.python, "-m", self.worker_module, self.job_path, "--stdin-control",
                *self.worker_args]

    def _check_python(self) -> None:
        if not self.python or not os.path.isfile(self.python):
            raise QgsProcessingException(
                f"The HSI Cluster Python environment is missing: '{self.python}' does not "
                "exist. Set it up with Plugins ▸ HSI Cluster ▸ Set up Python environment…, or "
                "name an existing Python in the HSI_CLUSTER_PYTHON environment variable."
            )

    def start(self) -> None:
        self._check_python()
        self.write_job_file()
        self.feedback.pushCommandInfo(
            f"Job file: {self.job_path}\nRerun it by hand: PYTHONPATH={self.root} "
            f"{self.python} -m {self.worker_module} {self.job_path}"
        )
        if self.spare is not None and self.spare.take():
            # A worker started ahead: its imports are done; the job goes in on stdin.
            self.process = self.spare.process
            try:
                self.process.stdin.write(json.dumps(self.job).encode("utf-8") + b"\n")
                self.process.stdin.flush()
                return
            except OSError:
                self.process.kill()
                self.process.wait()
                self.process = None  # it died meanwhile: start a fresh one below
        self.process = _start_process(self.command(), self.env, self.root,
                                      self.memory_limit_bytes, self.python)


    # ------------------------------------------------------------------ events
    def _handle_stdout(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = protocol.parse_event(line)
        except protocol.ProtocolError as error:
            self.protocol_error = f"{error}: {line[:200]!r}"
            return
        kind = event.get("event")
        feedback = self.feedback
        if kind == protocol.PROGRESS:
            stage = str(event.get("stage") or "")
            if stage and stage != self._stage:
                self._stage = stage
                feedback.setProgressText(stage)
            try:
                feedback.setProgress(100.0 * float(event.get("fraction", 0.0)))
            except (TypeError, ValueError):
                self.protocol_error = f"a progress event without a fraction: {line[:200]!r}"
        elif kind == protocol.INFO:
            feedback.pushInfo(str(event.get("message", "")))
        elif kind == protocol.WARNING:
            feedback.pushWarning(str(event.get("message", "")))
        elif kind == protocol.RESULT:
            self.result = event
        elif kind == protocol.READY:
            pass
        elif kind == protocol.ERROR:
            self.error = event
            trace = str(event.get("traceback") or "")
            if trace and event.get("kind") == protocol.KIND_BUG:
                feedback.reportError(trace, False)
            elif trace:
                feedback.pushDebugInfo(trace)
        else:
            feedback.pushDebugInfo(f"worker event of an unknown kind: {line[:200]}")

    def _handle_stderr(self, line: str) -> None:
        self.stderr_tail.append(line)
        self.feedback.pushConsoleInfo(line)

    # ------------------------------------------------------------------ waiting
    def _request_cancel(self) -> None:
        self.cancelled = True
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.write(protocol.CANCEL_COMMAND.encode() + b"\n")
            self.process.stdin.flush()

    def _stop(self) -> None:
        """Kill the worker now (protocol broken or the caller gave up)."""
        if self.process.poll() is None:
            self.process.kill()

    def wait(self) -> None:
        process = self.process
        sink: queue.Queue = queue.Queue()
        readers = [
            threading.Thread(target=_read_lines, args=(process.stdout, "out", sink), daemon=True),
            threading.Thread(target=_read_lines, args=(process.stderr, "err", sink), daemon=True),
        ]
        for reader in readers:
            reader.start()
        open_streams = 2
        cancel_time: float | None = None
        terminated = killed = False
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if not self.cancelled and self.feedback.isCanceled():
                self._request_cancel()
                cancel_time = now
            if cancel_time is not None and process.poll() is None:
                if not terminated and now - cancel_time >= CANCEL_GRACE_SECONDS:
                    process.terminate()
                    terminated = True
                elif (not killed and now - cancel_time
                      >= CANCEL_GRACE_SECONDS + TERMINATE_GRACE_SECONDS):
                    process.kill()
                    killed = True
            if self.protocol_error and process.poll() is None:
                self._stop()
            if process.poll() is not None:
                exited_at = exited_at or now
                # A grandchild may hold the pipes open: do not wait for their end forever.
                if open_streams == 0 or now - exited_at > 1.0:
                    break
            try:
                tag, line = sink.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            while True:
                if line is None:
                    open_streams -= 1
                elif tag == "out":
                    if not self.protocol_error:
                        self._handle_stdout(line)
                else:
                    self._handle_stderr(line)
                try:
                    tag, line = sink.get_nowait()
                except queue.Empty:
                    break
        process.wait()
        for reader in readers:
            reader.join(timeout=1.0)
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):
                stream.close()

    # ------------------------------------------------------------------ the outcome
    def _tail(self) -> str:
        lines = [line for line in self.stderr_tail if line.strip()][-8:]
        return ("\nLast lines the worker wrote to stderr:\n" + "\n".join(lines)) if lines else ""

    def outcome(self) -> dict[str, Any]:
        """The result event; QgsProcessingException for every other ending."""
        code = self.process.returncode
        if self.cancelled:
            raise QgsProcessingException(f"{self.title} was cancelled; no output was written.")
        if self.protocol_error:
            raise QgsProcessingException(
                f"The HSI Cluster worker wrote something that is not a protocol event "
                f"({self.protocol_error}), so it was stopped. This is a bug in the worker or "
                f"a package printing to its output; the job file {self.job_path} reproduces it."
                + self._tail()
            )
        if self.error is not None:
            message = str(self.error.get("message") or "the worker reported an error")
            raise QgsProcessingException(message)
        if code is not None and code < 0:
            name = _signal_name(code)
            hint = ("the operating system stops a process this way when memory runs out; try "
                    "a smaller raster or area, fewer bands or a smaller training sample"
                    if name == "SIGKILL" else
                    "a crash in a native library (torch, GDAL) or a broken environment; set "
                    "the environment up again if it keeps happening")
            raise QgsProcessingException(
                f"The HSI Cluster worker running {self.title} was killed by {name} ({hint}). "
                f"QGIS is unaffected; the job file {self.job_path} reproduces the run."
                + self._tail()
            )
        if code == 0 and self.result is not None:
            return self.result
        if code and self.result is None:
            raise QgsProcessingException(
                f"The HSI Cluster worker running {self.title} exited with code {code} without "
                f"a result. The job file {self.job_path} reproduces the run." + self._tail()
            )
        raise QgsProcessingException(
            f"The HSI Cluster worker running {self.title} exited without a result (exit code "
            f"{code}). The job file {self.job_path} reproduces the run." + self._tail()
        )

    def run(self) -> dict[str, Any]:
        guard = _OutputGuard(self.job.get("outputs") or {})
        succeeded = False
        try:
            self.start()
            self.wait()
            result = self.outcome()
            succeeded = True
            return result
        finally:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if not succeeded:
                removed = guard.remove_created()
                if removed:
                    self.feedback.pushDebugInfo("removed: " + ", ".join(removed))


def run_job(job: dict[str, Any], feedback: QgsProcessingFeedback | None, python: str,
            **options: Any) -> dict[str, Any]:
    """Run ``job`` (a job dict, see :mod:`engine.job_protocol`) in a worker started with
    ``python``; returns the result event (``outputs``, ``figures``) or raises
    ``QgsProcessingException``. Options: see :class:`WorkerRun`."""
    return WorkerRun(job, feedback, python, **options).run()

