"""The portable sparse path against the float64 dense reference: outputs and q/k/v gradients."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from topopack import BIDIRECTIONAL, PAPER, TopoLayout, topo_pack_attention
from topopack.kernels import portable
from topopack.reference import attention as reference
from topopack.rules import GLOBAL, PATCH, SUMMARY

from strategies import layouts

RULES = st.sampled_from([PAPER, BIDIRECTIONAL])
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def qkv(layout, dtype, b=2, h=2, d=8, seed=0, magnitude=1.0, dv=None):
    g = torch.Generator().manual_seed(seed)
    return [(magnitude * torch.randn(b, h, layout.num_tokens, n, generator=g, dtype=torch.float64))
            .to(dtype).requires_grad_() for n in (d, d, dv or d)]


def check_against_reference(layout, rules, dtype, seed, scale=None, magnitude=1.0, dv=None, tol=None):
    q, k, v = qkv(layout, dtype, seed=seed, magnitude=magnitude, dv=dv)
    out = topo_pack_attention(q, k, v, layout, rules=rules, scale=scale, backend="portable")
    ref = reference(q.double(), k.double(), v.double(), layout, rules, scale)
    assert out.dtype == dtype and out.shape == v.shape and torch.isfinite(out).all()
    tol = tol or TOL[dtype]
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


@settings(max_examples=40)
@given(layouts(), RULES, st.integers(1, 12), st.integers(0, 2**16))
def test_value_head_dim_of_its_own(case, rules, dv, seed):
    """v [B, H, L, Dv] with Dv != D, as F.scaled_dot_product_attention allows (the CPU flash kernel does not)."""
    check_against_reference(case[0], rules, torch.float64, seed, dv=dv)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rules", [PAPER, BIDIRECTIONAL], ids=lambda r: r.name)
def test_half_precision_keeps_its_dtype(dtype, tol, rules):
    """Half inputs give half outputs (the merge of the pieces used to promote to fp32), close to float64."""
    layout = TopoLayout.cat([TopoLayout.from_grid(7, 6, 3), TopoLayout.from_coords([[0, 0], [1, 1], [3, 0]], 1, 3)])
    check_against_reference(layout, rules, dtype, seed=2, dv=16, tol=tol)


def test_bf16_layer_runs_on_the_cpu():
    """TopoPackAttention(...).bfloat16() on the CPU: forward and backward, against the reference backend."""
    from topopack import TopoPackAttention
    layout = TopoLayout.cat([TopoLayout.from_grid(5, 4, 2), TopoLayout.from_grid(3, 3, 2)])
    torch.manual_seed(0)
    layer = TopoPackAttention(32, 4, backend="portable").bfloat16()
    x = torch.randn(2, layout.num_tokens, 32).bfloat16().requires_grad_()
    y = layer(x, layout)
    gx, = torch.autograd.grad(y.float().square().sum(), x)
    layer.backend = "reference"
    y_ref = layer(x, layout)
    gx_ref, = torch.autograd.grad(y_ref.float().square().sum(), x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gx, gx_ref, rtol=5e-2, atol=5e-2 * float(gx_ref.abs().max()))


@pytest.mark.parametrize("rules", [PAPER, BIDIRECTIONAL], ids=lambda r: r.name)
def test_double_backward_matches_reference(rules):
    """Second derivatives (a gradient penalty): the summary rows' dense path differentiates its own backward."""
    layout = TopoLayout.cat([TopoLayout.from_grid(3, 4, 2), TopoLayout.from_coords([[0, 0], [1, 1]], 1, 2)])
    q, k, v = qkv(layout, torch.float64, b=1, h=2, d=4, seed=5)
    grad = torch.randn(1, 2, layout.num_tokens, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    second = []
    for backend in ("portable", "reference"):
        out = topo_pack_attention(q, k, v, layout, rules=rules, backend=backend)
        first = torch.autograd.grad(out, (q, k, v), grad, create_graph=True)
        penalty = sum((g * torch.linspace(-1, 1, g.shape[-1], dtype=g.dtype)).square().sum() for g in first)
        second.append(torch.autograd.grad(penalty, (q, k, v)))
    for name, a, b in zip("qkv", *second):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d2/d{name}")


def test_gradgradcheck(monkeypatch):
    """Numerical second derivatives of the portable path itself, the summary block in one-row chunks."""
    monkeypatch.setattr(portable, "CHUNK_SCORES", 1)
    layout = TopoLayout.cat([TopoLayout.from_grid(2, 3, 2), TopoLayout.from_coords([[0, 0], [1, 1]], 1, 2)])
    q, k, v = qkv(layout, torch.float64, b=1, h=1, d=3, seed=7)
    fn = lambda q, k, v: topo_pack_attention(q, k, v, layout, rules=BIDIRECTIONAL, backend="portable")
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_fullgraph_compile_stops_at_the_documented_host_read():
    """The limit in kernels/portable.py's docstring: a training step under fullgraph=True fails at _host_sizes;
    without fullgraph it compiles around that graph break and gives the eager loss and gradients."""
    from topopack import TopoPackAttention
    layout = TopoLayout.cat([TopoLayout.from_grid(2, 3, 2), TopoLayout.from_coords([[0, 0], [1, 1]], 1, 2)])
    torch.manual_seed(0)
    layer = TopoPackAttention(8, 2, backend="portable")
    x = torch.randn(1, layout.num_tokens, 8)

    def step(x, layout):
        layer.zero_grad()
        loss = layer(x, layout).square().mean()
        loss.backward()
        return loss

    torch._dynamo.reset()
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported, match="_host_sizes"):
            torch.compile(step, fullgraph=True, backend="eager")(x, layout)
        loss = torch.compile(step, backend="eager")(x, layout)
        grads = [p.grad.clone() for p in layer.parameters()]
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, step(x, layout))
    for got, param in zip(grads, layer.parameters()):
        torch.testing.assert_close(got, param.grad)


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


def test_rules_outside_the_sparse_table_are_refused(monkeypatch):
    """The sparse backends compute the groups of topopack.rules.SPARSE_KEY_GROUPS; every TopoRules stays inside."""
    from topopack import TopoRules, rules as rules_module
    for flags in itertools.product([False, True], repeat=2):
        rules_module.sparse_key_groups(TopoRules(*flags), "portable")
    layout = TopoLayout.from_grid(3, 3, 2)
    q, k, v = qkv(layout, torch.float64)
    G = rules_module.KeyGroup
    odd = {GLOBAL: frozenset({G.SLIDE_GLOBAL}), PATCH: frozenset({G.SLIDE_GLOBAL}),  # patches without their pack
           SUMMARY: frozenset({G.SLIDE_GLOBAL, G.PACK_PATCHES, G.SLIDE_SUMMARIES})}
    monkeypatch.setattr(rules_module, "key_groups", lambda rules: odd)
    with pytest.raises(NotImplementedError, match="portable backend: token kind 2 attends to .*SLIDE_GLOBAL"):
        topo_pack_attention(q, k, v, layout, backend="portable")


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
