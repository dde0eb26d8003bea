"""TopoLayout: where each patch, summary and global token sits in the sequence.

Token order, one block per slide (like varlen batching):

    [global, summary_0 .. summary_{P-1}, patches of pack 0, patches of pack 1, ...]

Packs are the k x k cells of the slide's patch grid, in row-major order; the
patches of a pack are contiguous and row-major inside the pack. A pack exists
only if it holds at least one patch, so there are no padding tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from .rules import GLOBAL, PATCH, SUMMARY

MIN_PACK_SIZE, MAX_PACK_SIZE = 1, 4
MAX_PATCHES = 2 ** 31 - 1  # per slide


class LayoutError(ValueError):
    """Coordinates or features that cannot form a valid slide layout."""


def _int64_positions(values, what: str) -> torch.Tensor:
    """Integer pixel positions as an int64 tensor on the CPU; int64 input never passes through float64."""
    t = values
    if not isinstance(t, torch.Tensor):
        try:  # numpy keeps Python floats in float64 and big ints in int64
            t = torch.from_numpy(np.asarray(t))
        except (TypeError, ValueError, RuntimeError) as e:
            raise LayoutError(f"{what} must be numbers, got {values!r:.80}") from e
    if t.dtype == torch.bool or t.is_complex():
        raise LayoutError(f"{what} must be integer pixel positions, got dtype {t.dtype}")
    t = t.cpu()
    if t.dtype == torch.uint64 and t.numel() and int(t.numpy().max()) >= 2 ** 63:  # torch has no uint64 compare
        raise LayoutError(f"{what} do not fit in int64 (max {int(t.numpy().max())})")
    if not t.is_floating_point():
        return t.long()
    t = t.double()
    rows = t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)
    for bad, problem in ((~torch.isfinite(rows), "contain NaN or inf"),
                         (rows != rows.round(), "are not on the patch grid: they must be integer pixel positions"),
                         (rows.abs() >= 2.0 ** 63, "do not fit in int64")):
        if bad.any():
            row = int(bad.any(1).nonzero()[0])
            raise LayoutError(f"{what} {problem} (first at row {row}: {rows[row].tolist()})")
    return t.long()


def _as_coords(coords) -> torch.Tensor:
    """[N, 2] int64 level-0 (x, y) on the CPU."""
    coords = _int64_positions(coords, "coords")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise LayoutError(f"coords must have shape [N, 2] (x, y), got {tuple(coords.shape)}")
    if coords.shape[0] == 0:
        raise LayoutError("empty slide: coords has zero patches")
    if coords.shape[0] > MAX_PATCHES:
        raise LayoutError(f"coords has {coords.shape[0]} patches; a slide holds at most {MAX_PATCHES}")
    return coords


def _as_origin(origin) -> torch.Tensor:
    t = _int64_positions(origin, "origin values")
    if t.shape != (2,):
        raise LayoutError(f"origin must be 2 values (x, y), got {origin!r:.80}")
    return t


def _check_pack_size(pack_size: int) -> int:
    if not _is_int(pack_size) or not MIN_PACK_SIZE <= pack_size <= MAX_PACK_SIZE:
        raise LayoutError(f"pack_size must be an integer from {MIN_PACK_SIZE} to {MAX_PACK_SIZE}, got {pack_size!r}")
    return int(pack_size)


def _check_patch_size(patch_size) -> int:
    size = None
    if _is_int(patch_size):
        size = int(patch_size)
    elif not isinstance(patch_size, (bool, str, bytes)):
        try:
            f = float(patch_size)
        except (TypeError, ValueError, RuntimeError):
            f = math.nan
        size = int(f) if math.isfinite(f) and f.is_integer() else None
    if size is None or not 1 <= size < 2 ** 63:
        raise LayoutError(f"patch_size must be a positive integer (level-0 pixels), got {patch_size!r}")
    return size


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _row_major_key(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort like (row, col) and are equal exactly when both are; dense ranks, so no overflow."""
    _, r = torch.unique(row, return_inverse=True)
    cols, c = torch.unique(col, return_inverse=True)
    return r * cols.numel() + c


