"""The job and event protocol between QGIS (or any caller) and the engine's worker process.

A **job** is one small JSON document: which algorithm, its parameters, input and output paths,
seed, device and thread count. The worker (``python -m engine.worker job.json``) answers with
**events**, one JSON object per line on its stdout:

``{"event": "progress", "fraction": 0.42, "stage": "training"}``
``{"event": "info", "message": "..."}`` / ``{"event": "warning", "message": "..."}``
``{"event": "result", "outputs": {"labels": "/path/clusters.tif"}, "figures": {...}}``
``{"event": "error", "kind": "input", "message": "for the user", "traceback": "for the log"}``
``{"event": "ready"}`` (only with ``--preload``: imports done, waiting for the job on stdin)

Error kinds: ``input`` (bad input, the message says what to do), ``job`` (the job document is
malformed or names an unknown algorithm), ``cancelled``, ``memory`` and ``bug`` (any other
exception: the traceback matters).

This module is the one definition of both documents. It imports the standard library only and
keeps Python 3.9 syntax at runtime (annotations are never evaluated), so the QGIS side (its own
Python, no numpy or torch needed) imports it too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

# Event names.
PROGRESS = "progress"
INFO = "info"
WARNING = "warning"
RESULT = "result"
ERROR = "error"
READY = "ready"  # a worker started with --preload has imported its modules
EVENTS = (PROGRESS, INFO, WARNING, RESULT, ERROR, READY)

# Error kinds.
KIND_INPUT = "input"
KIND_JOB = "job"
KIND_CANCELLED = "cancelled"
KIND_MEMORY = "memory"
KIND_BUG = "bug"

# What a line on the worker's stdin may say.
CANCEL_COMMAND = "cancel"

# Exit codes of the worker.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_JOB = 2
EXIT_CANCELLED = 3


class JobError(ValueError):
    """The job document is malformed (missing field, wrong type, not JSON)."""


def _check_paths(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JobError(f"The job's '{name}' must be an object of name -> path; got {value!r}.")
    paths: dict[str, str] = {}
    for key, path in value.items():
        if path is None or path == "":
            continue  # an optional output that was not asked for
        if not isinstance(path, str):
            raise JobError(f"The job's {name}['{key}'] must be a path (a string); got {path!r}.")
        paths[str(key)] = path
    return paths


@dataclass
class Job:
    """One unit of engine work, as written to a job file."""

    algorithm: str
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        if not isinstance(data, dict):
            raise JobError("A job must be a JSON object.")
        version = data.get("protocol", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise JobError(
                f"The job uses protocol version {version!r}; this worker speaks version "
                f"{PROTOCOL_VERSION}. Write the job again with this version of HSI Cluster."
            )
        algorithm = data.get("algorithm")
        if not isinstance(algorithm, str) or not algorithm:
            raise JobError("The job names no algorithm (field 'algorithm').")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise JobError(f"The job's 'parameters' must be an object; got {parameters!r}.")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise JobError(f"The job's 'seed' must be a non-negative integer; got {seed!r}.")
        device = data.get("device", "cpu")
        if not isinstance(device, str):
            raise JobError(f"The job's 'device' must be a string; got {device!r}.")
        threads = data.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise JobError(f"The job's 'threads' must be a positive integer; got {threads!r}.")
        return cls(
            algorithm=algorithm,
            parameters=dict(parameters),
            inputs=_check_paths(data.get("inputs"), "inputs"),
            outputs=_check_paths(data.get("outputs"), "outputs"),
            seed=seed,
            device=device,
            threads=threads,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "algorithm": self.algorithm,
            "parameters": dict(self.parameters),
            "inputs": dict(self.inputs),
            "outputs": dict(self.outputs),
            "seed": self.seed,
            "device": self.device,
            "threads": self.threads,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def parse_job(text: str) -> Job:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise JobError(f"The job is not valid JSON ({error}).") from error
    return Job.from_dict(data)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, paths and non-finite floats made JSON-safe."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy scalar or array, torch tensor
        return jsonable(value.tolist())
    if hasattr(value, "__fspath__"):
        return str(value)
    return str(value)


def event_line(event: str, **fields: Any) -> str:
    """One event as a line of JSON (without the newline)."""
    payload = {"event": event}
    payload.update(jsonable(fields))
    return json.dumps(payload, allow_nan=False)


class ProtocolError(ValueError):
    """A worker stdout line that is no event of this protocol."""


def parse_event(line: str) -> dict[str, Any]:
    """The event of one stdout line; :class:`ProtocolError` for anything else."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"not JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise ProtocolError("a JSON value that is no event object")
    return data
