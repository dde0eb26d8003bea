"""Topo-pack attention vs dense SDPA, the authors' L x L mask and FlexAttention.

    python -m benchmarks.attention --device cpu --quick --json out.json --markdown out.md --plot out.png
    python -m benchmarks.attention --device cuda --results   # JSON + markdown + PNG into benchmarks/results/

Every impl runs on the same random q, k, v ([1, H, L, D], topopack's token order
[global, summaries, patches pack-major]) for a full side x side grid:

- topopack-triton / topopack-portable: the topopack backends available on the device;
- dense: F.scaled_dot_product_attention over all L tokens, no mask (flash backend on CUDA);
- authors: one SDPA call with a dense L x L additive mask (skipped, with the memory
  it needs, beyond what fits);
- flex / flex-arith: compiled FlexAttention with a block mask from a mask_mod that reads
  kind/pack index tensors, or derives them from the index arithmetically;
- flex-interleaved: FlexAttention in the authors' token order [G, P1..P9, S1, P10..], small sizes;
- floor: dense SDPA over the global + summary tokens alone plus one copy the size of
  q, k, v and o (three copies for forward + backward).

Times are medians (triton.testing.do_bench on CUDA; timed runs after a warm-up on the
CPU). Peak memory is allocator peak above the inputs on CUDA and the RSS high-water
above the starting RSS on the CPU. setup_ms is the per-new-slide cost (layout build,
create_block_mask, or the L x L mask), setup_first_ms the first one (compiles).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from topopack.layout import TopoLayout
from topopack.rules import RULES_BY_NAME, PATCH, SUMMARY, allowed

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLS = ("topopack-triton", "topopack-portable", "dense", "authors", "flex", "flex-arith", "flex-interleaved", "floor")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = {"cuda": (63, 192, 321, 447), "cpu": (32, 64, 96)}
QUICK_SIZES = {"cuda": (63, 192), "cpu": (32, 64)}
# flex-interleaved is near-dense (summaries spread over every block): small sizes only
INTERLEAVED_MAX_TOKENS = {"cuda": 50_000, "cpu": 1_500}


@dataclass
class Config:
    device: str = "cpu"
    sizes: tuple[int, ...] = ()
    heads: int = 8
    head_dim: int = 64
    dtype: str = ""
    rules: str = "paper"
    pack_size: int = 3
    batch: int = 1
    quick: bool = False
    impls: tuple[str, ...] = IMPLS
    max_mask_gb: float | None = None  # authors' mask limit; default from free memory
    seed: int = 0
    fresh_compile_cache: bool = True

    def __post_init__(self):
        self.sizes = tuple(self.sizes) or (QUICK_SIZES if self.quick else DEFAULT_SIZES)[self.device]
        self.dtype = self.dtype or ("bf16" if self.device == "cuda" else "fp32")
        unknown = set(self.impls) - set(IMPLS)
        if unknown:
            raise ValueError(f"unknown impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
        if self.rules not in RULES_BY_NAME:
            raise ValueError(f"unknown rules {self.rules!r}; choose from {sorted(RULES_BY_NAME)}")


@dataclass
class Record:
    impl: str
    device: str
    device_name: str
    grid_side: int
    n_patches: int
    n_tokens: int
    heads: int
    head_dim: int
    dtype: str
    rules: str
    batch: int = 1
    pack_size: int = 3
    status: str = "ok"  # ok | skipped | unavailable | oom | failed
    note: str = ""
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mem_mb: float | None = None
    setup_ms: float | None = None
    setup_first_ms: float | None = None
    first_call_ms: float | None = None  # first forward (compiles, autotunes)
    first_fwdbwd_ms: float | None = None  # first forward + backward
    max_abs_err: float | None = None  # vs topopack-portable's output
    fwd_vs_topopack: float | None = None
    fwdbwd_vs_topopack: float | None = None
    fwd_x_floor: float | None = None
    fwdbwd_x_floor: float | None = None
    torch_version: str = torch.__version__
    timing: str = ""


@dataclass
class Impl:
    """One contender: how to set it up for a new slide and how to call it."""

    forward: Callable  # forward(state, q, k, v) -> out in its own token order
    setup: Callable | None = None  # setup() -> state, once per new slide
    backward: bool = True
    fwdbwd: Callable | None = None  # custom forward + backward(state); default: forward then out.backward
    permute: torch.Tensor | None = None  # its token order, as indices into topopack's
    compare: bool = True  # check its output against topopack's
    skip: str = ""  # reason it does not run


# ---- devices, timing, memory ------------------------------------------------------------
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def median_ms(fn, device, quick: bool, grads=(), warm: bool = True) -> float:
    """Median time of fn: do_bench on CUDA; on the CPU timed runs after a warm-up
    (skipped when warm), at least 3 (5) and more while under 1 s (3 s)."""
    def run():
        for g in grads:
            g.grad = None
        fn()

    if device.type == "cuda":
        try:
            import triton.testing
        except ImportError:
            triton = None
        if triton is not None:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100 if quick else 300,
                                                 grad_to_none=list(grads) or None, return_mode="median"))
    if not warm:
        run()
    (least, most, budget) = (3, 10, 1.0) if quick else (5, 30, 3.0)
    times, t_end = [], time.perf_counter() + budget
    while len(times) < least or (len(times) < most and time.perf_counter() < t_end):
        times.append(timed_ms(run, device)[1])
    return statistics.median(times)


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


# ---- the contenders ---------------------------------------------------------------------
class Case:
    """One grid size: the layout, the shared random inputs, the reference output."""

    def __init__(self, cfg: Config, side: int, device: torch.device):
        self.cfg, self.side, self.device = cfg, side, device
        self.rules = RULES_BY_NAME[cfg.rules]
        self.dtype = DTYPES[cfg.dtype]
        self.layout = TopoLayout.from_grid(side, side, cfg.pack_size, device=device)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + side)
        shape = (cfg.batch, cfg.heads, self.layout.num_tokens, cfg.head_dim)
        self.qkv = tuple(torch.randn(shape, generator=gen).to(device, self.dtype) for _ in range(3))
        self.dout = torch.randn(shape, generator=gen).to(device, self.dtype)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.reference: torch.Tensor | None = None  # topopack-portable's forward output

    @property
    def n_tokens(self) -> int:
        return self.layout.num_tokens

    def new_layout(self) -> TopoLayout:
        """What a new slide costs topopack: its layout."""
        return TopoLayout.from_grid(self.side, self.side, self.cfg.pack_size, device=self.device)


def topopack_impl(case: Case, backend: str) -> Impl:
    from topopack.backends import get_backend

    if backend == "triton" and case.device.type != "cuda":
        return Impl(forward=None, skip="the Triton kernels run on CUDA")
    try:
        fn = get_backend(backend, case.device)
    except ImportError as e:
        return Impl(forward=None, skip=f"unavailable: {e}")
    rules, scale = case.rules, case.scale
    return Impl(forward=lambda layout, q, k, v: fn(q, k, v, layout, rules, scale), setup=case.new_layout)


def dense_impl(case: Case) -> Impl:
    scale = case.scale

    def forward(_, q, k, v):
        if q.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return Impl(forward=forward, compare=False)


def authors_mask(layout: TopoLayout, rules, dtype) -> torch.Tensor:
    """The authors' dense L x L additive mask (0 allowed, -inf masked), built in row chunks.

    Rows are padded to a multiple of 16 elements so that the memory-efficient SDPA
    kernel takes the mask without copying it.
    """
    n = layout.num_tokens
    mask = torch.empty(n, -(-n // 16) * 16, dtype=dtype, device=layout.device)[:, :n]
    kind, pack, slide = layout.token_kind.long(), layout.token_pack, layout.token_slide
    step = max(1, (1 << 24) // n)
    for r in range(0, n, step):
        ok = allowed(rules, kind[r:r + step, None], pack[r:r + step, None], slide[r:r + step, None],
                     kind[None], pack[None], slide[None])
        mask[r:r + step].zero_().masked_fill_(~ok, float("-inf"))
    return mask


def authors_mask_bytes(n_tokens: int, dtype: torch.dtype) -> int:
    return n_tokens * (-(-n_tokens // 16) * 16) * torch.finfo(dtype).bits // 8


def authors_impl(case: Case, meter: MemMeter) -> Impl:
    need = authors_mask_bytes(case.n_tokens, case.dtype)
    limit = meter.free() * 0.7 if case.cfg.max_mask_gb is None else case.cfg.max_mask_gb * 2 ** 30
    if need > limit:
        return Impl(forward=None, skip=f"needs {need / 2 ** 30:.1f} GiB for the L x L mask "
                                        f"(limit {limit / 2 ** 30:.1f} GiB)")
    scale, rules, dtype = case.scale, case.rules, case.dtype
    return Impl(forward=lambda mask, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
                setup=lambda: authors_mask(case.layout, rules, dtype))


def flex_impl(case: Case, variant: str) -> Impl:
    from topopack.kernels import flex

    layout, rules, scale = case.layout, case.rules, case.scale
    no_bwd = case.device.type == "cpu"
    permute = None
    if variant == "flex":
        make = lambda: flex.layout_mask_mod(layout, rules)
    elif variant == "flex-arith":
        h, w = flex.grid_shape(layout)
        make = lambda: flex.grid_mask_mod(h, w, layout.pack_size, rules)
    else:
        if case.n_tokens > INTERLEAVED_MAX_TOKENS[case.device.type]:
            return Impl(forward=None, skip=f"small sizes only (L > {INTERLEAVED_MAX_TOKENS[case.device.type]})")
        permute = interleaved_order(layout)
        kind, pack, slide = (t[permute] for t in (layout.token_kind, layout.token_pack, layout.token_slide))
        make = lambda: flex.index_mask_mod(kind, pack, slide, rules)
    fn = flex.compiled_flex(dynamic=False)

    def setup():
        return flex.build_block_mask(make(), case.n_tokens, case.device, compile=case.device.type == "cuda")

    return Impl(forward=lambda bm, q, k, v: fn(q, k, v, block_mask=bm, scale=scale), setup=setup,
                backward=not no_bwd, permute=permute)


def interleaved_order(layout: TopoLayout) -> torch.Tensor:
    """The authors' token order [G, P1..P9, S1, P10..P18, S2, ...] as indices into topopack's order."""
    if layout.num_slides != 1:
        raise ValueError("interleaved_order: one slide only")
    kind, pack = layout.token_kind.long(), layout.token_pack
    t = torch.arange(layout.num_tokens, device=layout.device)
    # a pack's patches in token order, then its summary; the global token first
    key = torch.where(kind == PATCH, pack * (layout.num_tokens + 1) + t,
                      torch.where(kind == SUMMARY, pack * (layout.num_tokens + 1) + layout.num_tokens, -1))
    return torch.argsort(key)


def floor_impl(case: Case) -> Impl:
    """Dense SDPA over the global + summary tokens, plus copies the size of q, k, v and o."""
    n_gs = 1 + case.layout.num_packs
    q, k, v = (t[:, :, :n_gs].clone() for t in case.qkv)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dout = case.dout[:, :, :n_gs].clone()
    src = torch.empty(4 * case.qkv[0].numel(), dtype=case.dtype, device=case.device).normal_()
    dst = torch.empty_like(src)
    attend = dense_impl(case).forward

    def forward(*_):
        attend(None, q, k, v)
        dst.copy_(src)

    def fwdbwd(*_):
        attend(None, qg, kg, vg).backward(dout)
        for _ in range(3):
            dst.copy_(src)

    return Impl(forward=forward, fwdbwd=fwdbwd, compare=False)


def build_impl(name: str, case: Case, meter: MemMeter) -> Impl:
    if name.startswith("topopack-"):
        return topopack_impl(case, name.split("-", 1)[1])
    if name.startswith("flex"):
        return flex_impl(case, name)
    return {"dense": lambda: dense_impl(case), "authors": lambda: authors_impl(case, meter),
            "floor": lambda: floor_impl(case)}[name]()


# ---- measuring one contender ------------------------------------------------------------
def measure(name: str, case: Case, cfg: Config, meter: MemMeter, dev_name: str) -> Record:
    lay = case.layout
    rec = Record(impl=name, device=case.device.type, device_name=dev_name, grid_side=case.side,
                 n_patches=lay.num_patches, n_tokens=lay.num_tokens, heads=cfg.heads, head_dim=cfg.head_dim,
                 dtype=cfg.dtype, rules=cfg.rules, batch=cfg.batch, pack_size=cfg.pack_size,
                 timing="triton.testing.do_bench median" if case.device.type == "cuda" else "median of timed runs")
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        impl = build_impl(name, case, meter)
        if impl.skip:
            rec.status = "unavailable" if impl.skip.startswith("unavailable") else "skipped"
            rec.note = impl.skip
            return rec
        _run(impl, case, cfg, meter, rec)
    except torch.OutOfMemoryError as e:
        rec.status, rec.note = "oom", f"out of memory: {str(e).splitlines()[0][:160]}"
    except Exception as e:  # one contender failing must not stop the run
        traceback.print_exc(limit=4)
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        rec.status, rec.note = "failed", f"{type(e).__name__}: {first_line}"
    return rec


def _run(impl: Impl, case: Case, cfg: Config, meter: MemMeter, rec: Record) -> None:
    device = case.device
    q, k, v = case.qkv
    dout = case.dout
    if impl.permute is not None:
        q, k, v, dout = (t[:, :, impl.permute].contiguous() for t in (q, k, v, dout))
    mem0 = meter.current()
    state = None
    if impl.setup is not None:
        state, rec.setup_first_ms = timed_ms(impl.setup, device)
        times = []
        for _ in range(1 if cfg.quick else 3):
            state = None
            state, ms = timed_ms(impl.setup, device)
            times.append(ms)
        rec.setup_ms = statistics.median(times)

    with torch.no_grad():
        out, rec.first_call_ms = timed_ms(lambda: impl.forward(state, q, k, v), device)
    if impl.compare and out is not None:
        if impl.permute is not None:
            out = out[:, :, torch.argsort(impl.permute)]
        if case.reference is None:
            case.reference = out.float()
        else:
            rec.max_abs_err = float((out.float() - case.reference).abs().max())
    del out

    grads = ()
    if impl.fwdbwd is not None:
        fwdbwd = lambda: impl.fwdbwd(state)
    elif impl.backward:
        grads = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
        fwdbwd = lambda: impl.forward(state, *grads).backward(dout)
    else:
        fwdbwd = None
        rec.note = "no backward on the CPU (FlexAttention)"

    def forward():
        with torch.no_grad():
            impl.forward(state, q, k, v)

    # peak memory of one forward + backward (forward alone if none), per-slide state included
    if fwdbwd is not None and device.type == "cuda":  # the first backward compiles and autotunes
        _, rec.first_fwdbwd_ms = timed_ms(fwdbwd, device)
        for g in grads:
            g.grad = None
    meter.current()  # collect garbage (and trim the CPU heap) first
    meter.reset_peak()
    _, ms = timed_ms(fwdbwd or forward, device)
    peak = meter.peak()
    if fwdbwd is not None and rec.first_fwdbwd_ms is None:
        rec.first_fwdbwd_ms = ms
    if peak is not None and mem0 is not None:
        rec.peak_mem_mb = max(0, peak - mem0) / 2 ** 20

    rec.fwd_ms = median_ms(forward, device, cfg.quick)  # warm: the first call and the memory run
    if fwdbwd is not None:
        rec.fwdbwd_ms = median_ms(fwdbwd, device, cfg.quick, grads)


def add_ratios(records: list[Record]) -> None:
    """Peer time / topopack time, and topopack time / floor time, per size."""
    by = {r.impl: r for r in records}
    ok = lambda name: by.get(name) if by.get(name) is not None and by[name].status == "ok" else None
    topo = ok("topopack-triton") or ok("topopack-portable")
    floor = ok("floor")
    for r in records:
        if r.status != "ok":
            continue
        for kind in ("fwd", "fwdbwd"):
            mine = getattr(r, f"{kind}_ms")
            if topo is not None and mine is not None and getattr(topo, f"{kind}_ms"):
                setattr(r, f"{kind}_vs_topopack", mine / getattr(topo, f"{kind}_ms"))
            if r.impl.startswith("topopack-") and floor is not None and mine is not None and getattr(floor, f"{kind}_ms"):
                setattr(r, f"{kind}_x_floor", mine / getattr(floor, f"{kind}_ms"))


# ---- output -----------------------------------------------------------------------------
def _fmt(x, spec=".3g", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def progress_line(r: Record) -> str:
    head = f"[side {r.grid_side:>3} | N={r.n_patches} L={r.n_tokens}] {r.impl:<17}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.note}"
    return (f"{head} fwd {_fmt(r.fwd_ms)} ms  fwd+bwd {_fmt(r.fwdbwd_ms)} ms  peak {_fmt(r.peak_mem_mb, '.4g')} MB  "
            f"setup {_fmt(r.setup_ms)} ms (first {_fmt(r.setup_first_ms)})  "
            f"1st call {_fmt(r.first_call_ms)} / {_fmt(r.first_fwdbwd_ms)} ms"
            + (f"  err {r.max_abs_err:.2g}" if r.max_abs_err is not None else ""))


def markdown(records: list[Record], cfg: Config, wall_s: float) -> str:
    r0 = records[0]
    lines = [
        f"## {r0.device_name}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {cfg.dtype}, "
        f"B={cfg.batch}, H={cfg.heads}, D={cfg.head_dim}, pack {cfg.pack_size}, rules {cfg.rules}"
        f"{', quick' if cfg.quick else ''}; {r0.timing}; whole run {wall_s:.0f} s.",
        "",
        "÷topo: the peer's time over topopack's (triton where it ran, else portable); ×floor: topopack's time "
        "over the floor proxy's. Peak: memory above the inputs during one forward+backward (forward only where "
        f"there is no backward), {'allocator peak' if cfg.device == 'cuda' else 'RSS high-water'}. "
        "Setup: per new slide (first one, with compiles, in brackets). Err: max |out − topopack-portable's out|.",
        "",
        "| side | patches | tokens | impl | fwd ms | ÷topo | fwd+bwd ms | ÷topo | ×floor fwd / f+b | peak MB "
        "| setup ms (first) | 1st call ms fwd / f+b | err | note |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        floor = "" if r.fwd_x_floor is None else f"{_fmt(r.fwd_x_floor)} / {_fmt(r.fwdbwd_x_floor)}"
        setup = "" if r.setup_ms is None else f"{_fmt(r.setup_ms)} ({_fmt(r.setup_first_ms)})"
        first = "" if r.first_call_ms is None else f"{_fmt(r.first_call_ms)} / {_fmt(r.first_fwdbwd_ms)}"
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        lines.append(
            f"| {r.grid_side} | {r.n_patches} | {r.n_tokens} | {r.impl} | {_fmt(r.fwd_ms)} | {_fmt(r.fwd_vs_topopack)} "
            f"| {_fmt(r.fwdbwd_ms)} | {_fmt(r.fwdbwd_vs_topopack)} | {floor} | {_fmt(r.peak_mem_mb, '.4g')} | {setup} "
            f"| {first} | {_fmt(r.max_abs_err, '.2g')} | {note} |")
    return "\n".join(lines) + "\n"


def plot(records: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for ax, kind, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for impl in IMPLS:
            pts = sorted((r.n_patches, getattr(r, kind)) for r in records
                         if r.impl == impl and r.status == "ok" and getattr(r, kind) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl, color=f"C{IMPLS.index(impl)}",
                        linestyle="--" if impl == "floor" else "-")
        ax.set(xscale="log", yscale="log", xlabel="patches", ylabel="median time (ms)", title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    r0 = records[0]
    fig.suptitle(f"topo-pack attention, {r0.device_name}, {r0.dtype}, H={r0.heads}, D={r0.head_dim}, {r0.rules}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_stem(name: str, quick: bool) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(.*?\)", "", name).lower()).strip("-")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS_DIR / f"{slug}_{stamp}{'_quick' if quick else ''}"


# ---- command line -----------------------------------------------------------------------
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


def run(cfg: Config) -> list[Record]:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    # every (size, mask_mod) compiles its own static flex kernel
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
    meter, dev_name = MemMeter(device), device_name(device)
    records = []
    for side in cfg.sizes:
        case = Case(cfg, side, device)
        impls = [n for n in IMPLS if n in cfg.impls]
        if "topopack-portable" in impls:  # first: its output is the reference for the error column
            impls.remove("topopack-portable")
            impls.insert(0, "topopack-portable")
        size_records = []
        for name in impls:
            print(f"[side {side:>3} | N={case.layout.num_patches} L={case.n_tokens}] {name} ...", file=sys.stderr,
                  flush=True)
            rec = measure(name, case, cfg, meter, dev_name)
            print(progress_line(rec), file=sys.stderr, flush=True)
            size_records.append(rec)
        add_ratios(size_records)
        records += sorted(size_records, key=lambda r: IMPLS.index(r.impl))
        del case
    return records


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", help="grid sides (default: GPU 63 192 321 447, CPU 32 64 96)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--rules", choices=sorted(RULES_BY_NAME), default="paper")
    p.add_argument("--pack-size", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="contenders to run")
    p.add_argument("--max-mask-gb", type=float, help="largest L x L mask for 'authors' (default: 70%% of free memory)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="two sizes, fewer repeats")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="reuse the inductor/Triton caches (default: fresh ones, so first-call compiles are real)")
    p.add_argument("--json", type=Path, help="write the records as a JSON list")
    p.add_argument("--markdown", type=Path, help="write a markdown table")
    p.add_argument("--plot", type=Path, help="write a log-log PNG of time vs patches")
    p.add_argument("--results", action="store_true", help="write JSON, markdown and PNG to benchmarks/results/")


def main(args: argparse.Namespace) -> int:
    cfg = Config(device=args.device, sizes=tuple(args.sizes or ()), heads=args.heads, head_dim=args.head_dim,
                 dtype=args.dtype or "", rules=args.rules, pack_size=args.pack_size, batch=args.batch,
                 quick=args.quick, impls=tuple(args.impls), max_mask_gb=args.max_mask_gb,
                 fresh_compile_cache=not args.keep_compile_cache)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"benchmark: {cfg}, {torch.get_num_threads()} CPU threads", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with fresh_compile_caches(cfg.fresh_compile_cache):
        records = run(cfg)
    wall = time.perf_counter() - t0
    table = markdown(records, cfg, wall)
    print(table)
    json_path, md_path, png_path = args.json, args.markdown, args.plot
    if args.results:
        stem = results_stem(records[0].device_name, cfg.quick)
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path = json_path or stem.with_suffix(".json")
        md_path = md_path or stem.with_suffix(".md")
        png_path = png_path or stem.with_suffix(".png")
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    if md_path:
        Path(md_path).write_text(table)
    if png_path:
        plot(records, Path(png_path))
    for p in (json_path, md_path, png_path):
        if p:
            print(f"wrote {p}", file=sys.stderr)
    print(f"done in {wall:.1f} s", file=sys.stderr)
    return 0 if records and all(r.status != "failed" for r in records) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
