"""Slide-encoder throughput: patches/s, peak memory and model FLOPs utilisation, forward and forward+backward.

    python -m benchmarks.encoder_throughput --device cuda                       # sides 192 and 321, eager + compiled
    python -m benchmarks.encoder_throughput --device cuda --whole-slide 447     # + one training step, 199,809 patches
    python -m benchmarks.encoder_throughput --device cpu --sides 24 --dim 64 --depth 1 --no-compile   # a smoke run

The encoder is the paper's (6 layers, width 512, 8 heads, FFN 2048) on 1024-wide patch features, bf16 autocast on
CUDA. MFU = the model's matmul FLOPs per call (``encoder_flops``: projections, FFN and the attention pairs the rules
allow) over the call's time and the card's dense bf16 peak (``--peak-tflops``, or known by name).
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch

from topopack import RULES_BY_NAME, TopoLayout
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig
from topopack.model.timing import median_seconds

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def encoder_flops(cfg: SlideEncoderConfig, layout: TopoLayout, backward: bool = False) -> float:
    """Matmul FLOPs of one encoder call on ``layout`` (x3 with the backward: two matmuls per forward one)."""
    d, tokens = cfg.dim, layout.num_tokens
    per_token_layer = 2 * (3 * d * d + d * d + 2 * d * cfg.mlp_dim)  # qkv, out proj, FFN
    attention = 2 * 2 * d * layout.num_allowed_pairs(RULES_BY_NAME[cfg.rules])  # q k^T and p v over allowed pairs
    forward = 2 * tokens * cfg.in_dim * d + cfg.depth * (tokens * per_token_layer + attention)  # input proj: all tokens
    return forward * (3 if backward else 1)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(encoder, layout, x, *, backward: bool, repeats: int) -> tuple[float, float | None]:
    """(median seconds per call, peak memory in MB on CUDA)."""
    cuda = x.device.type == "cuda"
    params = [p for p in encoder.parameters() if p.requires_grad]

    def call():
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            out = encoder(x, layout).tokens
        if backward:
            out.float().square().mean().backward()

    if cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
    with contextlib.nullcontext() if backward else torch.no_grad():
        seconds = median_seconds(call, repeats, x.device, grads=params if backward else ())
    peak = torch.cuda.max_memory_allocated(x.device) / 2 ** 20 if cuda else None
    return seconds, peak


def run(args) -> list[dict]:
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    backends = args.backends or (["triton", "portable"] if device.type == "cuda" else ["portable"])
    rows = []
    for side in args.sides:
        layout = TopoLayout.from_grid(side, side, 3, device=device)
        x = torch.randn(1, layout.num_patches, args.in_dim, device=device)
        for backend in backends:
            for compiled in ([False, True] if args.compile else [False]):
                torch.manual_seed(0)
                cfg = SlideEncoderConfig(in_dim=args.in_dim, dim=args.dim, depth=args.depth, heads=args.heads,
                                         mlp_dim=args.mlp_dim, dropout=0.0, backend=backend)
                encoder = SlideEncoder(cfg).to(device).train()
                model = torch.compile(encoder) if compiled else encoder
                for backward in (False, True):
                    seconds, mem = measure(model, layout, x, backward=backward, repeats=args.repeats)
                    flops = encoder_flops(cfg, layout, backward)
                    row = {"side": side, "patches": layout.num_patches, "backend": backend, "compiled": compiled,
                           "pass": "fwd+bwd" if backward else "fwd", "ms": seconds * 1e3,
                           "patches_per_s": layout.num_patches / seconds, "peak_mb": mem,
                           "tflops": flops / seconds / 1e12, "mfu": flops / seconds / (peak * 1e12) if peak else None}
                    rows.append(row)
                    print(format_row(row), flush=True)
    if args.whole_slide:
        rows.append(whole_slide_step(args, device))
        print(format_row(rows[-1]), flush=True)
    return rows


def whole_slide_step(args, device) -> dict:
    """One training step (forward + backward + AdamW) on a side x side slide with per-block activation
    checkpointing: its time and peak memory."""
    layout = TopoLayout.from_grid(args.whole_slide, args.whole_slide, 3, device=device)
    x = torch.randn(1, layout.num_patches, args.in_dim, device=device)
    cfg = SlideEncoderConfig(in_dim=args.in_dim, dim=args.dim, depth=args.depth, heads=args.heads,
                             mlp_dim=args.mlp_dim, dropout=0.0, backend=(args.backends or ["auto"])[0])
    encoder = SlideEncoder(cfg).to(device).train()
    encoder.grad_checkpointing = True
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    cuda = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = encoder(x, layout).tokens.float().square().mean()
        loss.backward()
        opt.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, max(1, args.repeats // 2), device)
    return {"side": args.whole_slide, "patches": layout.num_patches, "backend": cfg.backend, "compiled": False,
            "pass": "train step (grad ckpt)", "ms": seconds * 1e3, "patches_per_s": layout.num_patches / seconds,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None, "tflops": None,
            "mfu": None}


def format_row(r: dict) -> str:
    mem = "" if r["peak_mb"] is None else f"  peak {r['peak_mb']:9,.0f} MB"
    mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:5.1f}%"
    tf = "" if r["tflops"] is None else f"  {r['tflops']:7.1f} TFLOP/s"
    comp = "compiled" if r["compiled"] else "eager"
    return (f"{r['patches']:>8,} patches  {r['backend']:8s} {comp:8s} {r['pass']:22s} {r['ms']:9.2f} ms  "
            f"{r['patches_per_s']:13,.0f} patches/s{tf}{mfu}{mem}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sides", type=int, nargs="+", default=[192, 321], help="grid sides (36,864 and 103,041 patches)")
    p.add_argument("--backends", nargs="+", default=None, help="default: triton and portable on CUDA, portable else")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also torch.compile'd")
    p.add_argument("--whole-slide", type=int, default=None, help="grid side of one training step (447 = 199,809)")
    p.add_argument("--in-dim", type=int, default=1024, help="patch feature width (UNI-like)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-dim", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    print(f"slide encoder (depth {args.depth}, width {args.dim}, {args.heads} heads) on {args.device}")
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
