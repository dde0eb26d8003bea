"""Topo-pack attention vs dense SDPA, the authors' L x L mask and FlexAttention.

    python -m benchmarks.attention --device cpu --quick --json out.json --markdown out.md --plot out.png
    python -m benchmarks.attention --device cuda --results   # JSON + markdown + PNG into benchmarks/results/

Every contender (benchmarks/contenders.py) runs on the same random q, k, v for a full side x side grid; the
harness (benchmarks/harness.py) times it, counts its launches and meters its memory; benchmarks/report.py writes
the table. Times are medians of topopack.model.timing.median_seconds (triton.testing.do_bench on CUDA,
torch.utils.benchmark.Timer on the CPU). See benchmarks/README.md for every column.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.contenders import DTYPES, FLEX_IMPLS, IMPLS, Case, Config, Impl, build_impl, calls
from benchmarks.harness import (MemMeter, compile_cache_counts, device_name, fresh_compile_caches, host_us,
                                launches_per_call, median_ms, prewarm_flex, raise_recompile_limits, timed_ms)
from benchmarks.report import Record, add_ratios, markdown, plot, progress_line, results_stem, write_json
from topopack.rules import RULES_BY_NAME


def measure(name: str, case: Case, cfg: Config, meter: MemMeter, dev_name: str) -> Record:
    lay = case.layout
    rec = Record(impl=name, device=case.device.type, device_name=dev_name, grid_side=case.side,
                 n_patches=lay.num_patches, n_tokens=lay.num_tokens, heads=cfg.heads, head_dim=cfg.head_dim,
                 dtype=cfg.dtype, rules=cfg.rules, batch=cfg.batch, pack_size=cfg.pack_size,
                 timing="triton.testing.do_bench median" if case.device.type == "cuda"
                 else "torch.utils.benchmark.Timer median")
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        impl = build_impl(name, case, meter.free)
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
    mem0 = meter.current()
    state = None
    if impl.setup is not None:  # one set-up alive at a time: the L x L mask can take most of the memory
        _, rec.setup_first_ms = timed_ms(impl.setup, device)
        rec.setup_ms = median_ms(impl.setup, device, cfg.quick)
        state = impl.setup()
    c = calls(impl, case, state)

    out, rec.first_call_ms = timed_ms(c.forward, device)
    if impl.compare and out is not None:
        if impl.permute is not None:
            out = out[:, :, torch.argsort(impl.permute)]
        if case.reference is None:
            case.reference = out.float()
        else:
            rec.max_abs_err = float((out.float() - case.reference).abs().max())
    del out
    if c.fwdbwd is None:
        rec.note = "no backward on the CPU (FlexAttention)"

    # peak memory of one forward + backward (forward alone if none), per-slide state included
    if c.fwdbwd is not None and device.type == "cuda":  # the first backward compiles and autotunes
        _, rec.first_fwdbwd_ms = timed_ms(c.fwdbwd, device)
        for g in c.grads:
            g.grad = None
    meter.current()  # collect garbage (and trim the CPU heap) first
    meter.reset_peak()
    _, ms = timed_ms(c.fwdbwd or c.forward, device)
    peak = meter.peak()
    if c.fwdbwd is not None and rec.first_fwdbwd_ms is None:
        rec.first_fwdbwd_ms = ms
    if peak is not None and mem0 is not None:
        rec.peak_mem_mb = max(0, peak - mem0) / 2 ** 20

    rec.fwd_ms = median_ms(c.forward, device, cfg.quick)
    rec.host_fwd_us = host_us(c.forward, device)
    if c.fwdbwd is not None:
        rec.fwdbwd_ms = median_ms(c.fwdbwd, device, cfg.quick, c.grads)
        rec.host_fwdbwd_us = host_us(c.fwdbwd, device, grads=c.grads)
    try:
        rec.launches_fwd = launches_per_call(c.forward, device)
        if c.fwdbwd is not None:
            rec.launches_fwdbwd = launches_per_call(c.fwdbwd, device, c.grads)
    except RuntimeError as e:  # a profiler that cannot start (no CUPTI, say) leaves the timings standing
        rec.note = "; ".join(filter(None, [rec.note, f"no launch count: {(str(e).splitlines() or [''])[0][:120]}"]))


def run(cfg: Config, on_size=None) -> list[Record]:
    """Every contender on every size; on_size(records so far) after each size."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    raise_recompile_limits()
    prewarmed = 0
    if cfg.prewarm:
        prewarmed, seconds = prewarm_flex(cfg)
        if prewarmed:
            print(f"pre-warmed the compile caches of {prewarmed} flex kernels in {seconds:.0f} s", file=sys.stderr,
                  flush=True)
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
            before = compile_cache_counts()
            rec = measure(name, case, cfg, meter, dev_name)
            if prewarmed and name in FLEX_IMPLS and rec.status == "ok":
                hits, misses = (now - then for now, then in zip(compile_cache_counts(), before))
                said = (f"compiled cold: {misses} compile cache misses after the pre-warm" if misses
                        else "compiles from pre-warmed caches" if hits else "")
                rec.note = "; ".join(filter(None, [rec.note, said]))
            print(progress_line(rec), file=sys.stderr, flush=True)
            size_records.append(rec)
        add_ratios(size_records)
        records += sorted(size_records, key=lambda r: IMPLS.index(r.impl))
        if on_size is not None:
            on_size(records)
    return records


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", help="grid sides (default: GPU 63 96 192 321 447, CPU 32 64 96)")
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
    p.add_argument("--prewarm", action=argparse.BooleanOptionalAction, default=None,
                   help="compile every flex kernel first, in parallel processes (default: on CUDA)")
    p.add_argument("--json", type=Path, help="write the records as a JSON list")
    p.add_argument("--markdown", type=Path, help="write a markdown table")
    p.add_argument("--plot", type=Path, help="write a log-log PNG of time vs patches")
    p.add_argument("--results", action="store_true", help="write JSON, markdown and PNG to benchmarks/results/")


