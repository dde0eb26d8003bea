"""Triton topo-pack attention: autograd, torch.library ops for torch.compile, and the public function.

Layers (fla-org style): ``triton_fwd`` / ``triton_bwd`` hold the jit kernels and their
launchers; eager calls reach them through ``_Attention`` (autograd.Function: no custom-op
dispatch, no wrap_triton, the kernels launched directly); under torch.compile
``topopack::attn_fwd`` / ``topopack::attn_bwd`` (``torch.library.triton_op``s joined by
``register_autograd``) wrap the same launchers, whose launches then go through
wrap_triton, so the kernels are traced into the graph (no graph break).
``triton_attention`` validates and dispatches.
The layout's tensors are arguments, the rules become two bool flags.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch.library import triton_op

from topopack.layout import TopoLayout
from topopack.rules import TopoRules

from . import triton_configs as configs, triton_meta as meta, triton_runs_on
from .triton_bwd import attention_bwd
from .triton_fwd import attention_fwd

Tensor = torch.Tensor


@triton_op("topopack::attn_fwd", mutates_args={})
def attn_fwd(q: Tensor, k: Tensor, v: Tensor,
             pack_patch_start: Tensor, pack_patch_count: Tensor, pack_summary_token: Tensor,
             slide_token_start: Tensor, slide_pack_start: Tensor, pack_size: int, scale: float,
             patch_sees_summary: bool, global_sees_all: bool, autotune: bool) -> tuple[Tensor, Tensor]:
    """-> (out [B, H, L, DV], lse [B, H, L] fp32, base 2)."""
    lay = meta.LayoutArgs(pack_patch_start, pack_patch_count, pack_summary_token, slide_token_start, slide_pack_start)
    return attention_fwd(q, k, v, lay, scale, meta.MaskFlags(patch_sees_summary, global_sees_all), pack_size,
                         autotune)


@triton_op("topopack::attn_bwd", mutates_args={})
def attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
             pack_patch_start: Tensor, pack_patch_count: Tensor, pack_summary_token: Tensor,
             slide_token_start: Tensor, slide_pack_start: Tensor, pack_size: int, scale: float,
             patch_sees_summary: bool, global_sees_all: bool, autotune: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv), contiguous."""
    lay = meta.LayoutArgs(pack_patch_start, pack_patch_count, pack_summary_token, slide_token_start, slide_pack_start)
    return attention_bwd(do, q, k, v, o, lse, lay, scale, meta.MaskFlags(patch_sees_summary, global_sees_all),
                         pack_size, autotune)


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


N_LAYOUT = len(meta.LayoutArgs._fields)


def _setup_context(ctx, inputs, output):
    q, k, v, *lay = inputs[:3 + N_LAYOUT]
    ctx.save_for_backward(q, k, v, output[0], output[1], *lay)
    ctx.rest = inputs[3 + N_LAYOUT:]  # pack_size, scale, flags, autotune


def _backward(ctx, d_out, d_lse):
    q, k, v, o, lse, *lay = ctx.saved_tensors
    # lse is an auxiliary output for backward; its gradient is not propagated
    dq, dk, dv = attn_bwd(d_out, q, k, v, o, lse, *lay, *ctx.rest)
    return (dq, dk, dv) + (None,) * (len(lay) + len(ctx.rest))


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """Eager calls: the launchers directly, without the ops' dispatch (~50 us a call on the host).

    args: the layout tensors (meta.LayoutArgs), then pack_size, scale, patch_sees_summary, global_sees_all, autotune.
    """

    @staticmethod
    def forward(ctx, q, k, v, *args):
        lay, (pack_size, scale, patch_sees_summary, global_sees_all, autotune) = args[:N_LAYOUT], args[N_LAYOUT:]
        o, lse = attention_fwd(q, k, v, meta.LayoutArgs(*lay), scale,
                               meta.MaskFlags(patch_sees_summary, global_sees_all), pack_size, autotune)
        ctx.save_for_backward(q, k, v, o, lse, *lay)
        ctx.args = args[N_LAYOUT:]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *lay = ctx.saved_tensors
        pack_size, scale, patch_sees_summary, global_sees_all, autotune = ctx.args
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, meta.LayoutArgs(*lay), scale,
                                   meta.MaskFlags(patch_sees_summary, global_sees_all), pack_size, autotune)
        if torch.is_grad_enabled():  # create_graph=True: differentiating these grads must fail, as through attn_bwd
            dq, dk, dv = _NotDifferentiable.apply(dq, dk, dv, do, q, k, v)
        return (dq, dk, dv) + (None,) * (len(lay) + len(ctx.args))


class _NotDifferentiable(torch.autograd.Function):
    """(dq, dk, dv) joined to the backward's inputs by a node that refuses a second derivative."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *inputs):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("triton backend: its gradients are not differentiable (no double backward); "
                           "use backend='portable' for higher derivatives")


def triton_attention(q, k, v, layout: TopoLayout, rules: TopoRules, scale: float | None = None, *,
                     autotune: bool | None = None):
    """Topo-pack attention with the Triton kernels: q, k [B, H, L, D], v [B, H, L, DV] -> [B, H, L, DV].

    Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the real kernels,
    interpreted). Elsewhere it falls back to the portable PyTorch path with a warning.
    Launch configs come from the committed table (kernels/triton_configs.json); `autotune`
    (default: TOPOPACK_TRITON_AUTOTUNE=1) times the candidates first, once per key.
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
    flags = meta.MaskFlags.from_rules(rules) if torch.compiler.is_compiling() else meta.MaskFlags.of(rules)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (*meta.LayoutArgs.of(layout), layout.pack_size, scale, flags.patch_sees_summary, flags.global_sees_all,
            configs.autotune_requested(autotune))
    if torch.compiler.is_compiling():  # dynamo cannot trace an autograd.Function given one tensor twice (q is k)
        return attn_fwd(q, k, v, *args)[0]
    return _Attention.apply(q, k, v, *args)
