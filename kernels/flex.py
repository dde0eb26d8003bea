"""Topo-pack attention on FlexAttention (torch.nn.attention.flex_attention).

The mask is :func:`topopack.rules.allowed` evaluated inside a ``mask_mod``, on
per-token index tensors (token_kind / token_pack / token_slide) gathered at the
query and key index. For a single full grid there is also an arithmetic
``mask_mod`` that derives kind and pack from the token index alone (no loads).
``create_block_mask`` is expensive, so BlockMasks are cached per layout in a
weak cache: a layout that is garbage collected takes its masks with it.

On CUDA the fused (compiled) flex kernel runs; elsewhere the default is PyTorch's
eager flex, which materializes the scores and supports forward only on the CPU.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_eager

from topopack.layout import LayoutError, TopoLayout
from topopack.rules import GLOBAL, PATCH, SUMMARY, TopoRules, allowed

BLOCK_SIZE = 128  # FlexAttention's default sparse block
_CACHE: "weakref.WeakKeyDictionary[TopoLayout, dict]" = weakref.WeakKeyDictionary()
_COMPILED: dict = {}


def compiled_flex(dynamic: bool | None = None):
    """torch.compile(flex_attention), one per ``dynamic`` setting per process.

    dynamic=None recompiles once with dynamic shapes after a second slide length and
    then reuses that kernel; dynamic=False compiles one kernel per length (and is what
    the backend uses on the CPU, where dynamic flex fails to build in torch 2.13).
    """
    if dynamic not in _COMPILED:
        _COMPILED[dynamic] = torch.compile(_flex_eager, dynamic=dynamic)
    return _COMPILED[dynamic]


# ---- mask_mods ----------------------------------------------------------------------
def index_mask_mod(kind: torch.Tensor, pack: torch.Tensor, slide: torch.Tensor, rules: TopoRules):
    """mask_mod reading per-token kind / pack / slide tensors [L] (any token order)."""
    kind, pack, slide = kind.to(torch.int32), pack.to(torch.int32), slide.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(rules, kind[q_idx], pack[q_idx], slide[q_idx], kind[kv_idx], pack[kv_idx], slide[kv_idx])

    return mask_mod


def layout_mask_mod(layout: TopoLayout, rules: TopoRules):
    """mask_mod of a layout in its own token order, from its index tensors."""
    return index_mask_mod(layout.token_kind, layout.token_pack, layout.token_slide, rules)


def grid_shape(layout: TopoLayout) -> tuple[int, int]:
    """(height, width) of a layout that is one full grid; LayoutError otherwise."""
    if layout.num_slides != 1:
        raise LayoutError(f"the arithmetic mask_mod needs one slide, the layout has {layout.num_slides}")
    cells = layout.patch_cell
    h, w = (int(x) + 1 for x in cells.max(0).values.tolist())
    if int(cells.min()) != 0 or h * w != layout.num_patches:
        raise LayoutError(f"the arithmetic mask_mod needs a full grid: {layout.num_patches} patches in a {h}x{w} box")
    return h, w


def grid_mask_mod(height: int, width: int, pack_size: int, rules: TopoRules):
    """mask_mod of TopoLayout.from_grid(height, width, pack_size), kind and pack computed from the index.

    Packs are k x k cells in row-major order; a pack row holds k * width patches
    (fewer in the last row), a pack in it rows_in_row * k patches (fewer in the last column).
    """
    k = pack_size
    pack_rows, pack_cols = -(-height // k), -(-width // k)
    num_packs = pack_rows * pack_cols
    last_rows = height - (pack_rows - 1) * k  # patch rows in the last pack row
    first_patch = 1 + num_packs

    def attributes(t):
        u = (t - first_patch).clamp_min(0)  # patch offset (clamped for G and S tokens)
        pr = u // (k * width)
        rows = torch.where(pr == pack_rows - 1, last_rows, k)
        pc = ((u - pr * k * width) // (rows * k)).clamp_max(pack_cols - 1)
        kind = torch.where(t == 0, GLOBAL, torch.where(t < first_patch, SUMMARY, PATCH))
        pack = torch.where(t == 0, -1, torch.where(t < first_patch, t - 1, pr * pack_cols + pc))
        return kind, pack

    def mask_mod(b, h, q_idx, kv_idx):
        q_kind, q_pack = attributes(q_idx)
        k_kind, k_pack = attributes(kv_idx)
        return allowed(rules, q_kind, q_pack, 0, k_kind, k_pack, 0)

    return mask_mod


# ---- block masks --------------------------------------------------------------------
def build_block_mask(mask_mod, num_tokens: int, device, *, block_size: int = BLOCK_SIZE,
                     compile: bool | None = None) -> BlockMask:
    """create_block_mask over [L, L], broadcast over batch and heads (no cache).

    compile (default: on CUDA) fuses the mask evaluation into the block reduction
    instead of materializing the L x L mask.
    """
    device = torch.device(device)
    compile = device.type == "cuda" if compile is None else compile
    return create_block_mask(mask_mod, None, None, num_tokens, num_tokens, device=device,
                             BLOCK_SIZE=block_size, _compile=compile)


def block_mask(layout: TopoLayout, rules: TopoRules, *, arithmetic: bool = False,
               block_size: int = BLOCK_SIZE, compile: bool | None = None) -> BlockMask:
    """The layout's BlockMask, cached for as long as the layout lives."""
    key = (rules, arithmetic, block_size, compile)
    per_layout = _CACHE.setdefault(layout, {})
    if key not in per_layout:
        if arithmetic:
            mod = grid_mask_mod(*grid_shape(layout), layout.pack_size, rules)
        else:
            mod = layout_mask_mod(layout, rules)
        per_layout[key] = build_block_mask(mod, layout.num_tokens, layout.device, block_size=block_size,
                                           compile=compile)
    return per_layout[key]


# ---- the backend --------------------------------------------------------------------
def flex_attention(q, k, v, layout: TopoLayout, rules: TopoRules, scale: float | None = None, *,
                   arithmetic: bool = False, compiled: bool | None = None):
    """Topo-pack attention with FlexAttention, q, k, v: [B, H, L, D] in token order.

    compiled: the fused kernel (default on CUDA); the eager path materializes the
    scores. arithmetic: use the index-arithmetic mask_mod (single full grids only).
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError("flex backend: FlexAttention has no backward on the CPU; use backend='portable' "
                                  "or run under torch.no_grad()")
    compiled = q.device.type == "cuda" if compiled is None else compiled
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = block_mask(layout, rules, arithmetic=arithmetic)
    fn = compiled_flex(False if q.device.type == "cpu" else None) if compiled else _flex_eager
    return fn(q, k, v, block_mask=mask, scale=scale)
