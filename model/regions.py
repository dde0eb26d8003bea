"""Which packs a region box intersects (whole slide = WSI, a region = ROI, a small box = Patch).

A pack p of a slide laid out with ``TopoLayout.from_coords(coords, patch_size, k, origin=o)`` covers the
level-0 rectangle ``[o + pack_cell[p, ::-1] * k * patch_size, ... + k * patch_size)`` (pack_cell is
(row, col); pixel coordinates are (x, y)). A box [x0, y0, x1, y1] is half-open like the pack rectangles,
so a box that only touches a pack's edge does not select it.
"""
from __future__ import annotations

import torch

from topopack.layout import TopoLayout


class RegionError(ValueError):
    """A region box that is malformed or selects no tissue."""


def pack_boxes(layout: TopoLayout, origin, patch_size: int) -> torch.Tensor:
    """[P, 4] level-0 rectangles (x0, y0, x1, y1) of every pack, int64."""
    side = layout.pack_size * int(patch_size)
    o = torch.as_tensor(origin, dtype=torch.long, device=layout.device).reshape(2)
    xy0 = o + layout.pack_cell.flip(-1).long() * side  # (col, row) -> (x, y)
    return torch.cat([xy0, xy0 + side], -1)


def check_box(box, what: str = "region") -> tuple[float, float, float, float]:
    """Validate a [x0, y0, x1, y1] box; raise RegionError naming the problem."""
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise RegionError(f"{what} must be four numbers x0,y0,x1,y1, got {box!r}") from None
    if len(vals) != 4:
        raise RegionError(f"{what} must be four numbers x0,y0,x1,y1, got {len(vals)} values: {box!r}")
    x0, y0, x1, y1 = vals
    if not (x1 > x0 and y1 > y0):
        raise RegionError(f"{what} {box!r} is empty: need x1 > x0 and y1 > y0 (level-0 pixels)")
    return x0, y0, x1, y1


def packs_in_region(layout: TopoLayout, origin, patch_size: int, box=None) -> torch.Tensor:
    """Indices of the packs whose rectangle intersects ``box`` (all packs when box is None), ascending.

    Raises RegionError when the box holds no tissue pack of the slide.
    """
    if layout.num_slides != 1:
        raise RegionError(f"packs_in_region takes a one-slide layout, got {layout.num_slides} slides")
    if box is None:
        return torch.arange(layout.num_packs, device=layout.device)
    x0, y0, x1, y1 = check_box(box)
    r = pack_boxes(layout, origin, patch_size).double()
    hit = (r[:, 0] < x1) & (r[:, 2] > x0) & (r[:, 1] < y1) & (r[:, 3] > y0)
    idx = hit.nonzero().flatten()
    if idx.numel() == 0:
        raise RegionError(f"region {list(box)} intersects no tissue pack of the slide "
                          f"(tissue spans x {int(r[:, 0].min())}..{int(r[:, 2].max())}, "
                          f"y {int(r[:, 1].min())}..{int(r[:, 3].max())})")
    return idx


def pack_positions(layout: TopoLayout) -> torch.Tensor:
    """[P, 2] pack centres (x, y) normalised to [0, 1] over the slide's pack grid (for position codes)."""
    cell = layout.pack_cell.double()
    lo = cell.min(0).values
    extent = (cell.max(0).values - lo + 1)
    return ((cell - lo + 0.5) / extent).flip(-1).float()
