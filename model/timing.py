"""Median wall-clock seconds of a call that waits for the GPU: the demo's, the encoder's and the benchmarks' timer."""
from __future__ import annotations

import statistics

import torch
from torch.utils.benchmark import Timer


def median_seconds(fn, repeats: int, device: torch.device, *, grads=(), rep_ms: int = 100) -> float:
    """Median seconds of one call of ``fn`` after an untimed warm-up call (compiles, autotunes).

    CPU: ``torch.utils.benchmark.Timer`` at torch's thread count, about ``repeats`` timed calls and at least 0.2 s of
    them (calls under ~10 ms are timed in blocks, a block giving one per-call time). CUDA: ``triton.testing.do_bench``,
    which times as many calls as fill ``rep_ms``. ``grads``: tensors whose ``.grad`` is cleared before each call.
    """
    if repeats < 1:
        raise ValueError(f"median_seconds: repeats must be at least 1, got {repeats}")
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="median") / 1e3

    def call():
        for g in grads:
            g.grad = None
        fn()

    timer = Timer("call()", globals={"call": call}, num_threads=torch.get_num_threads())
    # min_run_time=0: one warm-up call (Timer's block-size estimate), then one timed call
    times = timer.blocked_autorange(min_run_time=0).times
    if repeats > 1:  # its block-size estimate is a second untimed call
        times += timer.blocked_autorange(min_run_time=max((repeats - 1) * times[0], 0.2)).times
    return statistics.median(times)
