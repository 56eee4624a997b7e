"""Progress of the long commands that are not training: `lorafit eval` (--baseline, --harness), merge, generate,
export. `lorafit eval --baseline` once printed nothing for 631 s.

The work runs deep inside evaluate/ and export/ functions that the Python API calls too; they say what they do
through ``stage()`` and count their loops through ``track()``, which do nothing unless a command opened a
reporter with ``reporting()``. So the API stays silent and the CLI shows, on stderr:

    [   0.4s] loading the adapter on its base
    [   3.1s] adapter: loss 12/40 batches
    ...
    [  45.7s] base (adapter disabled): generation 64/64 answers

On a terminal a count rewrites its own line; elsewhere (a log file, a pipe) it prints a line when it starts, at
most every ``interval`` seconds, and when it ends.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Reporter:
    """Writes stages and counts to a stream (looked up when written: typer's test runner swaps sys.stderr)."""

    def __init__(self, stream=None, *, interval: float = 10.0, tty: bool | None = None):
        self._stream, self.interval = stream, interval
        self.started = time.monotonic()
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.prefix = ""  # the current stage's subject ("adapter", "base (adapter disabled)") for counts
        self._last_line = 0.0
        self._open = False  # a terminal line being rewritten
        self.depth = 0  # counts running inside each other: only the outermost is shown

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.started:6.1f}s]"

    def stage(self, text: str, subject: str | None = None) -> None:
        if subject is not None:
            self.prefix = subject
        self._close_line()
        self.stream.write(f"{self._stamp()} {text}\n")
        self.stream.flush()

    def count(self, label: str, done: int, total: int | None, unit: str) -> None:
        now = time.monotonic()
        end = total is not None and done >= total
        of = f"/{total}" if total is not None else ""
        line = f"{self._stamp()} {self.prefix + ': ' if self.prefix else ''}{label} {done}{of} {unit}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if end else ""))
            self._open = not end
        elif done == 0 or end or now - self._last_line >= self.interval:
            self.stream.write(line + "\n")
            self._last_line = now
        self.stream.flush()

    def _close_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


_current: ContextVar[Reporter | None] = ContextVar("lorafit_progress", default=None)


@contextmanager
def reporting(stream=None, *, interval: float = 10.0) -> Iterator[Reporter]:
    """Show the stages and counts of everything called inside the block (the CLI's long commands)."""
    reporter = Reporter(stream, interval=interval)
    token = _current.set(reporter)
    try:
        yield reporter
    finally:
        reporter._close_line()
        _current.reset(token)


def stage(text: str, *, subject: str | None = None) -> None:
    """Say what starts now (a line of its own); ``subject`` prefixes the counts that follow. No reporter: nothing."""
    reporter = _current.get()
    if reporter is not None:
        reporter.stage(text, subject)


def track(items: Iterable[T], label: str, *, total: int | None = None, unit: str = "") -> Iterator[T]:
    """``items``, counted as they are taken (``total``: len(items) when it has one)."""
    reporter = _current.get()
    if reporter is None or reporter.depth:  # silent, or inside a count already shown (a batch inside a prompt)
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    reporter.depth += 1
    try:
        reporter.count(label, 0, total, unit)
        done = 0
        for item in items:
            yield item
            done += 1
            reporter.count(label, done, total, unit)
    finally:
        reporter.depth -= 1
