"""Forward Triton kernels of topo-pack attention and their launcher.

Three row kinds, three kernels (scores in base 2: s = q.k * scale * log2(e)):

- ``_patch_fwd``: PACKS consecutive packs per program, their patch tokens
  gathered as one [BLOCK_M, D] block; block-diagonal scores (same pack) plus the
  summary and global keys as per-row extra columns. Memory-bound, ~k*k keys a row.
- ``_summary_fwd``: BLOCK_M summary rows; the slide's summaries in a
  FlashAttention loop of BLOCK_N keys (tl.dot, online softmax), plus each row's
  own patches and global key. Blocks may straddle slides (keys masked by slide).
- ``_global_fwd_split`` + ``_global_fwd_merge``: the global row (under
  global_to_all it sees its whole slide) is split over NSPLIT key ranges whose
  partial (max, sum, acc) are merged through their log-sum-exp.

Every program seeds its online softmax with the slide's global key, which every
row sees, so a fully masked tile never produces inf - inf.
The stored LSE is base 2: lse = max + log2(sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import triton_meta as meta


@triton.jit
def _slice(X, pid_bh, H, stride_b, stride_h):
    """X moved to the (batch, head) slice of program axis pid_bh = b * H + h."""
    return X + (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h


@triton.jit
def _patch_rows(pid, pack_start, pack_count, pack_slide, slide_token_start, P,
                K2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of patch program pid: slot r % K2 of pack pid * (BLOCK_M // K2) + r // K2.

    Returns (pack, row_ok, token, the global token of the row's slide), each [BLOCK_M].
    """
    PACKS: tl.constexpr = BLOCK_M // K2
    r = tl.arange(0, BLOCK_M)
    pk = pid * PACKS + r // K2
    row_ok = (r < PACKS * K2) & (pk < P)
    pk = tl.where(row_ok, pk, 0)
    cnt = tl.load(pack_count + pk, mask=row_ok, other=0)
    row_ok = row_ok & ((r % K2) < cnt)
    tok = tl.load(pack_start + pk, mask=row_ok, other=0) + r % K2
    gtok = tl.load(slide_token_start + tl.load(pack_slide + pk, mask=row_ok, other=0), mask=row_ok, other=0)
    return pk, row_ok, tok, gtok


@triton.jit
def _summary_tile(A, B, start, hi, P, pack_summary, pack_slide, sal, sad, sbl, sbd,
                  HEAD_A: tl.constexpr, HEAD_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK: tl.constexpr):
    """The summary tokens of packs start .. start+BLOCK-1 (those < hi), with their rows of A and B.

    Returns (token, slide, ok) [BLOCK] and A rows [BLOCK, BLOCK_A], B rows [BLOCK, BLOCK_B] (zeros where not ok).
    """
    p = start + tl.arange(0, BLOCK)
    ok = p < hi
    p = tl.where(ok, p, P - 1)
    tok = tl.load(pack_summary + p)
    slide = tl.load(pack_slide + p)
    ca = tl.arange(0, BLOCK_A)
    cb = tl.arange(0, BLOCK_B)
    a = tl.load(A + tok[:, None] * sal + ca[None, :] * sad, mask=ok[:, None] & (ca < HEAD_A)[None, :], other=0.0)
    b = tl.load(B + tok[:, None] * sbl + cb[None, :] * sbd, mask=ok[:, None] & (cb < HEAD_B)[None, :], other=0.0)
    return tok, slide, ok, a, b


@triton.jit
def _merge_row_key(m, l, acc, s, v):
    """Online softmax step with one key per row: s [M], v [M, DV] (fp32)."""
    m_new = tl.maximum(m, s)
    alpha = tl.math.exp2(m - m_new)
    p = tl.math.exp2(s - m_new)
    return m_new, l * alpha + p, acc * alpha[:, None] + p[:, None] * v


