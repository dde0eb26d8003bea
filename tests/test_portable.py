"""The portable sparse path against the float64 dense reference: outputs and q/k/v gradients."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from topopack import BIDIRECTIONAL, PAPER, TopoLayout, topo_pack_attention
from topopack.kernels import portable
from topopack.reference import attention as reference

from strategies import layouts

RULES = st.sampled_from([PAPER, BIDIRECTIONAL])
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def qkv(layout, dtype, b=2, h=2, d=8, seed=0, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(magnitude * torch.randn(b, h, layout.num_tokens, d, generator=g, dtype=torch.float64))
            .to(dtype).requires_grad_() for _ in range(3)]


def check_against_reference(layout, rules, dtype, seed, scale=None, magnitude=1.0):
    q, k, v = qkv(layout, dtype, seed=seed, magnitude=magnitude)
    out = topo_pack_attention(q, k, v, layout, rules=rules, scale=scale, backend="portable")
    ref = reference(q.double(), k.double(), v.double(), layout, rules, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b.double(), rtol=10 * tol, atol=10 * tol, msg=f"d{name}")


# 300 + 200 = 500 generated layouts per run
@settings(max_examples=300)
@given(layouts(), RULES, st.integers(0, 2**16))
def test_matches_reference_fp64(case, rules, seed):
    check_against_reference(case[0], rules, torch.float64, seed)


@settings(max_examples=200)
@given(layouts(), RULES, st.integers(0, 2**16), st.sampled_from([None, 0.3]))
def test_matches_reference_fp32(case, rules, seed, scale):
    check_against_reference(case[0], rules, torch.float32, seed, scale=scale)


@pytest.mark.parametrize("rules", [PAPER, BIDIRECTIONAL])
def test_large_logits_stay_finite_and_exact(rules):
    """q and k scaled until logits reach +-1e4: no clamping, no NaN, same result as float64."""
    layout = TopoLayout.cat([TopoLayout.from_grid(7, 6, 3), TopoLayout.from_grid(2, 5, 3)])
    q, k, _ = qkv(layout, torch.float64, seed=3)
    logits = float((q @ k.transpose(-1, -2)).detach().abs().max()) / 8 ** 0.5
    magnitude = float((1e4 / logits) ** 0.5)
    check_against_reference(layout, rules, torch.float64, seed=3, magnitude=magnitude)
    q, k, v = (t.detach() for t in qkv(layout, torch.float32, seed=3, magnitude=magnitude))
    assert float((q.double() @ k.double().transpose(-1, -2)).abs().max()) / 8 ** 0.5 > 5e3
    out = topo_pack_attention(q, k, v, layout, rules=rules, backend="portable")
    ref = reference(q.double(), k.double(), v.double(), layout, rules)
    assert torch.isfinite(out).all()
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding; outputs are convex mixes of v
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-2 * float(v.abs().max()))


def test_summary_block_is_chunked_with_exact_gradients(monkeypatch):
    """Force many row chunks in the summary x summary attention; results must not change."""
    layout = TopoLayout.from_grid(12, 12, 2)
    monkeypatch.setattr(portable, "CHUNK_SCORES", 2 * 2 * 36 * 5)  # a 5-row chunk
    for device_type in ("cpu", "other"):
        if device_type == "other":  # the chunked forward used off the CPU
            monkeypatch.setattr(portable._DenseAttention, "forward", _chunked_forward)
        check_against_reference(layout, PAPER, torch.float64, seed=1)


@staticmethod
def _chunked_forward(ctx, q, k, v):
    ctx.save_for_backward(q, k, v)
    step = portable._row_chunk(q, k)
    parts = [portable.attend(q[..., r:r + step, :], k, v) for r in range(0, q.shape[-2], step)]
    return torch.cat([o for o, _ in parts], -2), torch.cat([l for _, l in parts], -1)


def test_poisoned_inputs_outside_the_mask_do_not_leak():
    """NaN in a token's q row must only affect that token's output row (rows are independent)."""
    layout = TopoLayout.from_grid(6, 6, 3)
    q, k, v = (t.detach() for t in qkv(layout, torch.float32))
    i = int(layout.patch_token[0])
    q[:, :, i] = float("nan")
    out = topo_pack_attention(q, k, v, layout, backend="portable")
    assert torch.isnan(out[:, :, i]).all()
    rest = torch.ones(layout.num_tokens, dtype=torch.bool)
    rest[i] = False
    assert torch.isfinite(out[:, :, rest]).all()


def test_layer_matches_reference_backend():
    from topopack import TopoPackAttention
    layout = TopoLayout.cat([TopoLayout.from_grid(5, 4, 2), TopoLayout.from_grid(3, 3, 2)])
    torch.manual_seed(0)
    layer = TopoPackAttention(32, 4, rules=BIDIRECTIONAL, backend="portable").double()
    x = torch.randn(2, layout.num_tokens, 32, dtype=torch.float64)
    y = layer(x, layout)
    layer.backend = "reference"
    torch.testing.assert_close(y, layer(x, layout))
    assert y.shape == x.shape
