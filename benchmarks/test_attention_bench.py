"""pytest-benchmark suite: topopack's backends and dense SDPA at small sizes.

    pytest benchmarks --benchmark-only            # time them
    pytest benchmarks --benchmark-disable         # smoke: every case runs once

CPU cases always run; CUDA cases skip without a GPU. The plain tests check that the
benchmark's peers compute topopack's attention and that the script runs end to end.
"""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import attention as bench
from topopack import TopoLayout
from topopack.backends import get_backend
from topopack.kernels import flex
from topopack.rules import BIDIRECTIONAL, PAPER

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU_SIDES = [8, 16]
GPU_SIDES = [63, 192]


def inputs(side, device, dtype, grad=False, heads=4, dim=32):
    layout = TopoLayout.from_grid(side, side, 3, device=device)
    g = torch.Generator().manual_seed(side)
    qkv = [torch.randn(1, heads, layout.num_tokens, dim, generator=g).to(device, dtype).requires_grad_(grad)
           for _ in range(3)]
    return layout, qkv


def fwd_bwd(fn, qkv):
    def step():
        for t in qkv:
            t.grad = None
        fn(*qkv).sum().backward()
        if qkv[0].is_cuda:
            torch.cuda.synchronize()
    return step


def fwd(fn, qkv):
    def step():
        with torch.no_grad():
            out = fn(*qkv)
        if out.is_cuda:
            torch.cuda.synchronize()
        return out
    return step


# ---- CPU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_portable_forward(benchmark, side):
    layout, qkv = inputs(side, "cpu", torch.float32)
    out = benchmark(fwd(lambda q, k, v: get_backend("portable", q.device)(q, k, v, layout, PAPER), qkv))
    assert out.shape == qkv[0].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_portable_forward_backward(benchmark, side):
    layout, qkv = inputs(side, "cpu", torch.float32, grad=True)
    benchmark(fwd_bwd(lambda q, k, v: get_backend("portable", q.device)(q, k, v, layout, PAPER), qkv))
    assert all(torch.isfinite(t.grad).all() for t in qkv)


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_dense_sdpa_forward(benchmark, side):
    _, qkv = inputs(side, "cpu", torch.float32)
    out = benchmark(fwd(F.scaled_dot_product_attention, qkv))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_dense_sdpa_forward_backward(benchmark, side):
    _, qkv = inputs(side, "cpu", torch.float32, grad=True)
    benchmark(fwd_bwd(F.scaled_dot_product_attention, qkv))


@pytest.mark.parametrize("side", CPU_SIDES)
def test_cpu_layout_build(benchmark, side):
    layout = benchmark(TopoLayout.from_grid, side, side, 3)
    assert layout.num_patches == side * side


# ---- CUDA ---------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("backend", ["triton", "portable", "flex"])
@pytest.mark.parametrize("side", GPU_SIDES)
def test_cuda_topopack_forward_backward(benchmark, backend, side):
    try:
        fn = get_backend(backend, torch.device("cuda"))
    except ImportError as e:
        pytest.skip(str(e))
    layout, qkv = inputs(side, "cuda", torch.bfloat16, grad=True, heads=8, dim=64)
    benchmark(fwd_bwd(lambda q, k, v: fn(q, k, v, layout, PAPER), qkv))


@CUDA
@pytest.mark.parametrize("side", GPU_SIDES)
def test_cuda_dense_flash_forward_backward(benchmark, side):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, qkv = inputs(side, "cuda", torch.bfloat16, grad=True, heads=8, dim=64)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        benchmark(fwd_bwd(F.scaled_dot_product_attention, qkv))


# ---- the peers compute topopack's attention -----------------------------------------------
@pytest.mark.parametrize("rules", [PAPER, BIDIRECTIONAL], ids=["paper", "bidirectional"])
@pytest.mark.parametrize("side", [5, 7])
def test_peers_match_topopack(side, rules):
    """The authors' additive mask, and eager flex in the authors' interleaved order."""
    layout, (q, k, v) = inputs(side, "cpu", torch.float32)
    expected = get_backend("portable", q.device)(q, k, v, layout, rules)
    mask = bench.authors_mask(layout, rules, torch.float32)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected,
                               atol=2e-5, rtol=1e-4)

    order = bench.interleaved_order(layout)
    kinds = layout.token_kind[order]
    assert kinds[0] == 0 and sorted(order.tolist()) == list(range(layout.num_tokens))
    assert (layout.token_pack[order][1:].diff() >= 0).all()  # pack by pack
    first_summary = int((kinds == 1).nonzero()[0])
    assert first_summary == 1 + int(layout.pack_patch_count[0])  # S1 follows P1..P9
    kind, pack, slide = (t[order] for t in (layout.token_kind, layout.token_pack, layout.token_slide))
    n = layout.num_tokens
    mask_i = flex.build_block_mask(flex.index_mask_mod(kind, pack, slide, rules), n, "cpu")
    with torch.no_grad():
        out = torch.nn.attention.flex_attention.flex_attention(q[:, :, order], k[:, :, order], v[:, :, order],
                                                               block_mask=mask_i)
    torch.testing.assert_close(out[:, :, torch.argsort(order)], expected, atol=2e-5, rtol=1e-4)


def test_script_runs_end_to_end(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--device", "cpu", "--sizes", "6", "--quick", "--heads", "2", "--head-dim", "16",
                              "--impls", "topopack-portable", "dense", "authors", "floor", "--keep-compile-cache",
                              "--json", str(out), "--markdown", str(tmp_path / "r.md")])
    assert bench.main(args) == 0
    records = json.loads(out.read_text())
    assert [r["impl"] for r in records] == ["topopack-portable", "dense", "authors", "floor"]
    for r in records:
        for key in ("device", "device_name", "grid_side", "n_patches", "n_tokens", "heads", "head_dim", "dtype",
                    "rules", "fwd_ms", "fwdbwd_ms", "peak_mem_mb", "setup_ms"):
            assert key in r
        assert r["status"] == "ok" and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
    authors = records[2]
    assert authors["max_abs_err"] < 1e-4 and authors["fwd_vs_topopack"] > 0
    assert records[0]["fwd_x_floor"] > 0
    assert "| 6 | 36 |" in (tmp_path / "r.md").read_text()
