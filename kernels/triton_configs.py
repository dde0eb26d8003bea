"""Launch configs of the Triton kernels: a committed table looked up per call; tuning only when asked.

``triton_configs.json`` holds rows keyed by (arch, head-dim bucket, pack size, size bucket),
each giving block sizes, num_warps and num_stages per launch. '*' in a key field matches
anything; the rows that match a key apply from the least to the most specific (arch
first), so a missing key falls back to its arch's row and then to the complete '*' row.
A new slide length only changes the size bucket, so it never re-tunes, and recompiles
only where the bucket's row (or split count) differs.

``python -m benchmarks.tune_triton`` regenerates the table on a GPU. TOPOPACK_TRITON_AUTOTUNE=1
or ``triton_attention(..., autotune=True)`` runs the same search at run time (eager calls,
once per key, rules and process); by default nothing is ever tuned.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import triton_meta as meta

TABLE = Path(__file__).with_name("triton_configs.json")
FIELDS = ("arch", "head_dim", "pack_size", "size")
ANY = "*"

# Every parameter of each launch; the table's '*' row gives them all.
PARAMS = {
    "fwd": ("SUMMARY_BLOCK_M", "SUMMARY_BLOCK_N", "PATCH_BLOCK_M", "num_warps", "num_stages"),
    "fwd_merge": ("BLOCK", "num_warps", "num_stages"),
    "bwd_prep": ("BLOCK", "num_warps", "num_stages"),
    "bwd": ("SUMMARY_BLOCK_M", "SUMMARY_BLOCK_N", "DQ_ORDERED", "SUMMARY_DQ_BLOCK_M", "SUMMARY_DQ_BLOCK_N",
            "PATCH_BLOCK_M", "PATCH_ITERS", "num_warps", "num_stages"),
    "bwd_merge": ("BLOCK", "num_warps", "num_stages"),
}

# Tests set this to a full config (launch -> params) to run every key with it.
FORCED: dict | None = None


class Key(NamedTuple):
    arch: str  # "sm90", "sm80", ... or "interpret"
    head_dim: int  # the head-dim tile (meta.block_d): 16, 32, 64, 128, 256
    pack_size: int
    size: int  # meta.size_bucket of the token count


class Knob(NamedTuple):
    """Parameters tuned together, and their candidate values."""

    launch: str
    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    global_only: bool = False  # read only when the global row sees its slide (global_to_all)


# What tuning tries, one knob at a time from the table's row (coordinate descent):
# tile sizes, warps and stages per part of the fused launches, and the backward's dq mode.
KNOBS = (
    Knob("fwd", ("SUMMARY_BLOCK_M", "SUMMARY_BLOCK_N"), ((64, 64), (128, 64), (128, 128), (64, 32), (128, 32))),
    Knob("fwd", ("PATCH_BLOCK_M",), ((32,), (16,), (64,))),
    Knob("fwd", ("num_warps", "num_stages"), ((4, 3), (4, 2), (8, 3), (2, 2))),
    Knob("fwd_merge", ("BLOCK", "num_warps"), ((64, 4), (32, 2), (128, 4)), global_only=True),
    Knob("bwd_prep", ("BLOCK", "num_warps"), ((64, 4), (128, 4), (128, 8))),
    Knob("bwd", ("DQ_ORDERED",), ((1,), (0,))),
    Knob("bwd", ("SUMMARY_BLOCK_M", "SUMMARY_BLOCK_N"), ((64, 64), (64, 128), (128, 128), (32, 64))),
    Knob("bwd", ("SUMMARY_DQ_BLOCK_M", "SUMMARY_DQ_BLOCK_N"), ((64, 64), (128, 64), (64, 32))),
    Knob("bwd", ("PATCH_BLOCK_M", "PATCH_ITERS"), ((32, 4), (32, 1), (16, 4), (64, 2), (32, 8))),
    Knob("bwd", ("num_warps", "num_stages"), ((4, 2), (8, 2), (4, 3), (8, 3))),
    Knob("bwd_merge", ("BLOCK", "num_warps"), ((64, 4), (32, 2), (128, 4))),
)


def knobs(launches, global_sees_all: bool = True) -> list[Knob]:
    """The knobs that matter for these launches under these rules."""
    return [k for k in KNOBS if k.launch in launches and (global_sees_all or not k.global_only)]


def arch(device: torch.device) -> str:
    """The table's arch of a device: "interpret" under TRITON_INTERPRET, else "sm<major><minor>"."""
    if meta.INTERPRET:
        return "interpret"
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def key_of(q: torch.Tensor, pack_size: int) -> Key:
    return Key(arch(q.device), meta.block_d(int(q.shape[-1])), int(pack_size), meta.size_bucket(q.shape[2]))


