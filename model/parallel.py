"""Independent per-slide work on every core: ``parallel_map(fn, items, workers)`` keeps the order of ``items``.

Workers are spawned processes (no fork of a process that already runs torch threads); ``fn`` must be a top-level
function. With ``workers <= 1`` it is a plain loop in this process, with the same results.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from topopack.model.progress import progress


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _one_thread() -> None:
    """A worker beside others: one torch thread each (two threads per process on a shared core run ~3x slower)."""
    import torch

    torch.set_num_threads(1)


def parallel_map(fn, items, workers: int = 1, *, desc: str = "", show: bool = True) -> list:
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [fn(x) for x in progress(items, desc=desc, disable=not show)]
    chunk = max(1, min(64, len(items) // (8 * workers)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        return list(progress(pool.map(fn, items, chunksize=chunk), desc=desc, total=len(items), disable=not show))


def is_main_process() -> bool:
    """Rank 0 under torchrun (or no torchrun): the one process that writes files."""
    return int(os.environ.get("RANK", "0")) == 0
