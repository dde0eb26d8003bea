"""The dense reference mask against the rules, recomputed here from the slide geometry alone."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from topopack import BIDIRECTIONAL, PAPER, TopoLayout, topo_pack_attention
from topopack.reference import MAX_DENSE_TOKENS, attention, dense_mask

from strategies import layouts


def geometric_mask(layout, slides, k, rules):
    """The issue's rules, restated token by token from the input coords (independent of the layout's bookkeeping)."""
    kinds, slide_of, cell_of = [], [], []
    pack_cells = layout.pack_cell.tolist()
    patch_of_token = {t: i for i, t in enumerate(layout.patch_token.tolist())}
    offsets = np.cumsum([0] + [len(c) for c, _ in slides])
    for t in range(layout.num_tokens):
        s = int(np.searchsorted(layout.slide_token_start.numpy(), t, side="right") - 1)
        slide_of.append(s)
        if t in patch_of_token:
            i = patch_of_token[t]
            coords, ps = slides[s]
            x, y = (coords[i - offsets[s]] - coords.min(0)) // ps
            kinds.append("patch")
            cell_of.append((y // k, x // k))
        elif t == layout.slide_token_start[s]:
            kinds.append("global")
            cell_of.append(None)
        else:
            kinds.append("summary")
            cell_of.append(tuple(pack_cells[int(layout.token_pack[t])]))
    n = layout.num_tokens
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            same_slide = slide_of[i] == slide_of[j]
            same_pack = same_slide and cell_of[i] is not None and cell_of[i] == cell_of[j]
            qi, kj = kinds[i], kinds[j]
            if not same_slide:
                continue
            if kj == "global":
                m[i, j] = True
            elif qi == "global":
                m[i, j] = rules.global_to_all
            elif qi == "patch":
                m[i, j] = same_pack and (kj == "patch" or (kj == "summary" and rules.patch_to_summary))
            elif qi == "summary":
                m[i, j] = kj == "summary" or (kj == "patch" and same_pack)
    return torch.from_numpy(m)


@settings(max_examples=60)
@given(layouts(max_side=6), st.sampled_from([PAPER, BIDIRECTIONAL]))
def test_dense_mask_matches_geometry(case, rules):
    layout, slides, k = case
    assert torch.equal(dense_mask(layout, rules), geometric_mask(layout, slides, k, rules))
    assert int(dense_mask(layout, rules).sum()) == layout.num_allowed_pairs(rules)


def test_reference_is_softmax_over_allowed_keys():
    layout = TopoLayout.from_grid(4, 4, 2)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 8, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v, layout, PAPER, scale=0.5)
    mask = dense_mask(layout, PAPER)
    i = int(layout.patch_token[5])
    keys = mask[i].nonzero()[:, 0]
    w = torch.softmax(0.5 * q[0, 1, i] @ k[0, 1, keys].T, 0)
    assert torch.allclose(out[0, 1, i], w @ v[0, 1, keys])


def test_reference_refuses_huge_layouts():
    side = int(MAX_DENSE_TOKENS ** 0.5) + 2
    with pytest.raises(ValueError, match="O\\(L\\^2\\)"):
        dense_mask(TopoLayout.from_grid(side, side, 3))


NAN_LAYOUT = TopoLayout.cat([TopoLayout.from_grid(3, 5, 2), TopoLayout.from_coords([[0, 0], [1, 1], [3, 0]], 1, 2)])


@pytest.mark.parametrize("rules", [PAPER, BIDIRECTIONAL], ids=lambda r: r.name)
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("token", ["global", "summary", "patch", "second slide's patch"])
def test_nan_reaches_exactly_the_rows_that_see_it(token, where, rules):
    """A NaN in one token's q row poisons that output row only; in its k row, the rows whose mask holds it.
    The reference must not hide it (it used to zero NaN rows), and portable and flex must agree."""
    layout = NAN_LAYOUT
    t = {"global": 0, "summary": int(layout.pack_summary_token[2]), "patch": int(layout.patch_token[4]),
         "second slide's patch": int(layout.patch_token[-1])}[token]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.num_tokens, 8, generator=g) for _ in range(3))
    {"q": q, "k": k}[where][:, :, t] = float("nan")
    want = torch.zeros(layout.num_tokens, dtype=torch.bool)
    if where == "q":
        want[t] = True
    else:
        want = dense_mask(layout, rules)[:, t]
    with torch.no_grad():
        for backend in ("reference", "portable", "flex"):
            out = topo_pack_attention(q, k, v, layout, rules=rules, backend=backend)
            nan_rows = torch.isnan(out).any(-1)
            assert torch.equal(nan_rows, want.expand_as(nan_rows)), backend
            assert torch.isnan(out[:, :, want]).all() and torch.isfinite(out[:, :, ~want]).all(), backend
