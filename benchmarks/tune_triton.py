"""Regenerate the Triton config table (kernels/triton_configs.json) on a GPU.

    python -m benchmarks.tune_triton                                   # this GPU, head_dim 64, pack 3, every size
    python -m benchmarks.tune_triton --head-dims 64 128 --pack-sizes 2 3 4 --sizes 65536 262144
    python -m benchmarks.tune_triton --dry-run [--arch sm90]           # the keys and candidates, no GPU needed

Per key (this GPU's arch, head-dim tile, pack size, size bucket) it builds a full square slide of about half the
bucket's tokens and random bf16 q, k, v, then tunes by coordinate descent over
topopack.kernels.triton_configs.KNOBS: one knob at a time takes its fastest candidate (triton.testing.do_bench
median) while the others hold the table's current values; the forward and backward under PAPER, then the
forward's global-only knobs under BIDIRECTIONAL. Each key's row replaces the table's row for that key as soon
as it is done, so a run cut short (--budget-s, or a timeout) keeps the keys it finished.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from topopack import PAPER, RULES_BY_NAME, TopoLayout
from topopack.kernels import triton_configs as configs, triton_meta as meta

DEFAULT_SIZES = tuple(meta.MIN_SIZE_BUCKET * 4 ** i for i in range(4))  # 16384 .. 1048576 tokens


def synthetic_side(size: int, pack_size: int) -> int:
    """Grid side of a full square slide with about size / 2 tokens (inside the bucket `size`)."""
    tokens_per_patch = 1 + 1 / pack_size ** 2  # the patch plus its share of a summary
    return max(1, int(math.sqrt(size / 2 / tokens_per_patch)))


def keys(arch: str, head_dims, pack_sizes, sizes) -> list[configs.Key]:
    return [configs.Key(arch, meta.block_d(d), k, meta.size_bucket(s))
            for d in head_dims for k in pack_sizes for s in sizes]


def plan() -> list[tuple[str, configs.Knob]]:
    """(rules name, knob) in tuning order, the same for every key."""
    fwd = configs.knobs(("fwd",), global_sees_all=False)
    bwd = configs.knobs(("bwd_prep", "bwd", "bwd_merge"))
    glob = [k for k in configs.knobs(("fwd", "fwd_merge")) if k.global_only]
    return [("paper", k) for k in fwd + bwd] + [("bidirectional", k) for k in glob]


def tune_key(key: configs.Key, dtype: torch.dtype, heads: int, batch: int, device="cuda") -> dict:
    from topopack.kernels.triton_bwd import attention_bwd
    from topopack.kernels.triton_fwd import attention_fwd

    side = synthetic_side(key.size, key.pack_size)
    layout = TopoLayout.from_grid(side, side, key.pack_size, device=device)
    assert meta.size_bucket(layout.num_tokens) == key.size, (side, layout.num_tokens, key)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, layout.num_tokens, key.head_dim)
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4))
    lay, scale = meta.LayoutArgs.of(layout), key.head_dim ** -0.5
    cfg = configs.lookup(key)
    o, lse = attention_fwd(q, k, v, lay, scale, meta.MaskFlags.from_rules(PAPER), key.pack_size, cfg=cfg)
    for rules, knob in plan():
        flags = meta.MaskFlags.from_rules(RULES_BY_NAME[rules])
        if knob.launch.startswith("fwd"):
            run = lambda c: attention_fwd(q, k, v, lay, scale, flags, key.pack_size, cfg=c)  # noqa: E731
        else:  # o, lse of PAPER: tuned under PAPER only
            run = lambda c: attention_bwd(do, q, k, v, o, lse, lay, scale, flags, key.pack_size, cfg=c)  # noqa: E731
        cfg = configs.tune(cfg, [knob], run)
    return cfg


def write_row(path: Path, row: dict) -> None:
    """Replace (or add) the row of row's key in the table at `path` (a copy of the committed one if new), atomically."""
    doc = json.loads((path if path.exists() else configs.TABLE).read_text())
    same = lambda r: all(r[f] == row[f] for f in configs.FIELDS)  # noqa: E731
    doc["rows"] = [r for r in doc["rows"] if not same(r)] + [row]
    doc["rows"].sort(key=lambda r: tuple(str(r[f]) if r[f] != configs.ANY else "" for f in configs.FIELDS))
    configs.check_rows(doc["rows"], str(path))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(configs.dumps(doc))
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64])
    p.add_argument("--pack-sizes", type=int, nargs="+", default=[3])
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="tokens; rounded to buckets")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=540.0, help="start no new key after this many seconds")
    p.add_argument("--out", type=Path, default=configs.TABLE)
    p.add_argument("--arch", default=None, help="dry run only: the arch to list (default: this GPU's, else sm90)")
    p.add_argument("--dry-run", action="store_true", help="list the keys and candidates; tune nothing")
    args = p.parse_args(argv)

    if args.dry_run:
        arch = args.arch or (configs.arch(torch.device("cuda")) if torch.cuda.is_available() else "sm90")
        total = 0
        for key in keys(arch, args.head_dims, args.pack_sizes, args.sizes):
            side = synthetic_side(key.size, key.pack_size)
            print(f"key {key.arch} head_dim {key.head_dim} pack_size {key.pack_size} size {key.size}: "
                  f"{side}x{side} grid, {TopoLayout.from_grid(side, side, key.pack_size).num_tokens} tokens")
            for rules, knob in plan():
                print(f"  [{rules}] {knob.launch} {','.join(knob.names)}: "
                      + " | ".join(",".join(map(str, v)) for v in knob.values))
                total += len(knob.values)
        print(f"{total} timings")
        return 0

    if not torch.cuda.is_available() or meta.INTERPRET:
        print("tune_triton: needs a CUDA GPU and TRITON_INTERPRET unset (use --dry-run to list the candidates)",
              file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    arch, name = configs.arch(torch.device("cuda")), torch.cuda.get_device_name()
    import triton
    start = time.perf_counter()
    for key in keys(arch, args.head_dims, args.pack_sizes, args.sizes):
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent; not tuned: {key}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        cfg = tune_key(key, dtype, args.heads, args.batch)
        source = (f"tune_triton {datetime.date.today()} on {name}, torch {torch.__version__}, triton "
                  f"{triton.__version__}, {args.dtype}, B {args.batch} H {args.heads}")
        write_row(args.out, dict(key._asdict(), source=source, configs=cfg))
        print(f"{key}: {time.perf_counter() - t0:.0f} s -> {json.dumps(cfg)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
