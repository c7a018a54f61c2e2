"""Progress of long work on stderr, drawn in one place for every dgq-* command.

On a terminal: a tqdm bar, as before. Anywhere else (a log file, a pipe, a CI job): a plain
line at most every INTERVAL_S seconds — what, how far, elapsed, time left, the running value
(set_postfix) — and none of the carriage returns and cursor moves that fill a log with one
redrawn bar after another. Nested bars (quantize's layers, each layer's calibration) share
that one line, outermost first, so a log gets one line per interval however deep the nesting.
Work done within the first interval prints nothing; a bar that printed and has leave=True ends
with a "done" line, or "stopped at" n/total when it closed short of its total (a break, an
error, an interrupt).
"""
from __future__ import annotations

import sys
import threading
import time

INTERVAL_S = 30.0            # plain lines: at most one this often, all bars together
_clock = time.monotonic      # tests replace it

_lock = threading.Lock()
_active: list[_Lines] = []   # open plain bars, outermost first
_state = {"last": 0.0, "lines": 0}


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 leave: bool = True, enabled: bool = True, file=None, **tqdm_kw):
    """A bar over `iterable` or `total` steps: iterate it, or update(n) / set_postfix(**values) /
    close(); a context manager too. enabled False shows nothing. On a terminal this is
    tqdm(iterable, total, desc, unit, leave, file, **tqdm_kw); elsewhere plain lines (above)."""
    file = sys.stderr if file is None else file
    if enabled and _is_terminal(file):
        from tqdm import tqdm  # noqa: PLC0415
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file, **tqdm_kw)
    unknown = set(tqdm_kw) - {"disable", "initial", "dynamic_ncols", "ncols", "mininterval", "smoothing"}
    if unknown:                                        # the plain bar would drop them silently
        raise TypeError(f"progress_bar: the plain bar does not take {sorted(unknown)}")
    bar = _Lines(iterable, total, desc, unit, leave, file, enabled and not tqdm_kw.get("disable", False))
    bar.n = int(tqdm_kw.get("initial", 0))
    return bar


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):      # no isatty, or a closed stream
        return False


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Lines:
    """The plain-line bar (and, with show False, the silent one): tqdm's update / set_postfix /
    close / n, so callers need not know which they got."""

    def __init__(self, iterable, total, desc, unit, leave, file, show):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.leave, self.file, self.show = leave, file, show
        self.n, self.postfix, self.closed = 0, {}, False
        self.t0 = _clock()
        if show:
            with _lock:
                if not _active:                  # the first line comes an interval after the work starts
                    _state["last"] = self.t0
                _active.append(self)
                self.lines_at_start = _state["lines"]

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.show:
            return
        with _lock:
            now = _clock()
            if now - _state["last"] >= INTERVAL_S:
                self._write(" | ".join(b._status(now) for b in _active))
                _state["last"] = now

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.show:
            return
        with _lock:
            if self in _active:
                _active.remove(self)
            if self.leave and _state["lines"] > self.lines_at_start:   # it printed: say how it ended
                self._write(self._status(_clock(), done=True))

    def _status(self, now: float, done: bool = False) -> str:
        el = now - self.t0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if done:          # short of its total: a break, an error or an interrupt, not the end
            ended = "done" if not self.total or self.n >= self.total else "stopped at"
            parts = [f"[{self.desc}] {ended}: {count} in {_duration(el)}"]
        else:
            parts = [f"[{self.desc}] {count}"]
            if self.total:
                parts[0] += f" ({100 * self.n // self.total}%)"
            parts.append(f"{_duration(el)} elapsed")
            if self.total and 0 < self.n < self.total:
                parts.append(f"~{_duration(el * (self.total - self.n) / self.n)} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _write(self, line: str) -> None:
        _state["lines"] += 1
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except (OSError, ValueError):   # a closed or broken stderr must not stop hours of work
            pass
