"""Forward Triton kernels of topo-pack attention and their launcher.

Three row kinds, one launch (``_fwd``: its programs are split between the parts by
program id, the long-running ones first), scores in base 2 (s = q.k * scale * log2(e)):

- summary part: SUMMARY_BLOCK_M consecutive summary rows of one slide (row blocks never
  straddle slides, see ``_slide_block``), so rows and keys are contiguous tokens: a
  FlashAttention loop over the slide's summaries in SUMMARY_BLOCK_N key tiles, unmasked
  except the last, plus each row's own patches and the global key. Under PAPER the
  global row sees only itself (o = v_global, lse = q.k_global): the slide's first
  summary program writes it.
- patch part: PATCH_BLOCK_M // K2 consecutive packs of one slide per program, their
  patch tokens gathered as one block (K2 slots a pack); block-diagonal scores (same
  pack) plus the summary and global keys as per-row extra columns. Memory-bound,
  ~k*k keys a row.
- global_to_all: the global row sees its whole slide. Each summary and patch program
  also scores the global query against its own block's tokens as keys (already loaded
  or contiguous) and stores a partial (max, sum, acc); ``_fwd_merge`` (the second
  launch) merges a slide's partials in a fixed order with the global row's own term.
  Nothing re-reads the slide's keys for the global row.

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
def _slide_block(pid, slide_pack_start, S, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program pid of a part whose blocks of BLOCK packs never straddle slides.

    Block j of slide s is program slide_pack_start[s] // BLOCK + s + j: one-to-one, and every
    program is below P // BLOCK + S (meta.slide_blocks), so the host needs no table and no sync.
    Returns (s, first pack, packs in the block (<= 0: an idle program), the slide's pack range lo, hi).
    """
    s = 0
    for c0 in range(1, S, CHUNK):  # s = how many slides s' >= 1 start at or before pid
        c = c0 + tl.arange(0, CHUNK)
        start = tl.load(slide_pack_start + c, mask=c < S, other=0)
        s += tl.sum(((c < S) & (start // BLOCK + c <= pid)).to(tl.int32), 0)
    lo = tl.load(slide_pack_start + s)
    hi = tl.load(slide_pack_start + s + 1)
    first = lo + (pid - lo // BLOCK - s) * BLOCK
    return s, first, tl.minimum(hi - first, BLOCK), lo, hi


@triton.jit
def _rows(X, tok, sl, sd, ok, HEAD: tl.constexpr, BLOCK: tl.constexpr, MASK_ROWS: tl.constexpr = True):
    """Rows tok of one (b, h) slice of X: [M, BLOCK] in X's dtype, zero where not ok and in the pad columns.

    A full head dim and MASK_ROWS=False load without a mask (vectorised along the head dim).
    """
    c = tl.arange(0, BLOCK)
    ptr = X + tok[:, None] * sl + c[None, :] * sd
    if HEAD == BLOCK:
        if MASK_ROWS:
            x = tl.load(ptr, mask=ok[:, None], other=0.0)
        else:
            x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=ok[:, None] & (c < HEAD)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(X, tok, sl, sd, x, ok, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.arange(0, BLOCK)
    ptr = X + tok[:, None] * sl + c[None, :] * sd
    if HEAD == BLOCK:
        tl.store(ptr, x.to(X.dtype.element_ty), mask=ok[:, None])
    else:
        tl.store(ptr, x.to(X.dtype.element_ty), mask=ok[:, None] & (c < HEAD)[None, :])


@triton.jit
def _vec(X, t, sl, sd, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row t of one (b, h) slice of X as fp32 [BLOCK] (zero pad)."""
    c = tl.arange(0, BLOCK)
    return tl.load(X + t * sl + c * sd, mask=c < HEAD, other=0.0).to(tl.float32)


@triton.jit
def _patch_rows(first, count, pack_start, pack_count, K2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of the packs first .. first+count-1: slot r % K2 of pack first + r // K2.

    Returns (pack, slot, row_ok, token), each [BLOCK_M]; pack is clamped to a real pack.
    """
    r = tl.arange(0, BLOCK_M)
    local = r // K2
    slot = r % K2
    row_ok = local < count
    pk = tl.where(row_ok, first + local, first)
    row_ok = row_ok & (slot < tl.load(pack_count + pk))
    tok = tl.load(pack_start + pk) + slot
    return pk, slot, row_ok, tok


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
def _global_partial(PART, qg, kf, vf, ok, qk_scale, BLOCK_DV: tl.constexpr):
    """The global query qg [D] on keys kf [M, D] (values vf [M, DV], fp32; some ok): (acc, max, sum) into PART."""
    s = tl.where(ok, tl.sum(kf * qg[None, :], 1) * qk_scale, float("-inf"))  # [M]
    m = tl.max(s, 0)
    p = tl.math.exp2(s - tl.where(m == float("-inf"), 0.0, m))  # all -inf: p = 0, not NaN
    tl.store(PART + tl.arange(0, BLOCK_DV), tl.sum(p[:, None] * vf, 0))
    tl.store(PART + BLOCK_DV, m)
    tl.store(PART + BLOCK_DV + 1, tl.sum(p, 0))


@triton.jit
def _summary_keys(q, m, l, acc, K, V, kt, n_ok, skl, skd, svl, svd, qk_scale,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  MASKED: tl.constexpr, SCALE_POSITIVE: tl.constexpr, PREC: tl.constexpr):
    """One tile of summary keys kt [N] (the first n_ok real when MASKED) into the online softmax.

    With a positive scale it is applied inside exp2's argument (one FMA a score), the row max of
    the scaled scores being the scaled max of the raw ones; otherwise the scores are scaled first.
    """
    kok = tl.arange(0, kt.shape[0]) < n_ok
    k = _rows(K, kt, skl, skd, kok, HEAD_D, BLOCK_D, MASKED)  # [BLOCK_N, D]
    v = _rows(V, kt, svl, svd, kok, HEAD_DV, BLOCK_DV, MASKED)  # [BLOCK_N, DV]
    s = tl.dot(q, tl.trans(k), input_precision=PREC)  # [BLOCK_M, BLOCK_N], unscaled
    if not SCALE_POSITIVE:
        s = s * qk_scale
    if MASKED:
        s = tl.where(kok[None, :], s, float("-inf"))
    if SCALE_POSITIVE:
        m_new = tl.maximum(m, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # [BLOCK_M, BLOCK_N]
    else:
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _patch_fwd(
    pid, Q, K, V, O, LSE, PART,
    pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sol, sod,
    S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    """Patch program pid on one (b, h) slice (pointers already moved there)."""
    slide, first, count, lo, hi = _slide_block(pid, slide_pack_start, S, BLOCK_M // K2, CHUNK)
    if count > 0:
        pk, slot, row_ok, tok = _patch_rows(first, count, pack_start, pack_count, K2, BLOCK_M)
        g = tl.load(slide_token_start + slide)
        q = _rows(Q, tok, sql, sqd, row_ok, HEAD_D, BLOCK_D)  # [BLOCK_M, D]

        # the slide's global key seeds the softmax
        m = tl.sum(q.to(tl.float32) * _vec(K, g, skl, skd, HEAD_D, BLOCK_D)[None, :], 1) * qk_scale  # [BLOCK_M]
        l = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32) + _vec(V, g, svl, svd, HEAD_DV, BLOCK_DV)[None, :]

        if PATCH_SEES_SUMMARY:
            stok = tl.load(pack_summary + pk)
            ks = _rows(K, stok, skl, skd, row_ok, HEAD_D, BLOCK_D).to(tl.float32)
            vs = _rows(V, stok, svl, svd, row_ok, HEAD_DV, BLOCK_DV).to(tl.float32)
            m, l, acc = _merge_row_key(m, l, acc, tl.sum(q.to(tl.float32) * ks, 1) * qk_scale, vs)

        k = _rows(K, tok, skl, skd, row_ok, HEAD_D, BLOCK_D)  # [BLOCK_M, D]
        v = _rows(V, tok, svl, svd, row_ok, HEAD_DV, BLOCK_DV)  # [BLOCK_M, DV]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_M]
        s = tl.where((pk[:, None] == pk[None, :]) & row_ok[None, :], s, float("-inf"))
        m, l, acc = _merge_key_block(m, l, acc, s, v, PREC)
        if GLOBAL_SEES_ALL:  # the global row on these patch keys
            _global_partial(PART + pid * (BLOCK_DV + 2), _vec(Q, g, sql, sqd, HEAD_D, BLOCK_D), k.to(tl.float32),
                            v.to(tl.float32), row_ok, qk_scale, BLOCK_DV)

        _store_rows(O, tok, sol, sod, acc / l[:, None], row_ok, HEAD_DV, BLOCK_DV)
        tl.store(LSE + tok, m + tl.math.log2(l), mask=row_ok)


@triton.jit
def _summary_fwd(
    pid, Q, K, V, O, LSE, PART,
    pack_start, pack_count, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sol, sod,
    S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, SCALE_POSITIVE: tl.constexpr, PREC: tl.constexpr,
):
    """Summary program pid on one (b, h) slice; under PAPER the slide's first one also writes the global row."""
    slide, first, count, lo, hi = _slide_block(pid, slide_pack_start, S, BLOCK_M, CHUNK)
    if count > 0:
        g = tl.load(slide_token_start + slide)  # the slide's summaries are tokens g+1 .. g+(hi-lo)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < count
        tok = g + 1 + (first - lo) + r  # [BLOCK_M]
        rp = tl.where(row_ok, first + r, first)  # their packs
        q = _rows(Q, tok, sql, sqd, row_ok, HEAD_D, BLOCK_D)  # [BLOCK_M, D]
        qf = q.to(tl.float32)

        kg = _vec(K, g, skl, skd, HEAD_D, BLOCK_D)
        vg = _vec(V, g, svl, svd, HEAD_DV, BLOCK_DV)
        m = tl.sum(qf * kg[None, :], 1) * qk_scale
        l = tl.full([BLOCK_M], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32) + vg[None, :]

        if GLOBAL_SEES_ALL:  # the global row on these summary keys
            _global_partial(PART + pid * (BLOCK_DV + 2), _vec(Q, g, sql, sqd, HEAD_D, BLOCK_D),
                            _rows(K, tok, skl, skd, row_ok, HEAD_D, BLOCK_D).to(tl.float32),
                            _rows(V, tok, svl, svd, row_ok, HEAD_DV, BLOCK_DV).to(tl.float32), row_ok, qk_scale,
                            BLOCK_DV)
        else:
            if first == lo:  # the global row sees only itself: o = v_global, lse = q.k_global
                sg = tl.sum(_vec(Q, g, sql, sqd, HEAD_D, BLOCK_D) * kg, 0) * qk_scale
                c = tl.arange(0, BLOCK_DV)
                tl.store(O + g * sol + c * sod, (vg * tl.math.exp2(sg - sg)).to(O.dtype.element_ty),
                         mask=c < HEAD_DV)  # NaN when the logit is (as the softmax)
                tl.store(LSE + g, sg)

        # the pack's own patches, one slot at a time
        pstart = tl.load(pack_start + rp)
        pcnt = tl.load(pack_count + rp)
        for j in range(K2):  # not unrolled: keeps compile time down
            ok = row_ok & (j < pcnt)
            kj = _rows(K, pstart + j, skl, skd, ok, HEAD_D, BLOCK_D).to(tl.float32)
            vj = _rows(V, pstart + j, svl, svd, ok, HEAD_DV, BLOCK_DV).to(tl.float32)
            m, l, acc = _merge_row_key(m, l, acc, tl.where(ok, tl.sum(qf * kj, 1) * qk_scale, float("-inf")), vj)

        # every summary of the slide: whole tiles unmasked, then the rest
        n_keys = hi - lo
        n_full = n_keys // BLOCK_N
        kt = g + 1 + tl.arange(0, BLOCK_N)
        for _ in range(n_full):
            m, l, acc = _summary_keys(q, m, l, acc, K, V, kt, BLOCK_N, skl, skd, svl, svd, qk_scale,
                                      HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, False, SCALE_POSITIVE, PREC)
            kt += BLOCK_N
        if n_full * BLOCK_N < n_keys:
            m, l, acc = _summary_keys(q, m, l, acc, K, V, kt, n_keys - n_full * BLOCK_N, skl, skd, svl, svd,
                                      qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, True, SCALE_POSITIVE, PREC)

        _store_rows(O, tok, sol, sod, acc / l[:, None], row_ok, HEAD_DV, BLOCK_DV)
        tl.store(LSE + tok, m + tl.math.log2(l), mask=row_ok)


@triton.jit(do_not_specialize=["L", "P", "S"])
def _fwd(
    Q, K, V, O, LSE, PART,
    pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, L, P, S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUMMARY_BLOCK_M: tl.constexpr, SUMMARY_BLOCK_N: tl.constexpr, PATCH_BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program axis 0: summary programs, then patch programs; under global_to_all one partial each in PART."""
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    O = _slice(O, pid_bh, H, sob, soh)
    LSE += pid_bh.to(tl.int64) * L
    n_summary = P // SUMMARY_BLOCK_M + S  # meta.slide_blocks
    n_programs = n_summary + P // (PATCH_BLOCK_M // K2) + S
    PART += pid_bh.to(tl.int64) * n_programs * (BLOCK_DV + 2)  # [programs, acc + max + sum] a slice
    if pid < n_summary:
        _summary_fwd(pid, Q, K, V, O, LSE, PART, pack_start, pack_count, slide_token_start, slide_pack_start,
                     sql, sqd, skl, skd, svl, svd, sol, sod, S, qk_scale,
                     K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, SUMMARY_BLOCK_M, SUMMARY_BLOCK_N, CHUNK,
                     GLOBAL_SEES_ALL, SCALE_POSITIVE, PREC)
    else:
        _patch_fwd(pid - n_summary, Q, K, V, O, LSE, PART + n_summary * (BLOCK_DV + 2), pack_start, pack_count,
                   pack_summary, slide_token_start, slide_pack_start, sql, sqd, skl, skd, svl, svd, sol, sod, S,
                   qk_scale, K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, PATCH_BLOCK_M, CHUNK, PATCH_SEES_SUMMARY,
                   GLOBAL_SEES_ALL, PREC)


@triton.jit
def _merge_partials(part, n, m, l, acc, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr):
    """n consecutive partials [acc, max, sum] at part merged into (m, l, acc), BLOCK at a time, in order."""
    dv = tl.arange(0, BLOCK_DV)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        ok = i < n
        at = part + i * (BLOCK_DV + 2)
        mi = tl.load(at + BLOCK_DV, mask=ok, other=float("-inf"))  # [BLOCK]
        m_new = tl.maximum(m, tl.max(mi, 0))
        w = tl.math.exp2(mi - m_new)
        alpha = tl.math.exp2(m - m_new)
        l = l * alpha + tl.sum(w * tl.load(at + BLOCK_DV + 1, mask=ok, other=0.0), 0)
        acc = acc * alpha + tl.sum(w[:, None] * tl.load(at[:, None] + dv[None, :], mask=ok[:, None], other=0.0), 0)
        m = m_new
    return m, l, acc


@triton.jit(do_not_specialize=["L", "P", "S"])
def _fwd_merge(
    O, LSE, PART, Q, K, V, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod, H, L, P, S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUMMARY_BLOCK_M: tl.constexpr, PATCH_BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
):
    """The global rows under global_to_all: own term, then the slide's summary and patch partials, in order."""
    qk_scale = tl.cast(qk_scale, tl.float32)
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    g = tl.load(slide_token_start + s)
    lo = tl.load(slide_pack_start + s)
    hi = tl.load(slide_pack_start + s + 1)
    PACKS: tl.constexpr = PATCH_BLOCK_M // K2
    n_summary = P // SUMMARY_BLOCK_M + S  # meta.slide_blocks
    part = PART + pid_bh.to(tl.int64) * (n_summary + P // PACKS + S) * (BLOCK_DV + 2)
    m = tl.sum(_vec(_slice(Q, pid_bh, H, sqb, sqh), g, sql, sqd, HEAD_D, BLOCK_D)
               * _vec(_slice(K, pid_bh, H, skb, skh), g, skl, skd, HEAD_D, BLOCK_D), 0) * qk_scale
    l = tl.full([], 1.0, tl.float32)
    acc = _vec(_slice(V, pid_bh, H, svb, svh), g, svl, svd, HEAD_DV, BLOCK_DV)
    m, l, acc = _merge_partials(part + (lo // SUMMARY_BLOCK_M + s) * (BLOCK_DV + 2),
                                (hi - lo + SUMMARY_BLOCK_M - 1) // SUMMARY_BLOCK_M, m, l, acc, BLOCK_DV, BLOCK)
    m, l, acc = _merge_partials(part + (n_summary + lo // PACKS + s) * (BLOCK_DV + 2),
                                (hi - lo + PACKS - 1) // PACKS, m, l, acc, BLOCK_DV, BLOCK)
    dv = tl.arange(0, BLOCK_DV)
    tl.store(_slice(O, pid_bh, H, sob, soh) + g * sol + dv * sod, (acc / l).to(O.dtype.element_ty), mask=dv < HEAD_DV)
    tl.store(LSE + pid_bh.to(tl.int64) * L + g, m + tl.math.log2(l))


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
    fwd = cfg["fwd"]
    bd, bdv = meta.block_d(d), meta.block_d(dv)
    qk_scale = scale * meta.LOG2E  # base-2 scores
    o = meta.new_buffer((b, h, n_tok, dv), q.dtype, q.device)
    lse = meta.new_buffer((b, h, n_tok), torch.float32, q.device)
    n_programs = meta.slide_blocks(p, s, fwd["SUMMARY_BLOCK_M"]) + meta.slide_blocks(p, s, fwd["PATCH_BLOCK_M"] // k2)
    part = lse  # PAPER: no partials
    if flags.global_sees_all:  # a partial of the global row per program: [acc, max, sum]
        part = meta.new_buffer((b * h * n_programs * (bdv + 2),), torch.float32, q.device)
    meta.launch(_fwd, (n_programs, b * h), fwd,
                q, k, v, o, lse, part, *lay,
                *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(o),
                h, n_tok, p, s, qk_scale,
                K2=k2, HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, CHUNK=meta.SLIDE_CHUNK,
                SCALE_POSITIVE=meta.positive_in_fp32(qk_scale), PREC=meta.dot_precision(q.dtype), **flags.constexprs())
    if flags.global_sees_all:
        meta.launch(_fwd_merge, (s, b * h), cfg["fwd_merge"],
                    o, lse, part, q, k, v, lay.slide_token_start, lay.slide_pack_start,
                    *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(o),
                    h, n_tok, p, s, qk_scale,
                    K2=k2, HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv,
                    SUMMARY_BLOCK_M=fwd["SUMMARY_BLOCK_M"], PATCH_BLOCK_M=fwd["PATCH_BLOCK_M"])
    return o, lse