@dataclass(frozen=True, eq=False)
class TopoLayout:
    """The token layout of one or more slides. Build once per slide, reuse in every layer.

    Per token [L]: ``token_kind`` (0 global, 1 summary, 2 patch), ``token_pack``
    (-1 for global), ``token_slide``. Per input patch [N]: ``patch_token``,
    ``patch_pack``, ``patch_cell`` (grid row, col). Per pack [P]: ``pack_summary_token``,
    ``pack_patch_start`` and ``pack_patch_count`` (its patches are tokens
    ``start .. start+count-1``), ``pack_slide``, ``pack_cell`` (pack row, col).
    Per slide [S]: ``slide_token_start`` [S+1], ``slide_pack_start`` [S+1],
    ``slide_patch_start`` [S+1] (input patch ranges).
    """

    pack_size: int
    token_kind: torch.Tensor
    token_pack: torch.Tensor
    token_slide: torch.Tensor
    patch_token: torch.Tensor
    patch_pack: torch.Tensor
    patch_cell: torch.Tensor
    pack_summary_token: torch.Tensor
    pack_patch_start: torch.Tensor
    pack_patch_count: torch.Tensor
    pack_slide: torch.Tensor
    pack_cell: torch.Tensor
    slide_token_start: torch.Tensor
    slide_pack_start: torch.Tensor
    slide_patch_start: torch.Tensor

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_grid(cls, height: int, width: int, pack_size: int = 3, device=None) -> "TopoLayout":
        """A full height x width grid of patches, input order row-major."""
        if not (_is_int(height) and _is_int(width)):
            raise LayoutError(f"grid height and width must be integers, got {height!r} x {width!r}")
        if height < 1 or width < 1:
            raise LayoutError(f"empty slide: grid {height}x{width}")
        if height * width > MAX_PATCHES:
            raise LayoutError(f"grid {height}x{width} has {height * width} patches; a slide holds at most {MAX_PATCHES}")
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
        return cls.from_coords(coords, 1, pack_size, device=device)

    @classmethod
    def from_coords(cls, coords, patch_size, pack_size: int = 3, *, origin=None, device=None) -> "TopoLayout":
        """From level-0 top-left pixel coords [N, 2] (x, y), as TRIDENT and CLAM write them.

        Grid cell = (coords - origin) // patch_size, with origin = coords.min(0) by
        default. Pass the full slide's origin when coords are a subset (e.g. the
        visible patches under MAE masking) so that packs keep their grid cells.
        """
        k = _check_pack_size(pack_size)
        coords = _as_coords(coords)
        patch_size = _check_patch_size(patch_size)
        origin_t = coords.min(0).values if origin is None else _as_origin(origin)
        before = (coords < origin_t).any(1)
        if before.any():
            row = int(before.nonzero()[0])
            raise LayoutError(f"coords lie before the given origin {origin_t.tolist()} (row {row}: {coords[row].tolist()})")
        offset = coords - origin_t
        wrapped = (offset < 0).any(1)  # int64 overflow: the span from the origin exceeds 2^63 - 1
        if wrapped.any():
            row = int(wrapped.nonzero()[0])
            raise LayoutError(f"coords span more than 2^63 - 1 pixels: row {row} {coords[row].tolist()} from the "
                              f"origin {origin_t.tolist()}; coords must be level-0 pixel positions of one slide")
        off_grid = (offset % patch_size != 0).any(1)
        if off_grid.any():
            row = int(off_grid.nonzero()[0])
            raise LayoutError(
                f"coords are not on the patch grid: row {row} {coords[row].tolist()} is not a multiple "
                f"of patch_size={patch_size} from the origin {origin_t.tolist()}"
            )
        cell = offset // patch_size  # [N, 2] (col, row)
        return cls._build(cell[:, 1], cell[:, 0], k, device, coords)

    @classmethod
    def cat(cls, layouts: Sequence["TopoLayout"]) -> "TopoLayout":
        """Several slides in one layout; no token attends across slides."""
        try:
            layouts = list(layouts)
        except TypeError:
            raise LayoutError(f"cat takes a list of TopoLayouts, got {type(layouts).__name__}") from None
        if not layouts:
            raise LayoutError("cat needs at least one layout")
        for i, l in enumerate(layouts):
            if not isinstance(l, TopoLayout):
                raise LayoutError(f"cat takes TopoLayouts, but item {i} is {type(l).__name__} {l!r:.60}")
        k = layouts[0].pack_size
        if any(l.pack_size != k for l in layouts):
            raise LayoutError(f"cat needs one pack_size, got {[l.pack_size for l in layouts]}")
        device = layouts[0].device
        if any(l.device != device for l in layouts):
            raise LayoutError(f"cat needs layouts on one device, got {[str(l.device) for l in layouts]}")
        tok = pack = slide = patch = 0
        parts = {f.name: [] for f in fields(cls) if f.name != "pack_size"}
        for l in layouts:
            shift = {
                "token_kind": 0, "token_pack": pack, "token_slide": slide, "patch_token": tok,
                "patch_pack": pack, "patch_cell": 0, "pack_summary_token": tok, "pack_patch_start": tok,
                "pack_patch_count": 0, "pack_slide": slide, "pack_cell": 0,
                "slide_token_start": tok, "slide_pack_start": pack, "slide_patch_start": patch,
            }
            for name, s in shift.items():
                t = getattr(l, name)
                if name.startswith("slide_"):
                    t = t[:-1]
                if name == "token_pack":
                    t = torch.where(t >= 0, t + s, t)
                else:
                    t = t + s
                parts[name].append(t)
            tok, pack, slide, patch = tok + l.num_tokens, pack + l.num_packs, slide + l.num_slides, patch + l.num_patches
        ends = {"slide_token_start": tok, "slide_pack_start": pack, "slide_patch_start": patch}
        for name, end in ends.items():
            parts[name].append(torch.tensor([end], device=device))
        return cls(pack_size=k, **{n: torch.cat(ts) for n, ts in parts.items()})

    @classmethod
    def _build(cls, cy, cx, k: int, device, coords) -> "TopoLayout":
        """One slide from patch grid cells (row, col); multi-slide layouts go through cat()."""
        n = cy.numel()
        k2 = k * k
        py, px = cy // k, cx // k
        pack_keys, patch_pack = torch.unique(_row_major_key(py, px), return_inverse=True)  # row-major packs
        num_packs = pack_keys.numel()
        slot = (cy % k) * k + (cx % k)
        patch_key = patch_pack * k2 + slot
        order = torch.argsort(patch_key)  # token order of the patches
        dup = (patch_key[order[1:]] == patch_key[order[:-1]]).nonzero()
        if dup.numel():
            a, b = sorted(order[int(dup[0]):int(dup[0]) + 2].tolist())
            raise LayoutError(f"duplicate coords: rows {a} and {b} map to the same patch {coords[a].tolist()}")
        first_patch = 1 + num_packs
        patch_token = torch.empty(n, dtype=torch.long)
        patch_token[order] = torch.arange(first_patch, first_patch + n)
        pack_count = torch.bincount(patch_pack, minlength=num_packs)
        pack_start = first_patch + torch.cumsum(pack_count, 0) - pack_count
        num_tokens = first_patch + n
        pack_cell = torch.empty(num_packs, 2, dtype=torch.long)
        pack_cell[patch_pack] = torch.stack([py, px], 1)
        kind = torch.full((num_tokens,), PATCH, dtype=torch.int8)
        kind[0], kind[1:first_patch] = GLOBAL, SUMMARY
        token_pack = torch.empty(num_tokens, dtype=torch.long)
        token_pack[0] = -1
        token_pack[1:first_patch] = torch.arange(num_packs)
        token_pack[first_patch:] = patch_pack[order]
        t = dict(
            token_kind=kind,
            token_pack=token_pack,
            token_slide=torch.zeros(num_tokens, dtype=torch.long),
            patch_token=patch_token,
            patch_pack=patch_pack,
            patch_cell=torch.stack([cy, cx], 1),
            pack_summary_token=torch.arange(1, first_patch),
            pack_patch_start=pack_start,
            pack_patch_count=pack_count,
            pack_slide=torch.zeros(num_packs, dtype=torch.long),
            pack_cell=pack_cell,
            slide_token_start=torch.tensor([0, num_tokens]),
            slide_pack_start=torch.tensor([0, num_packs]),
            slide_patch_start=torch.tensor([0, n]),
        )
        return cls(pack_size=k, **{name: v.to(device) for name, v in t.items()})

    # ---- basic properties ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.token_kind.device

    @property
    def num_tokens(self) -> int:
        return self.token_kind.numel()

    @property
    def num_patches(self) -> int:
        return self.patch_token.numel()

    @property
    def num_packs(self) -> int:
        return self.pack_summary_token.numel()

    @property
    def num_slides(self) -> int:
        return self.slide_token_start.numel() - 1

    @property
    def slide_global_token(self) -> torch.Tensor:
        return self.slide_token_start[:-1]

    def to(self, device) -> "TopoLayout":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "pack_size"})

    def pack_slots(self) -> torch.Tensor:
        """[P, k*k] token index of each pack's patches, -1 past the pack's count."""
        k2 = self.pack_size ** 2
        j = torch.arange(k2, device=self.device)
        slots = self.pack_patch_start[:, None] + j
        return torch.where(j < self.pack_patch_count[:, None], slots, torch.full_like(slots, -1))

    def num_allowed_pairs(self, rules) -> int:
        """Number of (query, key) pairs the rules allow, from counts alone (no L x L)."""
        from .rules import KeyGroup as G, key_groups

        f64 = torch.float64
        count = self.pack_patch_count.to(f64)  # per pack
        slide_packs = self.slide_pack_start.diff().to(f64)  # per slide
        slide_tokens = self.slide_token_start.diff().to(f64)
        ones = torch.ones_like(count)
        # key-group sizes seen from a pack's rows, and from a slide's global row
        per_pack = {G.SLIDE_GLOBAL: ones, G.PACK_PATCHES: count, G.PACK_SUMMARY: ones,
                    G.SLIDE_SUMMARIES: slide_packs[self.pack_slide], G.SLIDE_ALL: slide_tokens[self.pack_slide]}
        per_slide = {G.SLIDE_GLOBAL: torch.ones_like(slide_packs), G.SLIDE_SUMMARIES: slide_packs, G.SLIDE_ALL: slide_tokens}
        groups = key_groups(rules)
        total = sum(float((count * per_pack[g]).sum()) for g in groups[PATCH])
        total += sum(float(per_pack[g].sum()) for g in groups[SUMMARY])
        total += sum(float(per_slide[g].sum()) for g in groups[GLOBAL])
        return int(total)

    def sparsity(self, rules) -> float:
        """Fraction of the dense L x L pairs that the rules allow."""
        return self.num_allowed_pairs(rules) / float(self.num_tokens) ** 2

    # ---- moving features between input order and token order ----------------------
    def tokens_from_patches(self, patch_features, summary_features=None, global_features=None) -> torch.Tensor:
        """[..., N, C] patch features in input order -> [..., L, C] tokens.

        A missing summary starts as the mean of its pack's patches, a missing global
        token as the mean of its slide's patches.
        """
        x = patch_features
        if x.shape[-2] != self.num_patches:
            raise LayoutError(f"patch_features has {x.shape[-2]} patches, the layout {self.num_patches}")
        if x.device != self.device:
            raise LayoutError(f"patch_features are on {x.device}, the layout on {self.device}")
        lead, c = x.shape[:-2], x.shape[-1]
        if summary_features is None:
            summary_features = segment_mean(x, self.patch_pack, self.num_packs)
        if global_features is None:
            patch_slide = self.pack_slide[self.patch_pack]
            global_features = segment_mean(x, patch_slide, self.num_slides)
        for name, t, n in (("summary_features", summary_features, self.num_packs), ("global_features", global_features, self.num_slides)):
            if t.shape[-2:] != (n, c):
                raise LayoutError(f"{name} must have shape [..., {n}, {c}], got {tuple(t.shape)}")
        out = x.new_empty(*lead, self.num_tokens, c)
        out[..., self.patch_token, :] = x
        out[..., self.pack_summary_token, :] = summary_features.to(x.dtype).expand(*lead, -1, -1)
        out[..., self.slide_global_token, :] = global_features.to(x.dtype).expand(*lead, -1, -1)
        return out

    def _pick(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-2] != self.num_tokens:
            raise LayoutError(f"tokens have length {tokens.shape[-2]}, the layout {self.num_tokens}")
        return tokens.index_select(-2, index)

    def patches_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., L, C] -> [..., N, C] patch states in input order."""
        return self._pick(tokens, self.patch_token)

    def summaries_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., L, C] -> [..., P, C] summary states in pack order."""
        return self._pick(tokens, self.pack_summary_token)

    def globals_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., L, C] -> [..., S, C] global states in slide order."""
        return self._pick(tokens, self.slide_global_token)

    def __repr__(self) -> str:
        return (f"TopoLayout(slides={self.num_slides}, patches={self.num_patches}, packs={self.num_packs}, "
                f"tokens={self.num_tokens}, pack_size={self.pack_size}, device={self.device})")


def segment_mean(x: torch.Tensor, segment: torch.Tensor, num: int) -> torch.Tensor:
    """Mean of x[..., i, :] over i with the same segment id -> [..., num, C]."""
    sums = x.new_zeros(*x.shape[:-2], num, x.shape[-1]).index_add_(-2, segment, x)
    counts = torch.bincount(segment, minlength=num).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]
