"""Progress reporting and cancellation for long engine work, free of any GUI toolkit.

The engine never imports QGIS. A caller (the Processing provider, a notebook, a script) hands in
plain callables; the engine reports a fraction in [0, 1] and checks for cancellation between
chunks of work. A cancel raises :class:`Cancelled`, so partial results are never returned.

Stages nest: ``monitor.stage(0.2, 0.6)`` gives a child whose 0..1 maps onto 0.2..0.6 of the
parent, so each step of a pipeline can report 0..1 without knowing its place in the whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside the engine when the caller asked to stop."""


def _ignore_fraction(_fraction: float) -> None:
    return None


def _ignore_text(_text: str) -> None:
    return None


def _never_cancelled() -> bool:
    return False


@dataclass
class Monitor:
    """Progress sink + cancel check. All callables are optional."""

    on_progress: Callable[[float], None] = _ignore_fraction
    is_cancelled: Callable[[], bool] = _never_cancelled
    on_info: Callable[[str], None] = _ignore_text
    on_warning: Callable[[str], None] = _ignore_text
    start: float = 0.0
    end: float = 1.0
    warnings: list[str] = field(default_factory=list)

    def progress(self, fraction: float) -> None:
        """Report progress within this stage (0..1) and stop if the caller cancelled."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.on_progress(self.start + (self.end - self.start) * fraction)
        self.check()

    def check(self) -> None:
        if self.is_cancelled():
            raise Cancelled("cancelled by the user")

    def info(self, text: str) -> None:
        self.on_info(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.on_warning(text)

    def stage(self, start: float, end: float) -> Monitor:
        """A child monitor whose 0..1 covers ``start..end`` of this one."""
        span = self.end - self.start
        return Monitor(
            on_progress=self.on_progress,
            is_cancelled=self.is_cancelled,
            on_info=self.on_info,
            on_warning=self.on_warning,
            start=self.start + span * start,
            end=self.start + span * end,
            warnings=self.warnings,
        )


def silent() -> Monitor:
    return Monitor()


def run_cancellable(function: Callable[[], T], monitor: Monitor,
                    poll_seconds: float = 0.05) -> T:
    """``function()``'s result, but a cancel is honoured within ``poll_seconds`` even while
    ``function`` sits in code that never checks (a library's JIT compilation, a nearest-neighbour
    search).

    ``function`` runs in a daemon thread; on a cancel :class:`Cancelled` is raised here at once
    and the thread is abandoned: it ends at its own next cancel check (if it checks the same
    monitor) or when its work is done, and its result is dropped. Its exceptions are raised here.
    """
    outcome: dict[str, object] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            outcome["error"] = error
        finally:
            done.set()

    worker = threading.Thread(target=target, name="hsi-cluster-cancellable", daemon=True)
    worker.start()
    while not done.wait(poll_seconds):
        monitor.check()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
