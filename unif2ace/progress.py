"""Progress output for long loops: a tqdm bar on a terminal, a few whole lines in a log.

Every long loop of the package (training, tokenizer training, token caching, rendering, evaluation, MaskGIT
sampling) wraps its iterable in `progress_bar(...)`:

* stderr is a terminal: a tqdm bar, redrawn in place;
* stderr is a file or a pipe (`unif2ace demo > log 2>&1`, CI): no redraws. A loop writes one line when it has been
  running for a while and passes a quarter of its length (25, 50, 75 %), or every `LOG_INTERVAL_S` seconds when
  its length is unknown, and one summary line when it ends (unless it took under two seconds), so a whole demo
  run stays a few hundred lines;
* `set_progress(False)` (the command line's `--no-progress`) turns every bar and line off.

The object returned supports the part of tqdm's interface the package uses: iteration, `update`, `set_postfix`,
`set_description`, `close` and use as a context manager.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

LOG_INTERVAL_S = 60.0    # plain mode: at most one line per this many seconds when the loop's length is unknown
MIN_LINE_GAP_S = 5.0     # plain mode: no quarter line sooner than this after the previous line (short loops)
MIN_SUMMARY_S = 2.0      # plain mode: loops shorter than this end without a summary line

_enabled = True


def set_progress(enabled: bool) -> None:
    """Turn all progress output of the package on or off (the command line's --no-progress)."""
    global _enabled
    _enabled = bool(enabled)


def progress_enabled() -> bool:
    return _enabled


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, desc: str = "", total: Optional[int] = None,
                 initial: int = 0, disable: bool = False, leave: bool = True, unit: str = "it", **tqdm_kwargs):
    """A tqdm bar on a terminal, a `LogProgress` (a few plain lines) otherwise; off when `disable` is true or
    `set_progress(False)` was called. Extra keyword arguments go to tqdm on a terminal."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or not _enabled:
        return LogProgress(iterable, desc=desc, total=total, initial=initial, silent=True)
    if _is_terminal(sys.stderr):
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, unit=unit, dynamic_ncols=True,
                    **tqdm_kwargs)
    return LogProgress(iterable, desc=desc, total=total, initial=initial, silent=False, unit=unit)


class LogProgress:
    """The non-terminal form of `progress_bar`: a handful of whole lines on stderr (or none when silent)."""

    def __init__(self, iterable=None, *, desc: str = "", total: Optional[int] = None, initial: int = 0,
                 silent: bool = False, unit: str = "it", stream=None):
        self.iterable = iterable
        self.desc = desc
        self.total = total
        self.n = initial
        self.initial = initial
        self.silent = silent
        self.unit = unit
        self.stream = stream
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.next_quarter = self._quarter_after(initial)
        self.closed = False

    # --- tqdm-compatible surface ---
    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LogProgress: no iterable to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.silent:
            return
        now = time.monotonic()
        if self.total:
            if self.n >= self.total:
                return  # the summary line at close() reports the end
            if self.n / self.total >= self.next_quarter / 4:
                self.next_quarter = self._quarter_after(self.n)
                if now - self.last_line >= MIN_LINE_GAP_S:
                    self._line(now)
        elif now - self.last_line >= LOG_INTERVAL_S:
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if not self.silent and self.n > self.initial and (now - self.start >= MIN_SUMMARY_S or self.last_line > self.start):
            self._line(now, final=True)

    # --- helpers ---
    def _quarter_after(self, n: int) -> int:
        if not self.total:
            return 5
        return min(4, int(4 * n / self.total) + 1)

    def _line(self, now: float, final: bool = False) -> None:
        self.last_line = now
        done = self.n - self.initial
        elapsed = now - self.start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total and not final else ""
        rate = f", {elapsed / done:.2f}s/{self.unit}" if done > 0 and elapsed / done >= 0.01 else ""
        post = f"; {self.postfix}" if self.postfix else ""
        verb = "done" if final else "at"
        text = f"{self.desc + ': ' if self.desc else ''}{verb} {count}{pct} in {elapsed:.1f}s{rate}{post}"
        stream = self.stream or sys.stderr
        print(text, file=stream, flush=True)