def main(args: argparse.Namespace) -> int:
    cfg = Config(device=args.device, sizes=tuple(args.sizes or ()), heads=args.heads, head_dim=args.head_dim,
                 dtype=args.dtype or "", rules=args.rules, pack_size=args.pack_size, batch=args.batch,
                 quick=args.quick, impls=tuple(args.impls), max_mask_gb=args.max_mask_gb,
                 fresh_compile_cache=not args.keep_compile_cache, prewarm=args.prewarm)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"benchmark: {cfg}, {torch.get_num_threads()} CPU threads", file=sys.stderr, flush=True)
    paths = {"json": args.json, "markdown": args.markdown, "plot": args.plot}
    t0 = time.perf_counter()

    def write(records, wall_s: float) -> str:  # after every size too, so that a run cut short keeps its rows
        if args.results and not paths.get("stem"):
            paths["stem"] = stem = results_stem(records[0].device_name, cfg.quick)
            stem.parent.mkdir(parents=True, exist_ok=True)
            for key, suffix in (("json", ".json"), ("markdown", ".md"), ("plot", ".png")):
                paths[key] = paths[key] or stem.with_suffix(suffix)
        text = markdown(records, cfg, wall_s)
        if paths["json"]:
            write_json(records, paths["json"])
        if paths["markdown"]:
            Path(paths["markdown"]).write_text(text)
        return text

    with fresh_compile_caches(cfg.fresh_compile_cache):
        records = run(cfg, on_size=lambda records: write(records, time.perf_counter() - t0))
    wall = time.perf_counter() - t0
    print(write(records, wall))
    if paths["plot"]:
        plot(records, Path(paths["plot"]))
    for key in ("json", "markdown", "plot"):
        if paths[key]:
            print(f"wrote {paths[key]}", file=sys.stderr)
    print(f"done in {wall:.1f} s", file=sys.stderr)
    return 0 if records and all(r.status != "failed" for r in records) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
