"""Progress for long loops: a tqdm bar on a terminal, a plain status line every few percent in a log.

    for step in progress(range(n), desc="train"):
        ...

A bar redrawn ten times a second floods a log file or a CI console; off a terminal the same loop prints about
ten lines in all.
"""
from __future__ import annotations

import os
import sys
import time


QUIET = "TOPOPACK_QUIET"  # "1": no progress at all (a worker process beside the one that reports)


def progress(iterable, *, desc: str = "", total: int | None = None, initial: int = 0, bar: bool | None = None,
             disable: bool = False, every: float = 10, file=None, **tqdm_kw):
    """``iterable`` wrapped in a tqdm bar when ``bar`` (None: when ``file``, default stderr, is a terminal),
    else in a reporter that prints ``desc: n/total (p%) ...`` each time another ``every`` percent is done.
    Both have ``set_postfix(dict)`` and ``close()``; ``disable`` shows nothing (other ranks)."""
    file = file or sys.stderr
    disable = disable or os.environ.get(QUIET) == "1"
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)
    if bar is None:
        bar = bool(getattr(file, "isatty", lambda: False)())
    if bar or disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, file=file,
                    dynamic_ncols=True, **tqdm_kw)
    return StatusLines(iterable, desc, total, initial, every, file)


class StatusLines:
    """The non-terminal side of :func:`progress`."""

    def __init__(self, iterable, desc: str, total: int | None, initial: int, every: float, file):
        self.iterable, self.desc, self.total, self.n, self.file = iterable, desc, total, initial, file
        self.stride = max(1, int(total * every / 100)) if total else None
        self.next = (initial // self.stride + 1) * self.stride if self.stride else None
        self.postfix: dict = {}
        self.start, self.first, self.closed = time.perf_counter(), initial, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            if self.next is not None and (self.n >= self.next or self.n == self.total):
                self.next = (self.n // self.stride + 1) * self.stride
                self.report()

    def set_postfix(self, postfix: dict | None = None, **kw) -> None:
        self.postfix = {**(postfix or {}), **kw}

    def report(self) -> None:
        elapsed = time.perf_counter() - self.start
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        eta = ""
        if self.total and self.n > self.first:
            eta = f", ~{elapsed / (self.n - self.first) * (self.total - self.n):.0f} s left"
        print(f"{self.desc}: {done} {extra} [{elapsed:.0f} s{eta}]".replace("  ", " "), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed and self.total is None:
            self.report()  # no percentages without a total: one line at the end
        self.closed = True
