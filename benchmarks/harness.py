"""The benchmark's harness: timers, call counters, the memory meter and Flex's compile caches."""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.contenders import FLEX_IMPLS, INTERLEAVED_MAX_TOKENS, Case, Config, build_impl, calls
from topopack.model.timing import median_seconds


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    threads = f"({n} thread{'s' if n > 1 else ''})"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} {threads}"
    return f"{platform.processor() or platform.machine()} {threads}"


# ---- timers and counters ----------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device) -> tuple[object, float]:
    """One call's result and wall-clock ms, waiting for the device (first calls, set-ups)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def median_ms(fn, device, quick: bool, grads=()) -> float:
    """topopack.model.timing.median_seconds in ms: 3 (quick) or 5 timed calls on the CPU, 100 or 300 ms of
    do_bench runs on CUDA."""
    return 1e3 * median_seconds(fn, 3 if quick else 5, device, grads=grads, rep_ms=100 if quick else 300)


def host_us(fn, device, repeats: int = 3, grads=()) -> float:
    """Median CPU microseconds spent inside the Python call, not waiting for the device.

    time.perf_counter around the call only; the device is drained between calls, outside the timed span. On the
    CPU the work itself runs inside the call, so this is close to the call's wall time.
    """
    times = []
    for _ in range(repeats):
        for g in grads:
            g.grad = None
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync(device)
    return 1e6 * statistics.median(times)


def _top_level_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return event.name.startswith("aten::")


def launches_per_call(fn, device, grads=()) -> int:
    """Work items in one call, from torch.profiler: device kernels on CUDA (memcpy and memset left out); on the
    CPU the aten ops called from outside any other aten op."""
    cuda = device.type == "cuda"
    for g in grads:
        g.grad = None
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    if cuda:
        return sum(e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
                   for e in prof.events())
    return sum(_top_level_aten(e) for e in prof.events())


# ---- memory -----------------------------------------------------------------------------
class MemMeter:
    """Peak memory above a baseline: CUDA allocator stats, or RSS high-water on the CPU.

    On the CPU the baseline is taken after gc and malloc_trim, so that memory the
    allocator kept from earlier runs does not hide new allocations from the RSS.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = device.type != "cpu" or self._clear_refs()
        self._trim = lambda: None
        with contextlib.suppress(OSError, AttributeError):
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim

    @staticmethod
    def _status(key: str) -> int:
        m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
            return True
        except OSError:
            return False

    def current(self) -> int | None:
        gc.collect()
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if not self.cpu_ok:
            return None
        self._trim(0)
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_ok:
            self._clear_refs()

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM") if self.cpu_ok else None

    def free(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        m = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(m.group(1)) * 1024 // 4  # a shared machine: take a quarter


# ---- Flex's compile caches --------------------------------------------------------------
@contextlib.contextmanager
def fresh_compile_caches(enabled: bool):
    """Empty inductor and Triton caches for the run, so first-call compiles are measured cold."""
    if not enabled:
        yield
        return
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {key: os.environ.get(key) for key in keys}
    cache = tempfile.mkdtemp(prefix="topopack-bench-")
    os.environ.update({key: os.path.join(cache, key.split("_")[0].lower()) for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(cache, ignore_errors=True)


def raise_recompile_limits() -> None:
    """Every (size, mask_mod) compiles its own static flex kernel: let dynamo keep them all."""
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))


def prewarm_jobs(cfg: Config) -> list[tuple[int, str]]:
    """(side, flex contender) pairs the run will compile."""
    def runs(side, name):  # flex-interleaved skips large grids (global + summaries + patches tokens)
        tokens = 1 + (-(-side // cfg.pack_size)) ** 2 + side * side
        return name != "flex-interleaved" or tokens <= INTERLEAVED_MAX_TOKENS[cfg.device]
    return [(side, name) for side in cfg.sizes for name in FLEX_IMPLS if name in cfg.impls and runs(side, name)]


# The child imports torch before anything else, as `python -m benchmarks.attention` does: the FX graph cache key
# pickles torch.contiguous_format by the first module in sys.modules that reaches it, so a child with another
# import order (a multiprocessing child re-imports the parent's main module first) never hits the parent's cache.
_CHILD = "import torch, sys; from benchmarks.harness import _prewarm_child; _prewarm_child(sys.argv[1])"


def _prewarm_child(job: str) -> None:
    """Set up and call one flex contender once (forward, and forward + backward), so that its compiled kernels land
    in the inductor and Triton caches named by the environment."""
    spec = json.loads(job)
    torch._inductor.config.compile_threads = 1  # the parallelism is across processes (not part of cache keys)
    torch.set_num_threads(spec["threads"])  # CPU kernels are built for the thread count
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["cfg"].items()})
    device = torch.device(cfg.device)
    case = Case(cfg, spec["side"], device)
    impl = build_impl(spec["name"], case, free_bytes=lambda: 0)
    c = calls(impl, case, impl.setup())
    c.forward()
    if c.fwdbwd is not None:
        c.fwdbwd()
    sync(device)


def prewarm_flex(cfg: Config) -> tuple[int, float]:
    """Compile every flex kernel of the run first, one process per (side, contender), all in parallel, into the
    compile caches of this process's environment. Returns (kernels, seconds); failures are reported, and the run
    then compiles those as it goes."""
    jobs = prewarm_jobs(cfg)
    t0 = time.perf_counter()

    def one(job) -> str:
        side, name = job
        spec = json.dumps({"cfg": dataclasses.asdict(cfg), "side": side, "name": name,
                           "threads": torch.get_num_threads()})
        p = subprocess.run([sys.executable, "-c", _CHILD, spec], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True)
        return "" if p.returncode == 0 else f"side {side} {name}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        failed = [msg for msg in pool.map(one, jobs) if msg]
    for msg in failed:
        print(f"pre-warming flex failed ({msg}); it compiles during the run", file=sys.stderr)
    return len(jobs) - len(failed), time.perf_counter() - t0


def compile_cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
