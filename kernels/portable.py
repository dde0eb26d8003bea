"""Portable sparse topo-pack attention in plain PyTorch: any device, autograd, no L x L.

Each query kind attends to a few key groups (topopack.rules.key_groups):
- pack-local groups (its pack's patches, its pack's summary, its slide's global)
  are gathered per pack into [P, k*k + 2] key sets and run as a batched attention;
- slide-wide groups (all summaries, or the whole slide for the global row) run as
  dense attention per slide, in row chunks that are recomputed in backward.
Pieces of one row are merged exactly through their log-sum-exp.
Memory is O(L * k^2) plus one chunk of the summary x summary block.

Output in the input dtype; v may have its own head dim; double backward is exact.
torch.compile: the slide loop reads the layout's slide sizes on the host
(``_host_sizes``, excluded from compilation), so ``fullgraph=True`` fails with
torch._dynamo's Unsupported error naming ``_host_sizes``; without fullgraph the
graph breaks there and the result is exact. The triton backend compiles as one graph.
"""
from __future__ import annotations

import math

import torch

from topopack.layout import TopoLayout
from topopack.rules import GLOBAL, PATCH, SUMMARY, KeyGroup, TopoRules, sparse_key_groups

# score elements per dense chunk (B * H * rows * keys); bounds the chunk's memory
CHUNK_SCORES = 1 << 25


def attend(q, k, v, mask=None):
    """Softmax attention of pre-scaled q on k, v; returns (out, lse), lse at least fp32. mask broadcasts to scores.

    Every row must have at least one key (every topo-pack row sees its global token).
    """
    scores = q @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    m = scores.amax(-1, keepdim=True).detach()  # out and lse do not depend on the shift
    e = torch.exp(scores - m)
    s = e.sum(-1, keepdim=True)
    acc = torch.promote_types(s.dtype, torch.float32)
    return (e @ v) / s, (m.to(acc) + torch.log(s.to(acc)))[..., 0]


def merge(pieces):
    """Exact merge of attention pieces over disjoint key sets: [(out, lse), ...] -> out, in the pieces' dtype."""
    if len(pieces) == 1:
        return pieces[0][0]
    lse = torch.logsumexp(torch.stack([l for _, l in pieces]), dim=0)
    return sum(o * torch.exp(l - lse)[..., None] for o, l in pieces).to(pieces[0][0].dtype)


