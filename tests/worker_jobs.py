"""Job handlers used by the worker tests only (``--handlers tests.worker_jobs``).

They misbehave on purpose (ignore cancels, crash, allocate too much, print noise) so that the
worker and its QGIS client are tested against real processes doing those things. They import
the standard library only, so a worker under a small address-space limit can still start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

from engine.worker import HandlerResult, JobContext, register


def _atomic(path):
    from engine.raster_io import atomic_output as atomic

    return atomic(path)


@register("test.steps")
def steps(context: JobContext) -> HandlerResult:
    """Write output ``out`` atomically while reporting ``steps`` steps of ``step_seconds``;
    prints library-style noise to stdout at Python and at file-descriptor level."""
    count = int(context.parameter("steps", 5))
    pause = float(context.parameter("step_seconds", 0.0))
    out = context.output("out")
    print("noise from print() that must not reach the protocol")
    os.write(1, b"noise written to fd 1 as C code would\n")
    context.monitor.info(f"pid {os.getpid()}")
    context.monitor.warn("a warning for the user")
    with _atomic(out) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            context.stage("stepping")
            for step in range(count):
                handle.write(f"step {step}\n")
                handle.flush()
                time.sleep(pause)
                context.monitor.progress((step + 1) / count)
    return HandlerResult(outputs={"out": out}, figures={"steps": count})


@register("test.ignore_cancel")
def ignore_cancel(context: JobContext) -> HandlerResult:
    """Hold a half-written output and never check for cancel; SIGTERM is ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = context.output("out")
    with _atomic(out) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("half")
            handle.flush()
            context.events.progress(0.5, "holding")  # reported, but never checked
            time.sleep(120)
    return HandlerResult(outputs={"out": out})


@register("test.sigkill")
def sigkill(context: JobContext) -> HandlerResult:
    """Die from a real SIGKILL halfway through writing the output."""
    out = context.output("out")
    with _atomic(out) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("half")
            handle.flush()
            context.monitor.progress(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
    return HandlerResult(outputs={"out": out})


@register("test.crash")
def crash(context: JobContext) -> HandlerResult:
    """A segmentation fault, as a broken native library would cause."""
    context.monitor.progress(0.1)
    ctypes.string_at(0)
    return HandlerResult()


@register("test.allocate")
def allocate(context: JobContext) -> HandlerResult:
    """Allocate ``megabytes`` MB and touch it."""
    size = int(context.parameter("megabytes", 64)) * 1024 * 1024
    block = bytearray(size)
    block[::4096] = b"x" * len(range(0, size, 4096))
    return HandlerResult(figures={"allocated": len(block)})


@register("test.fail")
def fail(context: JobContext) -> HandlerResult:
    """Raise ValueError (bad input) or RuntimeError (a bug), as parameter ``kind`` says."""
    if context.parameter("kind") == "input":
        raise ValueError("The input is wrong in a way the user can fix.")
    raise RuntimeError("a bug deep in the engine")
