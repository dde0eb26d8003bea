"""pytest-benchmark suite: topopack's calls at small sizes, each checked against the float64 reference.

    pytest benchmarks --benchmark-only            # time them
    pytest benchmarks --benchmark-disable         # smoke: every case runs once

CPU cases always run; CUDA cases skip without a GPU. The last test runs `python -m benchmarks.attention`.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from topopack import TopoLayout, topo_pack_attention
from topopack.backends import get_backend
from topopack.reference import attention as reference
from topopack.rules import PAPER

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU_SIDES = [8, 16]


def inputs(side, device, dtype, heads=2, dim=16):
    """A side x side grid's layout, q, k, v (leaves that take grads) and an output gradient."""
    layout = TopoLayout.from_grid(side, side, 3, device=device)
    g = torch.Generator().manual_seed(side)
    q, k, v, dout = (torch.randn(1, heads, layout.num_tokens, dim, generator=g, dtype=torch.float64)
                     for _ in range(4))
    return layout, [t.to(device, dtype).requires_grad_() for t in (q, k, v)], dout.to(device, dtype)


def expected(layout, qkv, dout):
    """The float64 reference's output and q, k, v gradients."""
    leaves = [t.detach().double().requires_grad_() for t in qkv]
    out = reference(*leaves, layout, PAPER)
    return out.detach(), torch.autograd.grad(out, leaves, dout.double())


def fwd_bwd(fn, layout, qkv, dout):
    """One forward + backward of fn; returns the q, k, v gradients."""
    def step():
        for t in qkv:
            t.grad = None
        fn(*qkv, layout).backward(dout)
        if dout.is_cuda:
            torch.cuda.synchronize()
        return [t.grad for t in qkv]
    return step


# ---- CPU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_topo_pack_attention_forward(benchmark, side):
    layout, qkv, _ = inputs(side, "cpu", torch.float32)

    def forward():
        with torch.no_grad():
            return topo_pack_attention(*qkv, layout)  # backend "auto": portable on the CPU

    out = benchmark(forward)
    torch.testing.assert_close(out.double(), expected(layout, qkv, qkv[0])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_portable_forward_backward(benchmark, side):
    layout, qkv, dout = inputs(side, "cpu", torch.float32)
    portable = get_backend("portable", torch.device("cpu"))
    grads = benchmark(fwd_bwd(lambda q, k, v, lay: portable(q, k, v, lay, PAPER), layout, qkv, dout))
    for got, want in zip(grads, expected(layout, qkv, dout)[1]):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_layout_build(benchmark, side):
    layout = benchmark(TopoLayout.from_grid, side, side, 3)
    packs = (-(-side // 3)) ** 2
    assert (layout.num_patches, layout.num_packs, layout.num_tokens) == (side * side, packs, 1 + packs + side * side)
    assert layout.patch_cell.tolist() == [[y, x] for y in range(side) for x in range(side)]  # input order: row-major


# ---- CUDA ---------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("backend", ["triton", "portable", "flex"])
def test_cuda_topopack_forward_backward(benchmark, backend):
    try:
        fn = get_backend(backend, torch.device("cuda"))
    except ImportError as e:
        pytest.skip(str(e))
    layout, qkv, dout = inputs(63, "cuda", torch.bfloat16, heads=8, dim=64)
    grads = benchmark(fwd_bwd(lambda q, k, v, lay: fn(q, k, v, lay, PAPER), layout, qkv, dout))
    for got, want in zip(grads, expected(layout, qkv, dout)[1]):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-2 + 1e-2 * float(want.abs().max()))


# ---- the command line ---------------------------------------------------------------------
def test_cli_writes_records_table_and_plot_with_prewarmed_flex(tmp_path):
    """`python -m benchmarks.attention` end to end, in its own process (the pre-warm needs its import order)."""
    out = {ext: tmp_path / f"r.{ext}" for ext in ("json", "md", "png")}
    args = ["--device", "cpu", "--sizes", "4", "--quick", "--heads", "2", "--head-dim", "8", "--threads", "1",
            "--impls", "topopack-portable", "authors", "flex-arith", "--prewarm",
            "--json", out["json"], "--markdown", out["md"], "--plot", out["png"]]
    p = subprocess.run([sys.executable, "-m", "benchmarks.attention", *map(str, args)],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    records = json.loads(out["json"].read_text())
    assert [r["impl"] for r in records] == ["topopack-portable", "authors", "flex-arith"]
    assert all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in records)
    assert records[2]["note"].endswith("compiles from pre-warmed caches")
    assert out["md"].read_text() in p.stdout  # the table also goes to stdout
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
