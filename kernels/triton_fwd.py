"""Forward Triton kernels of topo-pack attention and their launcher.

Three row kinds, one launch (``_fwd``: its programs are split between the parts by
program id, the long-running ones first), scores in base 2 (s = q.k * scale * log2(e)):

- summary part: SUMMARY_BLOCK_M summary rows; the slide's summaries in a
  FlashAttention loop of SUMMARY_BLOCK_N keys (tl.dot, online softmax), plus each
  row's own patches and global key. Blocks may straddle slides (keys masked by
  slide). Under PAPER the global row sees only itself (o = v_global,
  lse = q.k_global), and the program holding a slide's first pack writes it.
- global part (global_to_all only): the global row sees its whole slide, split
  over NSPLIT key ranges whose partial (max, sum, acc) ``_fwd_merge`` merges
  through their log-sum-exp (the second launch).
- patch part: PATCH_BLOCK_M // K2 consecutive packs per program, their patch
  tokens gathered as one block; block-diagonal scores (same pack) plus the summary
  and global keys as per-row extra columns. Memory-bound, ~k*k keys a row.

Every program seeds its online softmax with the slide's global key, which every
row sees, so a fully masked tile never produces inf - inf.
The stored LSE is base 2: lse = max + log2(sum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs as configs, triton_meta as meta


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


@triton.jit
def _patch_fwd(
    pid, Q, K, V, O, LSE,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start,
    sql, sqd, skl, skd, svl, svd, sol, sod,
    P, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, PREC: tl.constexpr,
):
    """Patch program pid on one (b, h) slice (pointers already moved there)."""
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


@triton.jit
def _summary_fwd(
    pid, Q, K, V, O, LSE,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sol, sod,
    P, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    """Summary program pid on one (b, h) slice; under PAPER also the global rows of its slides' first packs."""
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

    if not GLOBAL_SEES_ALL:  # the global row sees only itself: o = v_global, lse = q.k_global
        gmask = row_ok & (rp == tl.load(slide_pack_start + slide))  # rows holding their slide's first pack
        qg = tl.load(Q + gtok[:, None] * sql + d[None, :] * sqd, mask=gmask[:, None] & (d < HEAD_D)[None, :],
                     other=0.0).to(tl.float32)
        sg = tl.sum(qg * kg, 1) * qk_scale
        og = acc * tl.math.exp2(sg - sg)[:, None]  # v_global; NaN when the logit is (as the softmax)
        tl.store(O + gtok[:, None] * sol + dv[None, :] * sod, og.to(O.dtype.element_ty),
                 mask=gmask[:, None] & (dv < HEAD_DV)[None, :])
        tl.store(LSE + gtok, sg, mask=gmask)

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