def _row_chunk(q, k) -> int:
    return max(1, CHUNK_SCORES // max(1, q.shape[0] * q.shape[1] * k.shape[-2]))


class _DenseAttention(torch.autograd.Function):
    """Dense attention returning (out, lse) with O(chunk * keys) memory.

    Forward uses PyTorch's fused flash kernel on the CPU (it returns the lse; it needs
    one head dim for q and v) and chunked attend() elsewhere. Backward recomputes each
    row chunk under autograd, with a graph under create_graph, so double backward is exact.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        if q.device.type == "cpu" and q.shape[-1] == v.shape[-1]:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=1.0)
        step = _row_chunk(q, k)
        pieces = [attend(q[..., r:r + step, :], k, v) for r in range(0, q.shape[-2], step)]
        return torch.cat([o for o, _ in pieces], -2), torch.cat([l for _, l in pieces], -1)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        dq, dk, dv = [], 0, 0
        step = _row_chunk(q, k)
        for r in range(0, q.shape[-2], step):
            with torch.enable_grad():
                qc, kc, vc = (t if create_graph and t.requires_grad else t.detach().requires_grad_()
                              for t in (q[..., r:r + step, :], k, v))
                o, l = attend(qc, kc, vc)
                grads = torch.autograd.grad(
                    (o, l), (qc, kc, vc),
                    (torch.zeros_like(o) if d_out is None else d_out[..., r:r + step, :].to(o.dtype),
                     torch.zeros_like(l) if d_lse is None else d_lse[..., r:r + step].to(l.dtype)),
                    create_graph=create_graph)
            dq.append(grads[0])
            dk = dk + grads[1]
            dv = dv + grads[2]
        return torch.cat(dq, -2), dk, dv


def _local_keys(k, v, layout: TopoLayout, slots):
    """Per pack: its patches' keys, then its summary, then its slide's global -> [B, H, P, k*k+2, D]."""
    b, h, _, d = k.shape
    p, k2 = slots.shape
    idx = torch.cat([slots.clamp_min(0), layout.pack_summary_token[:, None],
                     layout.slide_global_token[layout.pack_slide][:, None]], 1).reshape(-1)
    kl = k[:, :, idx].reshape(b, h, p, k2 + 2, k.shape[-1])
    vl = v[:, :, idx].reshape(b, h, p, k2 + 2, v.shape[-1])
    return kl, vl


def _local_mask(valid_slots, sees_summary: bool):
    """[P, k*k+2] which local keys a row sees: its pack's patches, maybe its pack's summary, its global."""
    col = lambda on: torch.full((valid_slots.shape[0], 1), on, device=valid_slots.device)
    return torch.cat([valid_slots, col(sees_summary), col(True)], 1)


@torch.compiler.disable
def _host_sizes(layout: TopoLayout):
    """(one full slide?, (first pack, packs) per slide, (first token, tokens) per slide), read on the host."""
    full = layout.num_slides == 1 and bool((layout.pack_patch_count == layout.pack_size ** 2).all())
    packs = layout.slide_pack_start.tolist()
    tokens = layout.slide_token_start.tolist()
    return (full, [(a, b - a) for a, b in zip(packs, packs[1:])], [(a, b - a) for a, b in zip(tokens, tokens[1:])])


def portable_attention(q, k, v, layout: TopoLayout, rules: TopoRules, scale: float | None = None):
    """Topo-pack attention, q, k [B, H, L, D], v [B, H, L, Dv] in token order -> [B, H, L, Dv] in q's dtype.

    torch.compile(fullgraph=True) fails at _host_sizes (see the module docstring).
    """
    groups = sparse_key_groups(rules, "portable")
    b, h, n_tok, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q * scale  # [B, H, L, D]; gathers below use advanced indexing, faster than index_select here
    slots = layout.pack_slots()  # [P, K2]
    valid = slots >= 0
    p, k2 = slots.shape
    kl, vl = _local_keys(k, v, layout, slots)  # [B, H, P, K2+2, D]
    full, slide_packs, slide_tokens = _host_sizes(layout)

    # patch rows: everything they see is pack-local
    qp = q[..., 1 + p:, :] if full else q[:, :, slots.clamp_min(0).reshape(-1)]
    mask = _local_mask(valid, KeyGroup.PACK_SUMMARY in groups[PATCH])[:, None, :]  # [P, 1, K2+2]
    op, _ = attend(qp.reshape(b, h, p, k2, d), kl, vl, mask)  # [B, H, P, K2, Dv]

    # summary rows: their pack's patches and global, plus every summary of the slide (itself included)
    qs = q[:, :, layout.pack_summary_token]  # [B, H, P, D]
    ol, ll = attend(qs[..., None, :], kl, vl, _local_mask(valid, False)[:, None, :])
    ks, vs = k[:, :, layout.pack_summary_token], v[:, :, layout.pack_summary_token]
    per_slide = [_DenseAttention.apply(qs[..., a:a + n, :], ks[..., a:a + n, :], vs[..., a:a + n, :])
                 for a, n in slide_packs]
    os_ = merge([(ol[..., 0, :], ll[..., 0]),
                 (torch.cat([o for o, _ in per_slide], -2), torch.cat([l for _, l in per_slide], -1))])

    # global rows: the whole slide, or only themselves (through attend, so that a NaN q stays NaN)
    if KeyGroup.SLIDE_ALL in groups[GLOBAL]:
        og = torch.cat([attend(q[..., t0:t0 + 1, :], k[..., t0:t0 + n, :], v[..., t0:t0 + n, :])[0]
                        for t0, n in slide_tokens], -2)
    else:
        g = layout.slide_global_token
        og = attend(q[:, :, g, None, :], k[:, :, g, None, :], v[:, :, g, None, :])[0][..., 0, :]

    # [globals, summaries, pack slots] -> token order
    out = torch.cat([og, os_, op.reshape(b, h, p * k2, -1)], 2)
    return out if full else out[:, :, _token_source(layout)]


def _token_source(layout: TopoLayout) -> torch.Tensor:
    """For each token, its row in the concatenation [globals (S), summaries (P), pack slots (P*k*k)]."""
    s, p, k2 = layout.num_slides, layout.num_packs, layout.pack_size ** 2
    kind, pack = layout.token_kind, layout.token_pack.clamp_min(0)
    t = torch.arange(layout.num_tokens, device=layout.device)
    slot = t - layout.pack_patch_start[pack]
    return torch.where(kind == GLOBAL, layout.token_slide,
                       torch.where(kind == SUMMARY, s + pack, s + p + pack * k2 + slot))