def check_rows(rows: list, where: str) -> tuple[dict, ...]:
    """The rows, or a ValueError naming the bad row and what is wrong."""
    complete = False
    for i, row in enumerate(rows):
        name = f"{where}: row {i} ({ {f: row.get(f) for f in FIELDS} })"
        if set(FIELDS) - set(row) or set(row) - set(FIELDS) - {"configs", "source"}:
            raise ValueError(f"{name} must have the fields {list(FIELDS)}, 'configs' and optionally 'source'")
        for launch, params in row["configs"].items():
            unknown = set(params) - set(PARAMS.get(launch, ()))
            if launch not in PARAMS or unknown:
                raise ValueError(f"{name}: unknown launch or parameters {launch} {sorted(unknown)}; "
                                 f"launches and parameters are {PARAMS}")
            bad = {p: v for p, v in params.items() if not (isinstance(v, int) and (
                v in (0, 1) if p == "DQ_ORDERED" else v > 0 and (p == "num_stages" or v & (v - 1) == 0)))}
            if bad or params.get("PATCH_BLOCK_M", 16) < 16:
                raise ValueError(f"{name}: {launch} {bad or params}: block sizes, PATCH_ITERS and num_warps must "
                                 "be powers of two, num_stages a positive int, DQ_ORDERED 0 or 1, PATCH_BLOCK_M "
                                 "at least 16 (a pack of 4x4 patches)")
        complete = complete or (all(row[f] == ANY for f in FIELDS)
                                and all(set(row["configs"].get(l, ())) == set(p) for l, p in PARAMS.items()))
    if not complete:
        raise ValueError(f"{where}: needs a row with every key field '*' giving every parameter of {PARAMS}")
    return tuple(rows)


@functools.cache
def table(path: str = str(TABLE)) -> tuple[dict, ...]:
    """The table's rows, checked (read once per process)."""
    return check_rows(json.loads(Path(path).read_text())["rows"], path)


def dumps(doc: dict) -> str:
    """The table as JSON text: one line per launch of each row."""
    rows = []
    for r in doc["rows"]:
        head = ", ".join(f"{json.dumps(f)}: {json.dumps(r[f])}" for f in (*FIELDS, "source") if f in r)
        launches = ",\n".join(f"    {json.dumps(l)}: {json.dumps(p)}" for l, p in r["configs"].items())
        rows.append(f"  {{{head},\n   \"configs\": {{\n{launches}\n   }}}}")
    return "{\n \"about\": " + json.dumps(doc["about"]) + ",\n \"rows\": [\n" + ",\n".join(rows) + "\n ]\n}\n"


@functools.cache
def lookup(key: Key, path: str = str(TABLE)) -> dict[str, dict]:
    """The configs of `key`: its matching rows merged, least specific first (callers must not mutate)."""
    rows = [r for r in table(path) if all(r[f] in (ANY, v) for f, v in zip(FIELDS, key))]
    rows.sort(key=lambda r: tuple(r[f] != ANY for f in FIELDS))
    out = {launch: {} for launch in PARAMS}
    for row in rows:
        for launch, params in row["configs"].items():
            out[launch].update(params)
    return out


def autotune_requested(arg: bool | None) -> bool:
    """The argument when given, else TOPOPACK_TRITON_AUTOTUNE=1."""
    asked = os.environ.get("TOPOPACK_TRITON_AUTOTUNE", "0") == "1" if arg is None else bool(arg)
    if asked and meta.INTERPRET:
        raise ValueError("triton backend: autotuning times the kernels on a GPU, which the CPU interpreter cannot; "
                         "unset TOPOPACK_TRITON_AUTOTUNE (or pass autotune=False) to use the config table")
    return asked


_TUNED: dict[tuple, dict] = {}  # (key, launches, global_sees_all) -> configs tuned in this process


def resolve(q, pack_size: int, launches: tuple[str, ...], global_sees_all: bool, autotune: bool,
            run: Callable[[dict], object]) -> dict[str, dict]:
    """The configs for this call: FORCED, else the table's (and what this process tuned for the key).

    With `autotune` (eager only) the launches are tuned first, once per key and rules, by
    timing run(configs) for each candidate.
    """
    if FORCED is not None:
        return FORCED
    key = key_of(q, pack_size)
    tuned = (key, launches, global_sees_all)
    if tuned not in _TUNED:
        if not autotune or torch.compiler.is_compiling():
            return lookup(key)
        _TUNED[tuned] = tune(lookup(key), knobs(launches, global_sees_all), run)
    return _TUNED[tuned]


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def tune(cfg: dict, knob_list, run: Callable[[dict], object], bench: Callable | None = None) -> dict:
    """Coordinate descent: each knob in turn takes its fastest candidate (bench(fn) -> ms), the others held.

    A candidate that does not fit the GPU (OutOfResources) is skipped.
    """
    from triton.runtime.errors import OutOfResources
    bench = bench or bench_ms
    cfg = copy.deepcopy(cfg)
    for knob in knob_list:
        timed = []
        for values in knob.values:
            trial = copy.deepcopy(cfg)
            trial[knob.launch].update(zip(knob.names, values))
            try:
                timed.append((bench(lambda: run(trial)), values))
            except OutOfResources:
                continue
        if timed:
            cfg[knob.launch].update(zip(knob.names, min(timed)[1]))
    return cfg
