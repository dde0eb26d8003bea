"""Each contender of benchmarks/contenders.py computes what benchmarks/README.md says it does, against float64."""
import math

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from benchmarks.contenders import (INTERLEAVED_MAX_TOKENS, Case, Config, build_impl, calls, flex_impl,
                                   interleaved_order)
from topopack.kernels import flex
from topopack.reference import attention as reference
from topopack.rules import GLOBAL, PATCH, SUMMARY

TOPO = ["topopack-portable", "authors", "flex", "flex-arith", "flex-interleaved"]


@pytest.fixture
def eager_flex(monkeypatch):
    """The flex contenders with PyTorch's eager flex in place of the compiled kernel: the mask_mods, block masks
    and token orders are the contenders' own, without a ~15 s inductor compile per variant on this CPU."""
    monkeypatch.setattr(flex, "compiled_flex", lambda dynamic=None: flex_attention)


def case(side=5, rules="paper", heads=2, head_dim=16):
    return Case(Config(device="cpu", sizes=(side,), heads=heads, head_dim=head_dim, rules=rules),
                side, torch.device("cpu"))


def forward(name, c):
    impl = build_impl(name, c, free_bytes=lambda: 1 << 40)
    out = calls(impl, c, impl.setup() if impl.setup else None).forward()
    return out if impl.permute is None else out[:, :, torch.argsort(impl.permute)]


@pytest.mark.parametrize("rules", ["paper", "bidirectional"])
@pytest.mark.parametrize("name", TOPO)
def test_topo_pack_contender_matches_float64_reference(eager_flex, name, rules):
    c = case(rules=rules)
    want = reference(*(t.double() for t in c.qkv), c.layout, c.rules, c.scale)
    torch.testing.assert_close(forward(name, c).double(), want, atol=2e-5, rtol=1e-4)


def test_dense_contender_is_unmasked_attention_over_all_tokens():
    c = case()
    q, k, v = (t.double() for t in c.qkv)
    want = torch.softmax(q @ k.transpose(-1, -2) * c.scale, dim=-1) @ v
    torch.testing.assert_close(forward("dense", c).double(), want, atol=2e-5, rtol=1e-4)


def test_floor_contender_is_dense_attention_over_global_and_summary_tokens():
    c = case(side=7)
    n = 1 + c.layout.num_packs
    assert (c.layout.token_kind[:n] != PATCH).all()  # the first 1 + P tokens are the global and the summaries
    q, k, v = (t[:, :, :n].double() for t in c.qkv)
    want = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c.cfg.head_dim), dim=-1) @ v
    torch.testing.assert_close(forward("floor", c).double(), want, atol=2e-5, rtol=1e-4)


def test_flex_contenders_have_no_backward_on_the_cpu():
    impl = build_impl("flex", case(), free_bytes=lambda: 0)
    assert impl.backward is False and calls(impl, case(), None).fwdbwd is None


def test_interleaved_order_is_the_authors_order():
    layout = case(side=7).layout
    order = interleaved_order(layout)
    kinds, packs = layout.token_kind[order], layout.token_pack[order]
    assert sorted(order.tolist()) == list(range(layout.num_tokens))
    assert kinds[0] == GLOBAL and (packs[1:].diff() >= 0).all()  # the global token, then pack by pack
    for p in range(layout.num_packs):  # each pack: its patches, then its summary
        in_pack = (packs == p).nonzero().flatten()
        assert (kinds[in_pack[:-1]] != SUMMARY).all() and kinds[in_pack[-1]] == SUMMARY


def test_authors_contender_skips_a_mask_beyond_the_limit():
    c = case(side=9)
    c.cfg.max_mask_gb = 1e-6
    impl = build_impl("authors", c, free_bytes=lambda: 1 << 40)
    assert impl.skip.startswith("needs") and impl.forward is None


def test_flex_interleaved_skips_large_grids():
    small, large = (case(side=s, heads=1, head_dim=8) for s in (30, 40))
    assert small.n_tokens <= INTERLEAVED_MAX_TOKENS["cpu"] < large.n_tokens
    assert not flex_impl(small, "flex-interleaved").skip
    assert flex_impl(large, "flex-interleaved").skip.startswith("small sizes only")
