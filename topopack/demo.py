"""The main job on a synthetic slide: build a layout, run TopoPackAttention, time it against dense."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import PAPER, RULES_BY_NAME, TopoLayout, TopoPackAttention


def add_arguments(p):
    p.add_argument("--side", type=int, default=96, help="grid side of the synthetic slide (patches)")
    p.add_argument("--pack-size", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rules", choices=sorted(RULES_BY_NAME), default="paper")
    p.add_argument("--repeats", type=int, default=5)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main(args) -> int:
    rules = RULES_BY_NAME[args.rules]
    t0 = time.perf_counter()
    layout = TopoLayout.from_grid(args.side, args.side, args.pack_size)
    build_ms = 1e3 * (time.perf_counter() - t0)
    dim = args.heads * args.head_dim
    layer = TopoPackAttention(dim, args.heads, rules=rules, backend="auto").eval()
    x = layout.tokens_from_patches(torch.randn(1, layout.num_patches, dim))
    q, k, v = (torch.randn(1, args.heads, layout.num_tokens, args.head_dim) for _ in range(3))
    print(f"{layout}  (built in {build_ms:.1f} ms)")
    print(f"rules={rules.name}: {layout.num_allowed_pairs(rules):,} allowed pairs = "
          f"{100 * layout.sparsity(rules):.2f}% of dense attention")
    with torch.no_grad():
        y = layer(x, layout)
        layer_ms = median_ms(lambda: layer(x, layout), args.repeats)
        from .attention import topo_pack_attention
        sparse_ms = median_ms(lambda: topo_pack_attention(q, k, v, layout, rules=rules), args.repeats)
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), max(1, args.repeats // 2))
    print(f"TopoPackAttention layer: out {tuple(y.shape)}, {layer_ms:.1f} ms")
    print(f"attention forward, median of {args.repeats}: topopack {sparse_ms:.1f} ms, "
          f"dense SDPA (no mask) {dense_ms:.1f} ms -> speed-up {dense_ms / sparse_ms:.1f}x")
    return 0
