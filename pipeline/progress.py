"""Progress of long work, reported as events to whoever shows them.

The library only reports (a step began or ended, a tuning trial, an epoch); it never draws.
`mlops run` listens and draws a live display; with nobody listening a report costs one list
check. Listeners are process-wide (Prefect may run a task in a worker thread) and a listener
that raises is dropped from that report, never failing the work it watches.

    with progress.listening(print):
        with progress.step("preprocess"):
            ...
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """`kind` is one of: round, step_start, step_end, trial_start, trial_end, phase, epoch."""

    kind: str
    fields: dict = field(default_factory=dict)


Listener = Callable[[Event], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def report(kind: str, **fields) -> None:
    """Tell every listener; a listener's own error is logged at debug level and ignored."""
    if not _listeners:
        return
    event = Event(kind, fields)
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - a display must never break training
            log.debug("progress listener %r failed", listener, exc_info=True)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


@contextmanager
def step(name: str) -> Iterator[None]:
    """A named step: step_start, then step_end with its seconds and whether it failed."""
    report("step_start", name=name)
    started = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        report("step_end", name=name, seconds=time.perf_counter() - started, ok=ok)
