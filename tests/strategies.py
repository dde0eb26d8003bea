"""Hypothesis strategies for slide layouts: random grids with holes, strips, single patches, several slides."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from topopack import TopoLayout


@st.composite
def slide_coords(draw, max_side: int = 9):
    """(coords [N, 2] level-0 x, y, patch_size) of one slide with random holes."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    keep = np.array(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), dtype=bool)
    if not keep.any():
        keep[draw(st.integers(0, h * w - 1))] = True
    ys, xs = np.divmod(np.nonzero(keep)[0], w)
    patch_size = draw(st.sampled_from([1, 224, 256]))
    origin = np.array([draw(st.integers(0, 3)), draw(st.integers(0, 3))]) * patch_size + draw(st.integers(0, 50))
    coords = np.stack([xs, ys], 1) * patch_size + origin
    perm = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(coords))  # input order is arbitrary
    return coords[perm].astype(np.int64), patch_size


@st.composite
def layouts(draw, max_slides: int = 3, max_side: int = 9):
    """(layout, slides, pack_size) where slides is the list of (coords, patch_size) it was built from."""
    k = draw(st.integers(1, 4))
    slides = draw(st.lists(slide_coords(max_side=max_side), min_size=1, max_size=max_slides))
    parts = [TopoLayout.from_coords(c, ps, k) for c, ps in slides]
    return (parts[0] if len(parts) == 1 else TopoLayout.cat(parts)), slides, k
