"""Progress of a long export on a terminal: a bar on a tty, plain lines anywhere else."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 30
REDRAW_INTERVAL_S = 0.1  # a bar redrawn more often only costs time
LINE_EVERY_PERCENT = 10  # without a tty, one line per this much progress


class TerminalProgress:
    """A ``progress(done, total)`` callable that draws on ``stream`` (normally stderr).

    On a terminal it redraws one line in place: ``[#####.....]  50%  5,000/10,000
    exchanges``. Elsewhere (a log file, a pipe, CI) it prints a plain line at every 10%, so
    the log is readable and short.
    """

    def __init__(
        self,
        stream: TextIO,
        label: str = "exchanges",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.label = label
        self.is_tty = stream.isatty()
        self._clock = clock
        self._last_draw = float("-inf")
        self._last_step = -1
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        """Show that ``done`` of ``total`` are done."""
        percent = 100 if total <= 0 else min(100, done * 100 // total)
        if self.is_tty:
            self._draw_bar(done, total, percent)
        else:
            self._print_line(done, total, percent)

    def close(self) -> None:
        """End the bar's line, so that what follows starts on a fresh one."""
        if self.is_tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _draw_bar(self, done: int, total: int, percent: int) -> None:
        now = self._clock()
        if percent < 100 and now - self._last_draw < REDRAW_INTERVAL_S:
            return
        self._last_draw = now
        filled = BAR_WIDTH * percent // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.stream.write(f"\r[{bar}] {percent:3d}%  {done:,}/{total:,} {self.label}")
        self.stream.flush()
        self._drawn = True

    def _print_line(self, done: int, total: int, percent: int) -> None:
        step = percent // LINE_EVERY_PERCENT
        if step == self._last_step:
            return
        self._last_step = step
        self.stream.write(f"export: {percent}% ({done:,}/{total:,} {self.label})\n")
        self.stream.flush()
