"""Wall-clock medians that wait for the GPU: the demo's and the encoder throughput's timer."""
from __future__ import annotations

import time

import torch


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call (compiles, autotunes)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
