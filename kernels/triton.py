"""Triton topo-pack attention: torch.library ops with autograd, and the public function.

Layers (fla-org style): ``triton_fwd`` / ``triton_bwd`` hold the jit kernels and
their launchers; here ``topopack::attn_fwd`` and ``topopack::attn_bwd`` are
``torch.library.triton_op``s (so torch.compile sees the kernels, no graph break),
joined by ``register_autograd``; ``triton_attention`` validates and dispatches.
The layout's tensors are op arguments, the rules become two bool flags.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.library import triton_op

from topopack.layout import TopoLayout
from topopack.rules import TopoRules

from . import triton_meta as meta, triton_runs_on
from .triton_bwd import attention_bwd
from .triton_fwd import attention_fwd

Tensor = torch.Tensor


def _args(pack_patch_start, pack_patch_count, pack_summary_token, pack_slide, slide_token_start, slide_pack_start,
          patch_sees_summary, global_sees_all):
    lay = meta.LayoutArgs(pack_patch_start, pack_patch_count, pack_summary_token, pack_slide, slide_token_start,
                          slide_pack_start)
    return lay, meta.MaskFlags(patch_sees_summary, global_sees_all)


@triton_op("topopack::attn_fwd", mutates_args={})
def attn_fwd(q: Tensor, k: Tensor, v: Tensor,
             pack_patch_start: Tensor, pack_patch_count: Tensor, pack_summary_token: Tensor, pack_slide: Tensor,
             slide_token_start: Tensor, slide_pack_start: Tensor, pack_size: int, scale: float,
             patch_sees_summary: bool, global_sees_all: bool) -> tuple[Tensor, Tensor]:
    """-> (out [B, H, L, DV], lse [B, H, L] fp32, base 2)."""
    lay, flags = _args(pack_patch_start, pack_patch_count, pack_summary_token, pack_slide, slide_token_start,
                       slide_pack_start, patch_sees_summary, global_sees_all)
    return attention_fwd(q, k, v, lay, scale, flags, pack_size)


@triton_op("topopack::attn_bwd", mutates_args={})
def attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
             pack_patch_start: Tensor, pack_patch_count: Tensor, pack_summary_token: Tensor, pack_slide: Tensor,
             slide_token_start: Tensor, slide_pack_start: Tensor, pack_size: int, scale: float,
             patch_sees_summary: bool, global_sees_all: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv), contiguous."""
    lay, flags = _args(pack_patch_start, pack_patch_count, pack_summary_token, pack_slide, slide_token_start,
                       slide_pack_start, patch_sees_summary, global_sees_all)
    return attention_bwd(do, q, k, v, o, lse, lay, scale, flags, pack_size)


if meta.INTERPRET:
    # Under the interpreter the kernels are not JITFunctions, so the ops' bodies cannot be
    # traced with fake tensors; give torch.compile the shapes directly (CUDA uses the bodies).
    @attn_fwd.register_fake
    def _(q, k, v, *args):
        b, h, n, _ = q.shape
        return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)

    @attn_bwd.register_fake
    def _(do, q, k, v, *args):
        return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, *lay = inputs[:9]
    ctx.save_for_backward(q, k, v, output[0], output[1], *lay)
    ctx.rest = inputs[9:]  # pack_size, scale, flags


def _backward(ctx, d_out, d_lse):
    q, k, v, o, lse, *lay = ctx.saved_tensors
    # lse is an auxiliary output for backward; its gradient is not propagated
    dq, dk, dv = attn_bwd(d_out, q, k, v, o, lse, *lay, *ctx.rest)
    return (dq, dk, dv) + (None,) * (len(lay) + len(ctx.rest))


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(q, k, v, layout: TopoLayout, rules: TopoRules, scale: float | None = None):
    """Topo-pack attention with the Triton kernels: q, k [B, H, L, D], v [B, H, L, DV] -> [B, H, L, DV].

    Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the real kernels,
    interpreted). Elsewhere it falls back to the portable PyTorch path with a warning.
    """
    if not triton_runs_on(q.device):
        warnings.warn(f"triton backend: no Triton on {q.device} (set TRITON_INTERPRET=1 for the CPU interpreter); "
                      "using the portable path", stacklevel=2)
        from .portable import portable_attention
        return portable_attention(q, k, v, layout, rules, scale)
    if q.device.type == "cpu" and not meta.INTERPRET:
        raise RuntimeError("triton backend: CPU tensors need the interpreter, but TRITON_INTERPRET=1 was not set "
                           "when topopack.kernels.triton was first imported; set it before that import")
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"triton backend: {q.dtype} on the CPU interpreter gives wrong results (its tl.dot); "
                         "use float32, or backend='portable' for half precision on the CPU")
    meta.block_d(q.shape[-1]), meta.block_d(v.shape[-1])  # head-dim check with a clear error
    flags = meta.MaskFlags.from_rules(rules)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = attn_fwd(q, k, v, *meta.LayoutArgs.of(layout), layout.pack_size, scale,
                      flags.patch_sees_summary, flags.global_sees_all)
    return out
