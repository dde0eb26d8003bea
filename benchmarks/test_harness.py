"""The benchmark's harness on the CPU: the shared timer (topopack.model.timing), host time, launch counts, the
memory meter and the compile caches."""
import os
import time

import pytest
import torch

from benchmarks.contenders import FLEX_IMPLS, Case, Config, build_impl
from benchmarks.harness import MemMeter, fresh_compile_caches, host_us, launches_per_call, prewarm_jobs
from topopack.model.timing import median_seconds

CPU = torch.device("cpu")


def test_median_seconds_leaves_out_the_warm_up_call():
    calls = []

    def fn():  # a slow first call (a compile), then 10 ms calls
        time.sleep(0.3 if not calls else 0.01)
        calls.append(1)

    seconds = median_seconds(fn, 3, CPU)
    assert 0.01 <= seconds < 0.1
    assert len(calls) >= 1 + 3


def test_median_seconds_clears_grads_before_each_call():
    x = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad is None)
        (2 * x).sum().backward()

    median_seconds(fn, 2, CPU, grads=(x,))
    assert all(seen) and len(seen) >= 3


def test_median_seconds_refuses_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, 0, CPU)


def test_host_us_is_the_time_inside_the_call():
    assert 20_000 <= host_us(lambda: time.sleep(0.02), CPU) < 200_000


def test_launches_per_call_counts_top_level_aten_ops_on_the_cpu():
    a = torch.randn(8, 8)
    # matmul calls aten::mm inside it: one top-level op; the add is the second
    assert launches_per_call(lambda: a @ a + 1, CPU) == 2
    assert launches_per_call(lambda: torch.mm(a, a), CPU) == 1


def test_launches_per_call_clears_grads_first():
    x = torch.ones(4, requires_grad=True)
    seen = []

    def fwdbwd():
        seen.append(x.grad is None)
        (x * x).sum().backward()

    fwdbwd()
    launches_per_call(fwdbwd, CPU, grads=(x,))
    assert seen == [True, True]


def test_mem_meter_sees_a_cpu_allocation():
    meter = MemMeter(CPU)
    if not meter.cpu_ok:
        pytest.skip("/proc/self/clear_refs is not writable here")
    base = meter.current()
    meter.reset_peak()
    block = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
    assert meter.peak() - base >= 60 * 2 ** 20
    del block


def test_fresh_compile_caches_set_and_restore_the_cache_dirs(monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with fresh_compile_caches(True):
        dirs = os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]
        assert os.path.dirname(dirs[0]) == os.path.dirname(dirs[1]) != "/somewhere"
        assert os.path.isdir(os.path.dirname(dirs[0]))
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert not os.path.exists(os.path.dirname(dirs[0]))


def test_prewarm_jobs_are_the_flex_contenders_that_run():
    cfg = Config(device="cpu", sizes=(30, 40), heads=1, head_dim=8)
    runs = {(side, name) for side in cfg.sizes for name in FLEX_IMPLS
            if not build_impl(name, Case(cfg, side, CPU), free_bytes=lambda: 0).skip}
    assert set(prewarm_jobs(cfg)) == runs and (40, "flex-interleaved") not in runs
    assert prewarm_jobs(Config(device="cpu", sizes=(30,), impls=("topopack-portable", "flex-arith"))) == \
        [(30, "flex-arith")]
