"""TopoLayout: token order, bookkeeping, feature round trips, multi-slide concatenation."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from topopack import TopoLayout
from topopack.rules import GLOBAL, PATCH, SUMMARY

from strategies import layouts, slide_coords


@settings(max_examples=150)
@given(layouts())
def test_every_patch_appears_once_and_round_trips(case):
    layout, slides, k = case
    n = sum(len(c) for c, _ in slides)
    assert layout.num_patches == n and layout.num_slides == len(slides)
    assert layout.num_tokens == n + layout.num_packs + layout.num_slides
    tokens = layout.patch_token
    assert torch.unique(tokens).numel() == n
    assert (layout.token_kind[tokens] == PATCH).all()
    assert int((layout.token_kind == PATCH).sum()) == n
    x = torch.randn(2, n, 5)
    assert torch.equal(layout.patches_from_tokens(layout.tokens_from_patches(x)), x)


@settings(max_examples=150)
@given(layouts())
def test_packs_are_grid_cells(case):
    layout, slides, k = case
    first = 0
    for s, (coords, ps) in enumerate(slides):
        cell = (torch.as_tensor(coords) - torch.as_tensor(coords).min(0).values) // ps  # (x, y)
        idx = torch.arange(first, first + len(coords))
        first += len(coords)
        pack = layout.patch_pack[idx]
        assert (layout.pack_slide[pack] == s).all()
        assert torch.equal(layout.pack_cell[pack], torch.stack([cell[:, 1], cell[:, 0]], 1) // k)
        assert torch.equal(layout.patch_cell[idx], torch.stack([cell[:, 1], cell[:, 0]], 1))
        # two patches share a pack exactly when they share a k x k cell
        key = (cell[:, 1] // k) * 10_000 + cell[:, 0] // k
        assert torch.equal(key[:, None] == key[None], pack[:, None] == pack[None])
    # no empty pack, at most k*k patches, patches of a pack contiguous after its slide's summaries
    counts = layout.pack_patch_count
    assert (counts >= 1).all() and (counts <= k * k).all()
    assert torch.equal(torch.bincount(layout.patch_pack, minlength=layout.num_packs), counts)
    for p in range(layout.num_packs):
        span = layout.token_pack[layout.pack_patch_start[p]:layout.pack_patch_start[p] + counts[p]]
        assert (span == p).all()
    assert (layout.token_kind[layout.pack_summary_token] == SUMMARY).all()
    assert (layout.token_kind[layout.slide_global_token] == GLOBAL).all()


@settings(max_examples=60)
@given(layouts())
def test_default_summary_and_global_are_means(case):
    layout, _, _ = case
    x = torch.randn(layout.num_patches, 4, dtype=torch.float64)
    tok = layout.tokens_from_patches(x)
    for p in range(layout.num_packs):
        assert torch.allclose(layout.summaries_from_tokens(tok)[p], x[layout.patch_pack == p].mean(0))
    for s in range(layout.num_slides):
        a, b = layout.slide_patch_start[s], layout.slide_patch_start[s + 1]
        assert torch.allclose(layout.globals_from_tokens(tok)[s], x[a:b].mean(0))


def test_given_summary_and_global_features_are_used():
    layout = TopoLayout.from_grid(4, 5, 2)
    x = torch.randn(layout.num_patches, 3)
    s, g = torch.randn(layout.num_packs, 3), torch.randn(1, 3)
    tok = layout.tokens_from_patches(x, s, g)
    assert torch.equal(layout.summaries_from_tokens(tok), s) and torch.equal(layout.globals_from_tokens(tok), g)


def test_cat_keeps_slides_apart():
    a, b = TopoLayout.from_grid(3, 4, 2), TopoLayout.from_grid(5, 3, 2)
    ab = TopoLayout.cat([a, b])
    assert ab.num_tokens == a.num_tokens + b.num_tokens
    assert torch.equal(ab.token_slide, torch.cat([a.token_slide, b.token_slide + 1]))
    assert torch.equal(ab.patch_token[a.num_patches:], b.patch_token + a.num_tokens)
    assert torch.equal(ab.token_pack[a.num_tokens + 1:], b.token_pack[1:] + a.num_packs)
    assert ab.slide_token_start.tolist() == [0, a.num_tokens, a.num_tokens + b.num_tokens]


@settings(max_examples=40)
@given(slide_coords())
def test_origin_keeps_pack_cells_for_a_subset(case):
    coords, ps = case
    full = TopoLayout.from_coords(coords, ps, 3)
    keep = np.arange(len(coords)) % 2 == 0
    sub = TopoLayout.from_coords(coords[keep], ps, 3, origin=coords.min(0))
    assert torch.equal(sub.patch_cell, full.patch_cell[torch.from_numpy(keep)])


@pytest.mark.parametrize("coords", [
    [[2 ** 62, 0], [2 ** 62 + 1, 0], [2 ** 62, 3]],  # float64 cannot tell 2^62 from 2^62 + 1
    [[0, 0], [2 ** 32 - 1, 0], [0, 2 ** 32]],  # row * width wraps around int64
    [[-2 ** 62 + 1, 5], [2 ** 62, 5]],  # a span of 2^63 - 1 pixels
])
@pytest.mark.parametrize("pack_size", [1, 2])
def test_int64_extremes_keep_their_cells(coords, pack_size):
    """Grid cells and packs exactly as Python integers compute them, and no false duplicates."""
    layout = TopoLayout.from_coords(torch.tensor(coords), 1, pack_size)
    x0, y0 = min(c[0] for c in coords), min(c[1] for c in coords)
    cells = [(y - y0, x - x0) for x, y in coords]
    assert layout.patch_cell.tolist() == [list(c) for c in cells]
    packs = sorted({(r // pack_size, c // pack_size) for r, c in cells})  # row-major
    assert layout.pack_cell.tolist() == [list(p) for p in packs]
    assert layout.patch_pack.tolist() == [packs.index((r // pack_size, c // pack_size)) for r, c in cells]


def test_large_slide_builds():
    layout = TopoLayout.from_grid(447, 447, 3)  # 199,809 patches
    assert layout.num_packs == 149 * 149
    assert layout.num_tokens == 199_809 + 149 * 149 + 1


def test_to_device_keeps_everything():
    layout = TopoLayout.from_grid(3, 3, 2).to("cpu")
    assert layout.device.type == "cpu" and layout.num_packs == 4


def test_sparsity_counts_match_the_paper_scale():
    layout = TopoLayout.from_grid(96, 96, 3)
    from topopack import PAPER
    assert 0.005 < layout.sparsity(PAPER) < 0.02  # "about 1% of dense"
    with pytest.raises(AttributeError):
        layout.pack_size = 2  # frozen
