"""Slide-encoder throughput in patches/s, one line per attention backend.

    python -m benchmarks.encoder_throughput --device cuda          # triton and portable
    python -m benchmarks.encoder_throughput --device cpu --side 48 # portable only
"""
from __future__ import annotations

import argparse

import torch

from topopack import TopoLayout
from topopack.model.encoder import SlideEncoder, SlideEncoderConfig, encoder_throughput


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", type=int, default=192, help="grid side of the synthetic slide")
    p.add_argument("--in-dim", type=int, default=1024, help="patch feature width (UNI-like)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    layout = TopoLayout.from_grid(args.side, args.side, 3, device=device)
    x = torch.randn(1, layout.num_patches, args.in_dim, device=device)
    backends = ["triton", "portable"] if device.type == "cuda" else ["portable"]
    torch.manual_seed(0)
    encoder = SlideEncoder(SlideEncoderConfig(in_dim=args.in_dim)).to(device).eval()
    print(f"slide encoder (6 layers, width 512, 8 heads) on {layout}, {device}")
    for backend, rate in encoder_throughput(encoder, layout, x, backends, args.repeats).items():
        print(f"  {backend:9s} {layout.num_patches / rate * 1e3:9.1f} ms/forward  {rate:12,.0f} patches/s")


if __name__ == "__main__":
    main()
