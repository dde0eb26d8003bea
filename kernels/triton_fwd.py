"""Forward Triton kernels of topo-pack attention and their launcher.

Three row kinds, one launch (``_fwd``: its programs are split between the parts by
program id, the long-running ones first), scores in base 2 (s = q.k * scale * log2(e)):

- summary part: SUMMARY_BLOCK_M consecutive summary rows of one slide (row blocks never
  straddle slides, see ``_slide_block``), so rows and keys are contiguous tokens: a
  FlashAttention loop over the slide's summaries in SUMMARY_BLOCK_N key tiles, unmasked
  except the last, plus each row's own patches and the global key. Under PAPER the
  global row sees only itself (o = v_global, lse = q.k_global): the slide's first
  summary program writes it.
- global part (global_to_all only): the global row sees its whole slide, split
  over NSPLIT key ranges whose partial (max, sum, acc) ``_fwd_merge`` merges
  through their log-sum-exp (the second launch).
- patch part: PATCH_BLOCK_M // K2 consecutive packs of one slide per program, their
  patch tokens gathered as one block (K2 slots a pack); block-diagonal scores (same
  pack) plus the summary and global keys as per-row extra columns. Memory-bound,
  ~k*k keys a row.

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
    pid, Q, K, V, O, LSE,
    pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sol, sod,
    S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, PREC: tl.constexpr,
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

        _store_rows(O, tok, sol, sod, acc / l[:, None], row_ok, HEAD_DV, BLOCK_DV)
        tl.store(LSE + tok, m + tl.math.log2(l), mask=row_ok)


@triton.jit
def _summary_fwd(
    pid, Q, K, V, O, LSE,
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

        if not GLOBAL_SEES_ALL:
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


@triton.jit
def _global_range(slide_token_start, s, split, NSPLIT: tl.constexpr):
    """The global token of slide s and split `split` of its slide's tokens."""
    t0 = tl.load(slide_token_start + s)
    t1 = tl.load(slide_token_start + s + 1)
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
    g, lo, hi = _global_range(slide_token_start, s, split, NSPLIT)
    q = _vec(Q, g, sql, sqd, HEAD_D, BLOCK_D)  # [D]
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):  # a non-empty tile each time: m turns finite at once
        t = n0 + tl.arange(0, BLOCK_N)
        ok = t < hi
        k = _rows(K, t, skl, skd, ok, HEAD_D, BLOCK_D).to(tl.float32)
        v = _rows(V, t, svl, svd, ok, HEAD_DV, BLOCK_DV).to(tl.float32)
        sc = tl.where(ok, tl.sum(k * q[None, :], 1) * qk_scale, float("-inf"))  # [BLOCK_N]
        m_new = tl.maximum(m, tl.max(sc, 0))
        alpha = tl.math.exp2(m - m_new)
        p = tl.math.exp2(sc - m_new)
        l = l * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    part = PART + ((pid_bh.to(tl.int64) * S + s) * NSPLIT + split) * (BLOCK_DV + 2)  # [acc, max, sum]
    tl.store(part + tl.arange(0, BLOCK_DV), acc)
    tl.store(part + BLOCK_DV, m)  # -inf and 0 for an empty split
    tl.store(part + BLOCK_DV + 1, l)


@triton.jit(do_not_specialize=["L", "P", "S"])
def _fwd(
    Q, K, V, O, LSE, PART,
    pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, L, P, S, qk_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUMMARY_BLOCK_M: tl.constexpr, SUMMARY_BLOCK_N: tl.constexpr, GLOBAL_BLOCK_N: tl.constexpr,
    PATCH_BLOCK_M: tl.constexpr, NSPLIT: tl.constexpr, CHUNK: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
    PREC: tl.constexpr,
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
    n_summary = P // SUMMARY_BLOCK_M + S  # meta.slide_blocks
    n_global = S * NSPLIT if GLOBAL_SEES_ALL else 0
    if pid < n_summary:
        _summary_fwd(pid, Q, K, V, O, LSE, pack_start, pack_count, slide_token_start, slide_pack_start,
                     sql, sqd, skl, skd, svl, svd, sol, sod, S, qk_scale,
                     K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, SUMMARY_BLOCK_M, SUMMARY_BLOCK_N, CHUNK,
                     GLOBAL_SEES_ALL, SCALE_POSITIVE, PREC)
    elif pid < n_summary + n_global:
        pid -= n_summary
        _global_fwd_split(pid % NSPLIT, pid // NSPLIT, pid_bh, Q, K, V, PART, slide_token_start,
                          sql, sqd, skl, skd, svl, svd, S, qk_scale,
                          HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, NSPLIT, GLOBAL_BLOCK_N)
    else:
        _patch_fwd(pid - n_summary - n_global, Q, K, V, O, LSE, pack_start, pack_count, pack_summary,
                   slide_token_start, slide_pack_start, sql, sqd, skl, skd, svl, svd, sol, sod, S, qk_scale,
                   K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, PATCH_BLOCK_M, CHUNK, PATCH_SEES_SUMMARY, PREC)


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
    n_programs = meta.slide_blocks(p, s, fwd["SUMMARY_BLOCK_M"]) + meta.slide_blocks(p, s, fwd["PATCH_BLOCK_M"] // k2)
    nsplit, part = 1, lse  # PAPER: no global splits
    if flags.global_sees_all:
        nsplit = meta.num_splits(meta.size_bucket(n_tok), split_tokens)
        part = meta.new_buffer((b * h * s * nsplit * (bdv + 2),), torch.float32, q.device)  # [acc, max, sum]
        n_programs += s * nsplit
    meta.launch(_fwd, (n_programs, b * h), fwd,
                q, k, v, o, lse, part, lay.pack_patch_start, lay.pack_patch_count, lay.pack_summary_token,
                lay.slide_token_start, lay.slide_pack_start,
                *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(o),
                h, n_tok, p, s, scale * meta.LOG2E,
                K2=k2, HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, NSPLIT=nsplit, CHUNK=meta.SLIDE_CHUNK,
                SCALE_POSITIVE=scale > 0, PREC=meta.dot_precision(q.dtype), **flags.constexprs())
    if flags.global_sees_all:
        meta.launch(_fwd_merge, (s, b * h), cfg["fwd_merge"],
                    o, lse, part, lay.slide_token_start, *meta.strides(o), h, s, n_tok,
                    HEAD_DV=dv, BLOCK_DV=bdv, NSPLIT=nsplit)
    return o, lse