@triton.jit
def _merge_key_block(m, l, acc, s, v, PREC: tl.constexpr):
    """Online softmax step with a key tile: s [M, N] (masked keys -inf), v [N, DV]."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.math.exp2(m - m_new)
    p = tl.math.exp2(s - m_new[:, None])  # [M, N]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.autotune(
    configs=meta.configs(({"BLOCK_M": 32}, 4, 2), ({"BLOCK_M": 32}, 2, 2), ({"BLOCK_M": 64}, 4, 2),
                         ({"BLOCK_M": 16}, 2, 2)),
    key=["K2", "HEAD_D", "HEAD_DV", "SIZE_BUCKET"],
)
@triton.jit(do_not_specialize=["P", "L", "SIZE_BUCKET"])
def _patch_fwd(
    Q, K, V, O, LSE,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, L, P, qk_scale, SIZE_BUCKET,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr,
    PREC: tl.constexpr,
):
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    O = _slice(O, pid_bh, H, sob, soh)
    LSE += pid_bh.to(tl.int64) * L

    pk, row_ok, tok, gtok = _patch_rows(pid, pack_start, pack_count, pack_slide, slide_token_start, P, K2, BLOCK_M)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    qmask = row_ok[:, None] & (d < HEAD_D)[None, :]
    vmask = row_ok[:, None] & (dv < HEAD_DV)[None, :]
    q = tl.load(Q + tok[:, None] * sql + d[None, :] * sqd, mask=qmask, other=0.0)  # [BLOCK_M, D]
    qf = q.to(tl.float32)

    # the slide's global key seeds the softmax
    kg = tl.load(K + gtok[:, None] * skl + d[None, :] * skd, mask=qmask, other=0.0).to(tl.float32)
    m = tl.sum(qf * kg, 1) * qk_scale  # [BLOCK_M]
    l = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.load(V + gtok[:, None] * svl + dv[None, :] * svd, mask=vmask, other=0.0).to(tl.float32)

    if PATCH_SEES_SUMMARY:
        stok = tl.load(pack_summary + pk, mask=row_ok, other=0)
        ks = tl.load(K + stok[:, None] * skl + d[None, :] * skd, mask=qmask, other=0.0).to(tl.float32)
        vs = tl.load(V + stok[:, None] * svl + dv[None, :] * svd, mask=vmask, other=0.0).to(tl.float32)
        m, l, acc = _merge_row_key(m, l, acc, tl.sum(qf * ks, 1) * qk_scale, vs)

    k = tl.load(K + tok[:, None] * skl + d[None, :] * skd, mask=qmask, other=0.0)  # [BLOCK_M, D]
    v = tl.load(V + tok[:, None] * svl + dv[None, :] * svd, mask=vmask, other=0.0)  # [BLOCK_M, DV]
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_M]
    same_pack = (pk[:, None] == pk[None, :]) & row_ok[None, :]
    s = tl.where(same_pack, s, float("-inf"))
    m, l, acc = _merge_key_block(m, l, acc, s, v, PREC)

    acc = acc / l[:, None]
    tl.store(O + tok[:, None] * sol + dv[None, :] * sod, acc.to(O.dtype.element_ty), mask=vmask)
    tl.store(LSE + tok, m + tl.math.log2(l), mask=row_ok)


@triton.autotune(
    configs=meta.configs(({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3), ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),
                         ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2), ({"BLOCK_M": 128, "BLOCK_N": 32}, 4, 3),
                         interpret={"BLOCK_M": 32, "BLOCK_N": 32}),
    key=["K2", "HEAD_D", "HEAD_DV", "SIZE_BUCKET"],
)
@triton.jit(do_not_specialize=["P", "L", "SIZE_BUCKET"])
def _summary_fwd(
    Q, K, V, O, LSE,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, L, P, qk_scale, SIZE_BUCKET,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    O = _slice(O, pid_bh, H, sob, soh)
    LSE += pid_bh.to(tl.int64) * L

    # rows: the summaries of packs pid * BLOCK_M ...
    first = pid * BLOCK_M
    rp = first + tl.arange(0, BLOCK_M)  # [BLOCK_M] pack ids
    row_ok = rp < P
    rp = tl.where(row_ok, rp, P - 1)
    slide = tl.load(pack_slide + rp)
    tok = tl.load(pack_summary + rp)
    gtok = tl.load(slide_token_start + slide)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    qmask = row_ok[:, None] & (d < HEAD_D)[None, :]
    vmask = row_ok[:, None] & (dv < HEAD_DV)[None, :]
    q = tl.load(Q + tok[:, None] * sql + d[None, :] * sqd, mask=qmask, other=0.0)  # [BLOCK_M, D]
    qf = q.to(tl.float32)

    kg = tl.load(K + gtok[:, None] * skl + d[None, :] * skd, mask=qmask, other=0.0).to(tl.float32)
    m = tl.sum(qf * kg, 1) * qk_scale
    l = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.load(V + gtok[:, None] * svl + dv[None, :] * svd, mask=vmask, other=0.0).to(tl.float32)

    # the pack's own patches, one slot at a time
    pstart = tl.load(pack_start + rp)
    pcnt = tl.load(pack_count + rp)
    for j in range(K2):  # not unrolled: keeps compile time down
        ok = row_ok & (j < pcnt)
        kt = pstart + j
        kj = tl.load(K + kt[:, None] * skl + d[None, :] * skd, mask=ok[:, None] & (d < HEAD_D)[None, :],
                     other=0.0).to(tl.float32)
        vj = tl.load(V + kt[:, None] * svl + dv[None, :] * svd, mask=ok[:, None] & (dv < HEAD_DV)[None, :],
                     other=0.0).to(tl.float32)
        sj = tl.where(ok, tl.sum(qf * kj, 1) * qk_scale, float("-inf"))
        m, l, acc = _merge_row_key(m, l, acc, sj, vj)

    # every summary of the row's slide, BLOCK_N at a time
    last = tl.minimum(first + BLOCK_M, P) - 1
    lo = tl.load(slide_pack_start + tl.load(pack_slide + first))
    hi = tl.load(slide_pack_start + tl.load(pack_slide + last) + 1)
    for n0 in range(lo, hi, BLOCK_N):
        ktok, kslide, kok, k, v = _summary_tile(K, V, n0, hi, P, pack_summary, pack_slide, skl, skd, svl, svd,
                                                HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N)  # k [BLOCK_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where((slide[:, None] == kslide[None, :]) & kok[None, :], s, float("-inf"))
        m, l, acc = _merge_key_block(m, l, acc, s, v, PREC)

    acc = acc / l[:, None]
    tl.store(O + tok[:, None] * sol + dv[None, :] * sod, acc.to(O.dtype.element_ty), mask=vmask)
    tl.store(LSE + tok, m + tl.math.log2(l), mask=row_ok)


@triton.jit
def _global_range(slide_token_start, s, split, NSPLIT: tl.constexpr, SEES_ALL: tl.constexpr):
    """The global token of slide s and split `split` of the tokens its row attends to."""
    t0 = tl.load(slide_token_start + s)
    t1 = tl.load(slide_token_start + s + 1)
    if not SEES_ALL:
        t1 = t0 + 1
    chunk = (t1 - t0 + NSPLIT - 1) // NSPLIT
    lo = t0 + split * chunk
    hi = tl.minimum(lo + chunk, t1)
    return t0, lo, hi


@triton.autotune(
    configs=meta.configs(({"BLOCK_N": 64}, 4, 2), ({"BLOCK_N": 128}, 4, 2)),
    key=["HEAD_D", "HEAD_DV", "NSPLIT"],
)
@triton.jit(do_not_specialize=["S"])
def _global_fwd_split(
    Q, K, V, M_PART, L_PART, ACC_PART, slide_token_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    H, S, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr,
):
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    split = tl.program_id(0)
    s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    g, lo, hi = _global_range(slide_token_start, s, split, NSPLIT, GLOBAL_SEES_ALL)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + g * sql + d * sqd, mask=d < HEAD_D, other=0.0).to(tl.float32)  # [D]
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):  # a non-empty tile each time: m turns finite at once
        t = n0 + tl.arange(0, BLOCK_N)
        ok = t < hi
        k = tl.load(K + t[:, None] * skl + d[None, :] * skd, mask=ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
        v = tl.load(V + t[:, None] * svl + dv[None, :] * svd, mask=ok[:, None] & (dv < HEAD_DV)[None, :], other=0.0)
        sc = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale, float("-inf"))  # [BLOCK_N]
        m_new = tl.maximum(m, tl.max(sc, 0))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(sc - m_new)
        l = l * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = m_new
    part = (pid_bh.to(tl.int64) * S + s) * NSPLIT + split
    tl.store(M_PART + part, m)  # -inf and 0 for an empty split
    tl.store(L_PART + part, l)
    tl.store(ACC_PART + part * BLOCK_DV + dv, acc)


@triton.jit(do_not_specialize=["S", "L"])
def _global_fwd_merge(
    O, LSE, M_PART, L_PART, ACC_PART, slide_token_start,
    sob, soh, sol, sod, H, S, L,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, NSPLIT: tl.constexpr,
):
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = tl.load(slide_token_start + s)
    part = (pid_bh.to(tl.int64) * S + s) * NSPLIT + tl.arange(0, NSPLIT)  # [NSPLIT]
    dv = tl.arange(0, BLOCK_DV)
    m = tl.load(M_PART + part)
    l = tl.load(L_PART + part)
    acc = tl.load(ACC_PART + part[:, None] * BLOCK_DV + dv[None, :])  # [NSPLIT, DV]
    m_all = tl.max(m, 0)  # split 0 is never empty
    w = tl.math.exp2(m - m_all)
    l_all = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / l_all
    tl.store(_slice(O, pid_bh, H, sob, soh) + g * sol + dv * sod, out.to(O.dtype.element_ty), mask=dv < HEAD_DV)
    tl.store(LSE + pid_bh.to(tl.int64) * L + g, m_all + tl.math.log2(l_all))


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def attention_fwd(q, k, v, lay: meta.LayoutArgs, scale: float, flags: meta.MaskFlags, pack_size: int):
    """Launch the forward kernels: q, k [B, H, L, D], v [B, H, L, DV] -> (out [B, H, L, DV], lse [B, H, L] base 2)."""
    b, h, n_tok, d = q.shape
    dv = v.shape[-1]
    p, s = lay.num_packs, lay.num_slides
    o = meta.new_buffer((b, h, n_tok, dv), q.dtype, q.device)
    lse = meta.new_buffer((b, h, n_tok), torch.float32, q.device)
    qk_scale = scale * 1.4426950408889634  # log2(e)
    dims = dict(HEAD_D=d, HEAD_DV=dv, BLOCK_D=meta.block_d(d), BLOCK_DV=meta.block_d(dv))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    common = dict(K2=pack_size ** 2, PREC=meta.dot_precision(q.dtype), **dims)
    sizes = (h, n_tok, p, qk_scale, meta.size_bucket(p))

    wrap_triton(_patch_fwd)[lambda c: (triton.cdiv(p, c["BLOCK_M"] // (pack_size ** 2)), b * h)](
        q, k, v, o, lse, lay.pack_patch_start, lay.pack_patch_count, lay.pack_summary_token, lay.pack_slide,
        lay.slide_token_start, *strides, *sizes, **common,
        **flags.constexprs("PATCH_SEES_SUMMARY"))
    wrap_triton(_summary_fwd)[lambda c: (triton.cdiv(p, c["BLOCK_M"]), b * h)](
        q, k, v, o, lse, lay.pack_patch_start, lay.pack_patch_count, lay.pack_summary_token, lay.pack_slide,
        lay.slide_token_start, lay.slide_pack_start, *strides, *sizes, **common)

    nsplit = meta.num_splits(n_tok) if flags.global_sees_all else 1
    m_part = meta.new_buffer((b * h * s * nsplit,), torch.float32, q.device)
    l_part = meta.new_buffer((b * h * s * nsplit,), torch.float32, q.device)
    acc_part = meta.new_buffer((b * h * s * nsplit, dims["BLOCK_DV"]), torch.float32, q.device)
    wrap_triton(_global_fwd_split)[(nsplit, s, b * h)](
        q, k, v, m_part, l_part, acc_part, lay.slide_token_start, *strides[:12], h, s, qk_scale,
        NSPLIT=nsplit, GLOBAL_SEES_ALL=flags.global_sees_all, **dims)
    wrap_triton(_global_fwd_merge)[(s, b * h)](
        o, lse, m_part, l_part, acc_part, lay.slide_token_start, *_strides(o), h, s, n_tok,
        HEAD_DV=dv, BLOCK_DV=dims["BLOCK_DV"], NSPLIT=nsplit)
    return o, lse