@triton.jit
def _global_fwd_split(
    split, s, pid_bh, Q, K, V, PART, slide_token_start,
    sql, sqd, skl, skd, svl, svd, S, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split `split` of slide s's global row (it sees the whole slide): partial (acc, max, sum) into PART."""
    g, lo, hi = _global_range(slide_token_start, s, split, NSPLIT, True)
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
    part = PART + ((pid_bh.to(tl.int64) * S + s) * NSPLIT + split) * (BLOCK_DV + 2)  # [acc, max, sum]
    tl.store(part + dv, acc)
    tl.store(part + BLOCK_DV, m)  # -inf and 0 for an empty split
    tl.store(part + BLOCK_DV + 1, l)


@triton.jit(do_not_specialize=["L", "P", "S"])
def _fwd(
    Q, K, V, O, LSE, PART,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, L, P, S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUMMARY_BLOCK_M: tl.constexpr, SUMMARY_BLOCK_N: tl.constexpr, GLOBAL_BLOCK_N: tl.constexpr,
    PATCH_BLOCK_M: tl.constexpr, NSPLIT: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    """Program axis 0: summary programs, then (global_to_all) S * NSPLIT global splits, then patch programs."""
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    O = _slice(O, pid_bh, H, sob, soh)
    LSE += pid_bh.to(tl.int64) * L
    n_summary = tl.cdiv(P, SUMMARY_BLOCK_M)
    if pid < n_summary:
        _summary_fwd(pid, Q, K, V, O, LSE, pack_start, pack_count, pack_summary, pack_slide, slide_token_start,
                     slide_pack_start, sql, sqd, skl, skd, svl, svd, sol, sod, P, qk_scale,
                     K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, SUMMARY_BLOCK_M, SUMMARY_BLOCK_N, GLOBAL_SEES_ALL, PREC)
    else:
        pid -= n_summary
        if GLOBAL_SEES_ALL:
            if pid < S * NSPLIT:
                _global_fwd_split(pid % NSPLIT, pid // NSPLIT, pid_bh, Q, K, V, PART, slide_token_start,
                                  sql, sqd, skl, skd, svl, svd, S, qk_scale,
                                  HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, NSPLIT, GLOBAL_BLOCK_N)
            else:
                _patch_fwd(pid - S * NSPLIT, Q, K, V, O, LSE, pack_start, pack_count, pack_summary, pack_slide,
                           slide_token_start, sql, sqd, skl, skd, svl, svd, sol, sod, P, qk_scale,
                           K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, PATCH_BLOCK_M, PATCH_SEES_SUMMARY, PREC)
        else:
            _patch_fwd(pid, Q, K, V, O, LSE, pack_start, pack_count, pack_summary, pack_slide,
                       slide_token_start, sql, sqd, skl, skd, svl, svd, sol, sod, P, qk_scale,
                       K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, PATCH_BLOCK_M, PATCH_SEES_SUMMARY, PREC)


@triton.jit(do_not_specialize=["S", "L"])
def _fwd_merge(
    O, LSE, PART, slide_token_start,
    sob, soh, sol, sod, H, S, L,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, NSPLIT: tl.constexpr,
):
    """The global rows under global_to_all: their NSPLIT partials merged through their log-sum-exp."""
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = tl.load(slide_token_start + s)
    part = PART + ((pid_bh.to(tl.int64) * S + s) * NSPLIT + tl.arange(0, NSPLIT)) * (BLOCK_DV + 2)  # [NSPLIT]
    dv = tl.arange(0, BLOCK_DV)
    acc = tl.load(part[:, None] + dv[None, :])  # [NSPLIT, DV]
    m = tl.load(part + BLOCK_DV)
    l = tl.load(part + BLOCK_DV + 1)
    m_all = tl.max(m, 0)  # split 0 is never empty
    w = tl.math.exp2(m - m_all)
    l_all = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / l_all
    tl.store(_slice(O, pid_bh, H, sob, soh) + g * sol + dv * sod, out.to(O.dtype.element_ty), mask=dv < HEAD_DV)
    tl.store(LSE + pid_bh.to(tl.int64) * L + g, m_all + tl.math.log2(l_all))


def launches(flags: meta.MaskFlags) -> tuple[str, ...]:
    """The forward's launches under these rules (config-table names)."""
    return ("fwd", "fwd_merge") if flags.global_sees_all else ("fwd",)


def attention_fwd(q, k, v, lay: meta.LayoutArgs, scale: float, flags: meta.MaskFlags, pack_size: int,
                  autotune: bool = False, cfg: dict | None = None):
    """Launch the forward: q, k [B, H, L, D], v [B, H, L, DV] -> (out [B, H, L, DV], lse [B, H, L] base 2).

    One launch under PAPER, two under global_to_all. cfg: the launches' configs (default: the
    table's for this key, or tuned first when `autotune`).
    """
    if cfg is None:
        cfg = configs.resolve(q, pack_size, launches(flags), flags.global_sees_all, autotune,
                              lambda c: attention_fwd(q, k, v, lay, scale, flags, pack_size, cfg=c))
    b, h, n_tok, d = q.shape
    dv = v.shape[-1]
    p, s = lay.num_packs, lay.num_slides
    k2 = pack_size ** 2
    fwd = dict(cfg["fwd"])
    split_tokens = fwd.pop("SPLIT_TOKENS")
    bd, bdv = meta.block_d(d), meta.block_d(dv)
    o = meta.new_buffer((b, h, n_tok, dv), q.dtype, q.device)
    lse = meta.new_buffer((b, h, n_tok), torch.float32, q.device)
    n_programs = meta.cdiv(p, fwd["SUMMARY_BLOCK_M"]) + meta.cdiv(p, fwd["PATCH_BLOCK_M"] // k2)
    nsplit, part = 1, lse  # PAPER: no global splits
    if flags.global_sees_all:
        nsplit = meta.num_splits(meta.size_bucket(n_tok), split_tokens)
        part = meta.new_buffer((b * h * s * nsplit * (bdv + 2),), torch.float32, q.device)  # [acc, max, sum]
        n_programs += s * nsplit
    meta.launch(_fwd, (n_programs, b * h), fwd,
                q, k, v, o, lse, part, lay.pack_patch_start, lay.pack_patch_count, lay.pack_summary_token,
                lay.pack_slide, lay.slide_token_start, lay.slide_pack_start,
                *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(o),
                h, n_tok, p, s, scale * meta.LOG2E,
                K2=k2, HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, NSPLIT=nsplit,
                PREC=meta.dot_precision(q.dtype), **flags.constexprs())
    if flags.global_sees_all:
        meta.launch(_fwd_merge, (s, b * h), cfg["fwd_merge"],
                    o, lse, part, lay.slide_token_start, *meta.strides(o), h, s, n_tok,
                    HEAD_DV=dv, BLOCK_DV=bdv, NSPLIT=nsplit)
    return o, lse
