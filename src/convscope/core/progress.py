"""One progress helper for every long loop: a tqdm bar with an ETA that also works in logs.

``progress`` follows one convention everywhere: ``True`` shows the bar from the start, ``False`` never, and
``None`` (auto) shows it only once the work has run for :data:`AUTO_DELAY_S` seconds, so quick calls stay
silent and long ones always report.

On a terminal (or in a notebook) this is the usual tqdm bar. When stderr is not a terminal (output redirected
to a log file, a CI job), a bar redraws with carriage returns many times a second, which a log cannot show; here
it prints one plain, time-stamped line every :data:`LOG_INTERVAL_S` seconds instead (and when it finishes),
e.g. ``[12:03:41] occlusion: 38% 61/160 batch [00:40<01:05, 1.52 batch/s]``.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm as auto_tqdm

AUTO_DELAY_S = 2.0
"""``progress=None``: a bar appears once its work has run this many seconds."""

LOG_INTERVAL_S = 20.0
"""Seconds between lines when stderr is not a terminal."""

LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
"""The line printed to a log (no bar, no carriage return)."""

LOG_FORMAT_OPEN = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
"""The same for work of unknown size."""

ProgressBar = plain_tqdm
"""The type :func:`progress_bar` returns (a tqdm bar; for type hints of functions that take one)."""

_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LogLines:
    """A file-like target for tqdm that turns its redraws into whole lines: every non-blank status tqdm writes
    becomes one line ``[HH:MM:SS] status`` on ``stream``; cursor movements and blank clears are dropped."""

    repeat_s = 1.0
    """A status equal to the previous line (up to the timing fields) within this many seconds is not repeated."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last = ("", 0.0)

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]+", _CONTROL.sub("", text)):
            if not part.strip():
                continue
            key, now = part.split(" [")[0], time.monotonic()
            if key == self._last[0] and now - self._last[1] < self.repeat_s:
                continue  # the closing redraw of a line just printed
            self._last = (key, now)
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {part.rstrip()}\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_notebook() -> bool:
    return auto_tqdm is not plain_tqdm and getattr(auto_tqdm, "__module__", "").startswith("tqdm.notebook")


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", progress: bool | None = None, leave: bool = True, **kwargs: Any) -> plain_tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand up to ``total``) following the ``progress`` convention.

    ``progress``: ``True`` always, ``False`` never, ``None`` once the work has run :data:`AUTO_DELAY_S` s.
    Other keyword arguments go to tqdm (e.g. ``position=`` for stacked bars on a terminal, ``initial=``). Use it
    as an iterator, or as a context manager with ``update(k)``; call ``set_postfix(..., refresh=False)`` so a log
    still gets one line per interval.
    When stderr is not a terminal, it prints a time-stamped line every :data:`LOG_INTERVAL_S` s and a final one.
    """
    disable = progress is False or (sys.stderr is None and kwargs.get("file") is None)  # pythonw: nowhere to write
    delay = AUTO_DELAY_S if progress is None else 0.0
    if disable or _in_notebook() or is_terminal(kwargs.get("file")):
        return auto_tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, delay=delay, leave=leave,
                         **kwargs)
    stream = kwargs.pop("file", None) or sys.stderr
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("maxinterval", max(kwargs["mininterval"], 10.0))
    known = total is not None or (iterable is not None and hasattr(iterable, "__len__"))
    kwargs.setdefault("bar_format", LOG_FORMAT if known else LOG_FORMAT_OPEN)
    return plain_tqdm(iterable, total=total, desc=desc, unit=unit, delay=delay, leave=True, file=LogLines(stream),
                      ascii=True, dynamic_ncols=False, **kwargs)


__all__ = ["AUTO_DELAY_S", "LOG_FORMAT", "LOG_FORMAT_OPEN", "LOG_INTERVAL_S", "LogLines", "ProgressBar", "is_terminal",
           "progress_bar"]
