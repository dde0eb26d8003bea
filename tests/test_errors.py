"""Every bad input gets a clear error that names the problem."""
import numpy as np
import pytest
import torch

from topopack import LayoutError, TopoLayout, TopoPackAttention, topo_pack_attention

LAYOUT = TopoLayout.from_grid(4, 4, 2)
L = LAYOUT.num_tokens


def qkv(n=L, d=8, dtype=torch.float32, device="cpu"):
    return [torch.randn(1, 2, n, d, dtype=dtype, device=device) for _ in range(3)]


@pytest.mark.parametrize("coords, match", [
    ([[0, 0], [float("nan"), 256]], "NaN or inf"),
    ([[0, 0], [float("inf"), 256]], "NaN or inf"),
    ([[0, 0], [256, 0], [256, 0]], "duplicate coords"),
    ([[0, 0], [256, 0], [300, 0]], "not on the patch grid"),
    ([[0, 0], [256.5, 0]], "not on the patch grid"),
    (np.zeros((0, 2)), "empty slide"),
    ([[0, 0, 0]], r"shape \[N, 2\]"),
])
def test_bad_coords(coords, match):
    with pytest.raises(LayoutError, match=match):
        TopoLayout.from_coords(torch.tensor(np.asarray(coords, dtype=np.float64)), 256)


@pytest.mark.parametrize("coords, match", [
    ([[0, 0], [1e300, 0]], "do not fit in int64"),
    ([[-2 ** 62, 0], [2 ** 62, 0]], "span more than 2.63 - 1 pixels"),
    ([["a", "b"]], "coords must be numbers"),
    ([[0, 2 ** 64]], "coords must be numbers"),
    (np.array([[0, 2 ** 63]], dtype=np.uint64), "do not fit in int64"),
])
def test_coords_outside_int64(coords, match):
    with pytest.raises(LayoutError, match=match):
        TopoLayout.from_coords(coords, 1)


@pytest.mark.parametrize("patch_size", [float("inf"), float("nan"), 2 ** 64, "256", True, 2.5, -256])
def test_bad_patch_size(patch_size):
    with pytest.raises(LayoutError, match="patch_size must be a positive integer"):
        TopoLayout.from_coords([[0, 0], [256, 0]], patch_size)


@pytest.mark.parametrize("origin, match", [
    ([0, 0, 0], r"origin must be 2 values \(x, y\)"),
    (0, r"origin must be 2 values \(x, y\)"),
    ([0, float("nan")], "origin values contain NaN or inf"),
    ([0.5, 0], "origin values are not on the patch grid"),
    ([300, 0], "coords lie before the given origin"),
])
def test_bad_origin(origin, match):
    with pytest.raises(LayoutError, match=match):
        TopoLayout.from_coords([[0, 0], [256, 0]], 256, origin=origin)


@pytest.mark.parametrize("height, width, match", [
    (2.5, 3, "height and width must be integers"),
    (3, True, "height and width must be integers"),
    (2 ** 40, 2 ** 40, "a slide holds at most"),
])
def test_bad_grid(height, width, match):
    with pytest.raises(LayoutError, match=match):
        TopoLayout.from_grid(height, width)


def test_cat_refuses_what_is_not_a_layout():
    with pytest.raises(LayoutError, match="item 1 is int 5"):
        TopoLayout.cat([LAYOUT, 5])
    with pytest.raises(LayoutError, match="a list of TopoLayouts, got int"):
        TopoLayout.cat(5)


@pytest.mark.parametrize("pack_size", [0, 5, -1, 2.5])
def test_pack_size_out_of_range(pack_size):
    with pytest.raises(LayoutError, match="pack_size must be an integer from 1 to 4"):
        TopoLayout.from_grid(3, 3, pack_size)


def test_empty_grid_and_bad_patch_size():
    with pytest.raises(LayoutError, match="empty slide"):
        TopoLayout.from_grid(0, 5)
    with pytest.raises(LayoutError, match="patch_size"):
        TopoLayout.from_coords([[0, 0]], 0)


def test_cat_refuses_mixed_pack_sizes():
    with pytest.raises(LayoutError, match="one pack_size"):
        TopoLayout.cat([TopoLayout.from_grid(2, 2, 2), TopoLayout.from_grid(3, 3, 3)])


def test_shapes_that_do_not_match_the_layout():
    q, k, v = qkv(n=L + 1)
    with pytest.raises(ValueError, match=f"has {L + 1} tokens .* layout has {L}"):
        topo_pack_attention(q, k, v, LAYOUT)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        topo_pack_attention(q[0], k, v, LAYOUT)
    with pytest.raises(ValueError, match="same shape"):
        topo_pack_attention(q, k[..., :4], v, LAYOUT)


def test_mismatched_devices_and_dtypes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="is on meta but the layout is on cpu"):
        topo_pack_attention(q.to("meta"), k, v, LAYOUT)
    with pytest.raises(ValueError, match="share a dtype"):
        topo_pack_attention(q, k.double(), v, LAYOUT)
    with pytest.raises(ValueError, match="floating point"):
        topo_pack_attention(q.long(), k, v, LAYOUT)


@pytest.mark.parametrize("b, h", [(0, 2), (1, 0)], ids=["B=0", "H=0"])
def test_empty_batch_or_no_heads(b, h):
    """H = 0 used to kill the process (SIGFPE in the CPU flash kernel), B = 0 to fail in a reshape."""
    q, k, v = (torch.randn(b, h, L, 8) for _ in range(3))
    with pytest.raises(ValueError, match="B and H must be at least 1"):
        topo_pack_attention(q, k, v, LAYOUT, backend="portable")


def test_head_dim_zero():
    q, k, v = qkv(d=0)
    with pytest.raises(ValueError, match="head_dim 0"):
        topo_pack_attention(q, k, v, LAYOUT)


def test_unknown_backend_and_rules():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        topo_pack_attention(q, k, v, LAYOUT, backend="cuda-magic")
    with pytest.raises(TypeError, match="TopoRules"):
        topo_pack_attention(q, k, v, LAYOUT, rules="paper")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TopoPackAttention(30, 4)


def test_feature_helpers_check_lengths():
    with pytest.raises(LayoutError, match="patch_features has 3 patches, the layout 16"):
        LAYOUT.tokens_from_patches(torch.randn(3, 4))
    with pytest.raises(LayoutError, match="summary_features must have shape"):
        LAYOUT.tokens_from_patches(torch.randn(16, 4), summary_features=torch.randn(2, 4))
    with pytest.raises(LayoutError, match="tokens have length 5"):
        LAYOUT.patches_from_tokens(torch.randn(5, 4))
