"""The benchmark's records and what is made of them: ratios, the markdown table, the plot, the files."""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.contenders import FLEX_IMPLS, IMPLS, Config

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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
    host_fwd_us: float | None = None  # CPU time inside the Python call, no device wait
    host_fwdbwd_us: float | None = None
    launches_fwd: int | None = None  # device kernels per call (CUDA), top-level aten ops per call (CPU)
    launches_fwdbwd: int | None = None
    max_abs_err: float | None = None  # vs topopack-portable's output
    fwd_vs_topopack: float | None = None
    fwdbwd_vs_topopack: float | None = None
    fwd_vs_best_flex: float | None = None
    fwdbwd_vs_best_flex: float | None = None
    fwd_x_floor: float | None = None
    fwdbwd_x_floor: float | None = None
    torch_version: str = torch.__version__
    timing: str = ""


def add_ratios(records: list[Record]) -> None:
    """Per size: time / topopack's (triton where it ran, else portable), time / the fastest flex variant's, and
    topopack's time / the floor's."""
    ok = {r.impl: r for r in records if r.status == "ok"}
    topo = ok.get("topopack-triton") or ok.get("topopack-portable")
    floor = ok.get("floor")
    for kind in ("fwd", "fwdbwd"):
        time = lambda r: None if r is None else getattr(r, f"{kind}_ms")
        best_flex = min((time(r) for name, r in ok.items() if name in FLEX_IMPLS and time(r)), default=None)
        for r in ok.values():
            if time(r) is None:
                continue
            if time(topo):
                setattr(r, f"{kind}_vs_topopack", time(r) / time(topo))
            if best_flex:
                setattr(r, f"{kind}_vs_best_flex", time(r) / best_flex)
            if r.impl.startswith("topopack-") and time(floor):
                setattr(r, f"{kind}_x_floor", time(r) / time(floor))


def _fmt(x, spec=".3g"):
    return "—" if x is None else f"{x:{spec}}"


def _pair(a, b, spec=".3g") -> str:
    return "" if a is None and b is None else f"{_fmt(a, spec)} / {_fmt(b, spec)}"


def progress_line(r: Record) -> str:
    head = f"[side {r.grid_side:>3} | N={r.n_patches} L={r.n_tokens}] {r.impl:<17}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.note}"
    return (f"{head} fwd {_fmt(r.fwd_ms)} ms  fwd+bwd {_fmt(r.fwdbwd_ms)} ms  peak {_fmt(r.peak_mem_mb, '.4g')} MB  "
            f"setup {_fmt(r.setup_ms)} ms (first {_fmt(r.setup_first_ms)})  "
            f"1st call {_fmt(r.first_call_ms)} / {_fmt(r.first_fwdbwd_ms)} ms  "
            f"host {_pair(r.host_fwd_us, r.host_fwdbwd_us)} us  launches {_pair(r.launches_fwd, r.launches_fwdbwd)}"
            + (f"  err {r.max_abs_err:.2g}" if r.max_abs_err is not None else ""))


def table(records: list[Record]) -> list[str]:
    """The markdown table, one row per record; the launch column is kernels on CUDA and aten ops on the CPU."""
    launches = "kernels" if records[0].device == "cuda" else "aten ops"
    lines = [
        "| side | patches | tokens | impl | fwd ms | ÷topo | fwd+bwd ms | ÷topo | ×floor fwd / f+b | ÷best flex fwd / f+b "
        f"| peak MB | setup ms (first) | 1st call ms fwd / f+b | host µs fwd / f+b | {launches} fwd / f+b | err | note |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        setup = "" if r.setup_ms is None else f"{_fmt(r.setup_ms)} ({_fmt(r.setup_first_ms)})"
        first = "" if r.first_call_ms is None else f"{_fmt(r.first_call_ms)} / {_fmt(r.first_fwdbwd_ms)}"
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        lines.append(
            f"| {r.grid_side} | {r.n_patches} | {r.n_tokens} | {r.impl} | {_fmt(r.fwd_ms)} | {_fmt(r.fwd_vs_topopack)} "
            f"| {_fmt(r.fwdbwd_ms)} | {_fmt(r.fwdbwd_vs_topopack)} | {_pair(r.fwd_x_floor, r.fwdbwd_x_floor)} "
            f"| {_pair(r.fwd_vs_best_flex, r.fwdbwd_vs_best_flex)} | {_fmt(r.peak_mem_mb, '.4g')} | {setup} | {first} "
            f"| {_pair(r.host_fwd_us, r.host_fwdbwd_us)} | {_pair(r.launches_fwd, r.launches_fwdbwd, 'd')} "
            f"| {_fmt(r.max_abs_err, '.2g')} | {note} |")
    return lines


def markdown(records: list[Record], cfg: Config, wall_s: float, when: datetime.datetime | None = None) -> str:
    r0 = records[0]
    when = when or datetime.datetime.now(datetime.timezone.utc)
    launches = ("kernels: device kernels per call (torch.profiler; memcpy and memset left out)"
                if r0.device == "cuda" else "aten ops: top-level aten ops per call (torch.profiler)")
    lines = [
        f"## {r0.device_name}",
        "",
        f"{when:%Y-%m-%d %H:%M} UTC, torch {r0.torch_version}, {cfg.dtype}, "
        f"B={cfg.batch}, H={cfg.heads}, D={cfg.head_dim}, pack {cfg.pack_size}, rules {cfg.rules}"
        f"{', quick' if cfg.quick else ''}; {r0.timing}; whole run {wall_s:.0f} s.",
        "",
        "÷topo: the peer's time over topopack's (triton where it ran, else portable); ×floor: topopack's time "
        "over the floor proxy's; ÷best flex: the time over the fastest flex variant's. Peak: memory above the inputs "
        "during one forward+backward (forward only where there is no backward), "
        f"{'allocator peak' if r0.device == 'cuda' else 'RSS high-water'}. "
        "Setup: per new slide (first one, with compiles, in brackets). Host: CPU time inside the call, median, no "
        f"device wait. {launches}. Err: max |out − topopack-portable's out|.",
        "",
        *table(records),
    ]
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


def write_json(records: list[Record], path: Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
