"""The flex backend (FlexAttention) against the dense float64 reference, on the CPU."""
import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from topopack import TopoLayout
from topopack.attention import topo_pack_attention
from topopack.kernels import flex
from topopack.layout import LayoutError
from topopack.reference.dense import attention as reference
from topopack.reference.dense import dense_mask
from topopack.rules import BIDIRECTIONAL, PAPER

RULES = st.sampled_from([PAPER, BIDIRECTIONAL])


@st.composite
def slide(draw, pack_size):
    """A random subset of a small grid, as level-0 pixel coords with an offset origin."""
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    keep = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    cells = [(x, y) for y in range(h) for x in range(w) if keep[y * w + x]] or [(0, 0)]
    origin = draw(st.integers(0, 3)) * 256
    return TopoLayout.from_coords(torch.tensor(cells) * 256 + origin, 256, pack_size)


@st.composite
def layouts(draw):
    k = draw(st.integers(1, 4))
    return TopoLayout.cat(draw(st.lists(slide(k), min_size=1, max_size=3)))


def qkv(layout, batch=2, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, layout.num_tokens, dim, generator=g) for _ in range(3))


@settings(max_examples=25)
@given(layout=layouts(), rules=RULES, seed=st.integers(0, 2 ** 16))
def test_eager_flex_matches_reference(layout, rules, seed):
    q, k, v = qkv(layout, seed=seed)
    scale = 0.3 + (seed % 7) / 10
    with torch.no_grad():
        out = flex.flex_attention(q, k, v, layout, rules, scale, compiled=False)
    torch.testing.assert_close(out, reference(q, k, v, layout, rules, scale), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("h,w,k", [(5, 7, 3), (6, 6, 3), (4, 9, 2), (7, 3, 4), (1, 1, 1), (8, 5, 1), (10, 4, 4)])
@pytest.mark.parametrize("rules", [PAPER, BIDIRECTIONAL], ids=["paper", "bidirectional"])
def test_mask_mods_match_dense_mask(h, w, k, rules):
    layout = TopoLayout.from_grid(h, w, k)
    n = layout.num_tokens
    expected = dense_mask(layout, rules)
    for mod in (flex.layout_mask_mod(layout, rules), flex.grid_mask_mod(*flex.grid_shape(layout), k, rules)):
        assert torch.equal(create_mask(mod, None, None, n, n, device="cpu")[0, 0], expected)


def test_grid_shape_refuses_non_grids():
    one = TopoLayout.from_grid(3, 4)
    assert flex.grid_shape(one) == (3, 4)
    with pytest.raises(LayoutError, match="one slide"):
        flex.grid_shape(TopoLayout.cat([one, one]))
    with pytest.raises(LayoutError, match="full grid"):
        flex.grid_shape(TopoLayout.from_coords(torch.tensor([[0, 0], [2, 0], [0, 1]]), 1))


def test_block_mask_is_cached_per_layout_and_freed_with_it():
    layout = TopoLayout.from_grid(4, 4)
    first = flex.block_mask(layout, PAPER)
    assert flex.block_mask(layout, PAPER) is first
    assert flex.block_mask(layout, BIDIRECTIONAL) is not first
    assert flex.block_mask(TopoLayout.from_grid(4, 4), PAPER) is not first  # an equal but new layout
    n = len(flex._CACHE)
    del layout
    gc.collect()
    assert len(flex._CACHE) < n


def test_cpu_backward_is_refused_clearly():
    layout = TopoLayout.from_grid(3, 3)
    q, k, v = (t.requires_grad_() for t in qkv(layout))
    with pytest.raises(NotImplementedError, match="no backward on the CPU"):
        flex.flex_attention(q, k, v, layout, PAPER)


def test_public_entry_point_routes_to_flex():
    layout = TopoLayout.from_grid(4, 5, 2)
    q, k, v = qkv(layout, seed=1)
    with torch.no_grad():
        out = topo_pack_attention(q, k, v, layout, rules=BIDIRECTIONAL, backend="flex")
    assert torch.equal(out, flex.flex_attention(q, k, v, layout, BIDIRECTIONAL))
    torch.testing.assert_close(out, reference(q, k, v, layout, BIDIRECTIONAL), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arithmetic", [False, True], ids=["index", "arithmetic"])
def test_compiled_flex_matches_reference(arithmetic):
    """The fused kernel (inductor's CPU flex template)."""
    layout = TopoLayout.from_grid(7, 8, 3)
    q, k, v = qkv(layout, seed=3)
    with torch.no_grad():
        out = flex.flex_attention(q, k, v, layout, BIDIRECTIONAL, arithmetic=arithmetic, compiled=True)
    torch.testing.assert_close(out, reference(q, k, v, layout, BIDIRECTIONAL), atol=2e-5, rtol=1e-4)


def test_value_head_dim_of_its_own():
    """v [B, H, L, Dv] with Dv != D through the public entry point, against the reference."""
    layout = TopoLayout.cat([TopoLayout.from_grid(4, 5, 2), TopoLayout.from_coords([[0, 0], [1, 1]], 1, 2)])
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 2, layout.num_tokens, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 2, layout.num_tokens, 5, generator=g)
    with torch.no_grad():
        out = topo_pack_attention(q, k, v, layout, rules=BIDIRECTIONAL, backend="flex")
    assert out.shape == v.shape
    torch.testing.assert_close(out, reference(q, k, v, layout, BIDIRECTIONAL), atol=2e-5, rtol=1e-4)
