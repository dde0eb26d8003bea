"""Q-Former shapes and key padding; region -> packs against a brute-force pixel check."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from topopack import TopoLayout
from topopack.model.qformer import QFormer, QFormerConfig
from topopack.model.regions import RegionError, pack_boxes, pack_positions, packs_in_region


def small_qformer(**kw):
    torch.manual_seed(0)
    kw = {"enc_dim": 24, "llm_dim": 40, "dim": 32, "num_queries": 6, "depth": 2, "heads": 4, "anchors": 2, **kw}
    cfg = QFormerConfig(**kw)
    return QFormer(cfg).eval()


def test_shapes():
    qf = small_qformer()
    out = qf(torch.randn(3, 11, 24), torch.zeros(3, 11, dtype=torch.bool), torch.rand(3, 11, 2))
    assert out.shape == (3, 6, 40) and torch.isfinite(out).all()


def test_key_padding_masks():
    """Changing padded keys (even to NaN/huge values) does not change the output; ragged batch == one by one."""
    qf = small_qformer()
    lengths = [3, 9, 1]
    mem = torch.randn(3, 9, 24)
    pos = torch.rand(3, 9, 2)
    pad = torch.arange(9)[None] >= torch.tensor(lengths)[:, None]
    ref = qf(mem, pad, pos)
    poisoned = mem.clone()
    poisoned[pad] = torch.randn(int(pad.sum()), 24) * 1e4
    poisoned[0, 5] = float("nan")
    pos2 = pos.clone()
    pos2[pad] = torch.rand(int(pad.sum()), 2)
    torch.testing.assert_close(qf(poisoned, pad, pos2), ref)
    for i, n in enumerate(lengths):
        alone = qf(mem[i:i + 1, :n], None, pos[i:i + 1, :n])
        torch.testing.assert_close(alone[0], ref[i], rtol=1e-5, atol=1e-5)
    # and the unpadded keys do matter
    changed = mem.clone()
    changed[1, 0] += 1.0
    assert not torch.allclose(qf(changed, pad, pos)[1], ref[1])


def test_empty_region_is_an_error():
    qf = small_qformer()
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1] = True
    with pytest.raises(ValueError, match="no memory tokens"):
        qf(torch.randn(2, 4, 24), pad)


def test_gradients_reach_queries_and_memory():
    qf = small_qformer()
    mem = torch.randn(2, 5, 24, requires_grad=True)
    qf(mem).square().mean().backward()
    assert qf.queries.grad.abs().sum() > 0 and mem.grad.abs().sum() > 0


@settings(max_examples=25)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), ps=st.integers(1, 3), box=st.tuples(
    st.integers(-5, 60), st.integers(-5, 60), st.integers(1, 40), st.integers(1, 40)))
def test_region_packs_match_brute_force(seed, k, ps, box):
    g = torch.Generator().manual_seed(seed)
    h, w = 7, 9
    keep = torch.rand(h * w, generator=g) < 0.6
    keep[int(torch.randint(h * w, (1,), generator=g))] = True
    cells = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)[keep]
    origin = torch.randint(0, 5, (2,), generator=g) * 1  # arbitrary pixel origin
    coords = origin + cells.flip(-1) * ps  # (x, y)
    layout = TopoLayout.from_coords(coords, ps, k, origin=origin)
    x0, y0, bw, bh = box
    x1, y1 = x0 + bw, y0 + bh
    # brute force: every integer pixel of the box -> its patch cell -> its pack cell
    xs, ys = torch.meshgrid(torch.arange(x0, x1), torch.arange(y0, y1), indexing="ij")
    dx, dy = xs.flatten() - origin[0], ys.flatten() - origin[1]
    inside = (dx >= 0) & (dy >= 0)
    pack_rc = torch.stack([torch.div(dy[inside], ps, rounding_mode="floor") // k,
                           torch.div(dx[inside], ps, rounding_mode="floor") // k], 1)
    hit_cells = {tuple(c) for c in pack_rc.tolist()}
    expected = [p for p, c in enumerate(layout.pack_cell.tolist()) if tuple(c) in hit_cells]
    if not expected:
        with pytest.raises(RegionError, match="intersects no tissue"):
            packs_in_region(layout, origin, ps, [x0, y0, x1, y1])
    else:
        assert packs_in_region(layout, origin, ps, [x0, y0, x1, y1]).tolist() == expected
    assert packs_in_region(layout, origin, ps, None).tolist() == list(range(layout.num_packs))
    # every pack's own rectangle selects that pack
    for p, r in enumerate(pack_boxes(layout, origin, ps).tolist()):
        assert p in packs_in_region(layout, origin, ps, r).tolist()
    pos = pack_positions(layout)
    assert pos.shape == (layout.num_packs, 2) and ((pos > 0) & (pos < 1)).all()


@pytest.mark.parametrize("box", [[0, 0, 0, 5], [3, 1, 2, 4], [1, 2, 3], "abc"])
def test_bad_boxes(box):
    layout = TopoLayout.from_grid(4, 4, 2)
    with pytest.raises(RegionError, match="region"):
        packs_in_region(layout, (0, 0), 1, box)


def test_region_positions_brute_force():
    """Positions re-normalised to each region's extent ignore padding; a one-pack region sits at 0.5."""
    from topopack.model.qformer import region_positions

    g = torch.Generator().manual_seed(1)
    pos = torch.rand(3, 7, 2, generator=g)
    lengths = [7, 4, 1]
    pad = torch.arange(7)[None] >= torch.tensor(lengths)[:, None]
    pos[pad] = float("nan")
    local = region_positions(pos, pad)
    for i, n in enumerate(lengths):
        p = pos[i, :n]
        span = p.max(0).values - p.min(0).values
        expect = torch.where(span > 1e-6, (p - p.min(0).values) / span.clamp_min(1e-6), torch.full_like(p, 0.5))
        torch.testing.assert_close(local[i, :n], expect)
        assert torch.isfinite(local[i]).all()


def test_anchor_points_row_major():
    from topopack.model.qformer import anchor_points

    a = anchor_points(3)
    assert a.shape == (9, 2)
    torch.testing.assert_close(a[0], torch.tensor([1 / 6, 1 / 6]))   # upper left
    torch.testing.assert_close(a[2], torch.tensor([5 / 6, 1 / 6]))   # upper right (x, y)
    torch.testing.assert_close(a[6], torch.tensor([1 / 6, 5 / 6]))   # lower left


def test_anchored_queries_read_near_their_anchor():
    """With a sharp anchor bias (one layer, so queries cannot relay), an anchored query's output depends on the
    key at its anchor and not on a far key; a free query depends on both."""
    qf = small_qformer(depth=1, anchors=2)
    with torch.no_grad():
        qf.layers[0].log_sigma.fill_(-6.0)
    # keys on the 2x2 anchor grid's corners of the region: 0 = top-left, 3 = bottom-right
    pos = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mem = torch.randn(1, 4, 24)
    ref = qf(mem, None, pos)
    far = mem.clone()
    far[0, 3] += 3.0
    out_far = qf(far, None, pos)
    torch.testing.assert_close(out_far[0, 0], ref[0, 0])          # anchor 0 (top-left) ignores the bottom-right key
    assert not torch.allclose(out_far[0, 3], ref[0, 3])           # anchor 3 reads it
    assert not torch.allclose(out_far[0, 4:], ref[0, 4:])         # so do the free queries
    near = mem.clone()
    near[0, 0] += 3.0
    assert not torch.allclose(qf(near, None, pos)[0, 0], ref[0, 0])


def test_anchor_grid_must_fit_the_queries():
    with pytest.raises(ValueError, match="anchors"):
        small_qformer(anchors=3)  # 9 anchored queries > 6 queries
