"""Backward Triton kernels of topo-pack attention and their launcher: three launches.

Deterministic by construction: every gradient element is written by exactly one
program, and the one key that every row sees (the slide's global token) is
reduced in two stages (per-split partials, then a fixed-order sum). No atomics.

With p = exp2(s - lse) (base-2 scores and the forward's base-2 LSE),
delta = rowsum(dO * O) and ds = p * (dO.v - delta):
dq = scale * sum ds k, dk = scale * sum ds q, dv = sum p dO.

- ``_bwd_delta`` (launch 1): delta per token.
- ``_bwd`` (launch 2), its programs split between four parts by program id:
  - summary dk/dv: dk, dv of SUMMARY_DKV_BLOCK_N summary keys, looping over the
    slide's summary rows (tl.dot), plus the pack's patch rows and the global row
    when the rules let them see a summary;
  - summary dq: dq of SUMMARY_DQ_BLOCK_M summary rows, looping over the slide's
    summary keys (tl.dot), the row's own patches and its global key;
  - global splits: the global token's key column (every row of the slide sees it)
    and its row, split NSPLIT ways into partials; under PAPER the row sees only
    itself (its dq is one term);
  - patch: per block of packs (as in the forward): dq of the patch rows, and dk, dv
    of the patch keys, which are seen by the pack's patch rows (block-diagonal
    tl.dot), the pack's summary row, and the global row when it sees the whole slide.
- ``_bwd_merge`` (launch 3): fixed-order sum of the partials -> the global token's dq, dk, dv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs as configs, triton_meta as meta
from .triton_fwd import _global_range, _patch_rows, _slice, _summary_tile


@triton.jit(do_not_specialize=["L"])
def _bwd_delta(O, DO, DELTA, sob, soh, sol, sod, sdb, sdh, sdl, sdd, H, L,
               HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    t = pid * BLOCK + tl.arange(0, BLOCK)
    dv = tl.arange(0, BLOCK_DV)
    mask = (t < L)[:, None] & (dv < HEAD_DV)[None, :]
    o = tl.load(_slice(O, pid_bh, H, sob, soh) + t[:, None] * sol + dv[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(_slice(DO, pid_bh, H, sdb, sdh) + t[:, None] * sdl + dv[None, :] * sdd, mask=mask, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=t < L)


@triton.jit
def _row_key_ds(qf, dof, lse, delta, kf, vf, ok, qk_scale):
    """One key per row, everything [M, *] fp32: (p, ds) of that key, 0 where not ok."""
    p = tl.math.exp2(tl.where(ok, tl.sum(qf * kf, 1) * qk_scale - lse, float("-inf")))
    return p, p * (tl.sum(dof * vf, 1) - delta)


@triton.jit
def _one_row_per_key(Q, DO, LSE, DELTA, rtok, sql, sqd, sdl, sdd, ok, kf, vf, qk_scale,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """(dk, dv) [M, *] fp32 of keys kf, vf, each seen by one query row (rows rtok), unscaled."""
    qr = _load_rows(Q, rtok, sql, sqd, ok, HEAD_D, BLOCK_D)
    dor = _load_rows(DO, rtok, sdl, sdd, ok, HEAD_DV, BLOCK_DV)
    lse = tl.load(LSE + rtok, mask=ok, other=0.0)
    delta = tl.load(DELTA + rtok, mask=ok, other=0.0)
    p, ds = _row_key_ds(qr, dor, lse, delta, kf, vf, ok, qk_scale)
    return ds[:, None] * qr, p[:, None] * dor


@triton.jit
def _load_rows(X, tok, sl, sd, ok, HEAD: tl.constexpr, BLOCK: tl.constexpr):
    """Rows `tok` of one (b, h) slice of X as fp32 [M, BLOCK]; zeros where not ok."""
    c = tl.arange(0, BLOCK)
    return tl.load(X + tok[:, None] * sl + c[None, :] * sd, mask=ok[:, None] & (c < HEAD)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _patch_bwd(
    pid, Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start,
    sql, sqd, skl, skd, svl, svd, sdl, sdd, P, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    pk, row_ok, tok, gtok = _patch_rows(pid, pack_start, pack_count, pack_slide, slide_token_start, P, K2, BLOCK_M)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    qmask = row_ok[:, None] & (d < HEAD_D)[None, :]
    vmask = row_ok[:, None] & (dv < HEAD_DV)[None, :]
    q = tl.load(Q + tok[:, None] * sql + d[None, :] * sqd, mask=qmask, other=0.0)  # [BLOCK_M, D]
    k = tl.load(K + tok[:, None] * skl + d[None, :] * skd, mask=qmask, other=0.0)  # [BLOCK_M, D]
    v = tl.load(V + tok[:, None] * svl + dv[None, :] * svd, mask=vmask, other=0.0)  # [BLOCK_M, DV]
    do = tl.load(DO + tok[:, None] * sdl + dv[None, :] * sdd, mask=vmask, other=0.0)  # [BLOCK_M, DV]
    qf, kf, vf, dof = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + tok, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + tok, mask=row_ok, other=0.0)

    # dq from the global key (its dk, dv are reduced by the global splits)
    kg = _load_rows(K, gtok, skl, skd, row_ok, HEAD_D, BLOCK_D)
    _, ds = _row_key_ds(qf, dof, lse, delta, kg, _load_rows(V, gtok, svl, svd, row_ok, HEAD_DV, BLOCK_DV),
                        row_ok, qk_scale)
    dq = ds[:, None] * kg  # [BLOCK_M, D]
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dvv = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if PATCH_SEES_SUMMARY:  # dq from the pack's summary key (its dk, dv: the summary dk/dv part)
        stok = tl.load(pack_summary + pk, mask=row_ok, other=0)
        ks = _load_rows(K, stok, skl, skd, row_ok, HEAD_D, BLOCK_D)
        _, ds = _row_key_ds(qf, dof, lse, delta, ks, _load_rows(V, stok, svl, svd, row_ok, HEAD_DV, BLOCK_DV),
                            row_ok, qk_scale)
        dq += ds[:, None] * ks

    # block-diagonal: rows and keys are the same patch tokens
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_M]
    same_pack = (pk[:, None] == pk[None, :]) & row_ok[:, None] & row_ok[None, :]
    p = tl.math.exp2(tl.where(same_pack, s - lse[:, None], float("-inf")))  # [BLOCK_M, BLOCK_M]
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # [BLOCK_M, BLOCK_M]
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
    dvv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)

    # the pack's summary row sees these patch keys
    stok = tl.load(pack_summary + pk, mask=row_ok, other=0)
    dk_r, dv_r = _one_row_per_key(Q, DO, LSE, DELTA, stok, sql, sqd, sdl, sdd, row_ok, kf, vf, qk_scale,
                                  HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV)
    dk += dk_r
    dvv += dv_r

    if GLOBAL_SEES_ALL:  # the slide's global row sees these patch keys
        dk_r, dv_r = _one_row_per_key(Q, DO, LSE, DELTA, gtok, sql, sqd, sdl, sdd, row_ok, kf, vf, qk_scale,
                                      HEAD_D, BLOCK_D, HEAD_DV, BLOCK_DV)
        dk += dk_r
        dvv += dv_r

    tl.store(DQ + tok[:, None] * HEAD_D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)
    tl.store(DK + tok[:, None] * HEAD_D + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=qmask)
    tl.store(DV + tok[:, None] * HEAD_DV + dv[None, :], dvv.to(DV.dtype.element_ty), mask=vmask)


@triton.jit
def _summary_block(pack_slide, slide_pack_start, first, P, BLOCK: tl.constexpr):
    """Packs first .. first+BLOCK-1 (clamped), their slides, and the pack range of those slides."""
    rp = first + tl.arange(0, BLOCK)
    ok = rp < P
    rp = tl.where(ok, rp, P - 1)
    slide = tl.load(pack_slide + rp)
    lo = tl.load(slide_pack_start + tl.load(pack_slide + first))
    hi = tl.load(slide_pack_start + tl.load(pack_slide + tl.minimum(first + BLOCK, P) - 1) + 1)
    return rp, ok, slide, lo, hi


@triton.jit
def _summary_bwd_dq(
    pid, Q, K, V, DO, LSE, DELTA, DQ,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sdl, sdd, P, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    rp, row_ok, slide, lo, hi = _summary_block(pack_slide, slide_pack_start, pid * BLOCK_M, P, BLOCK_M)
    tok = tl.load(pack_summary + rp)
    gtok = tl.load(slide_token_start + slide)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    qmask = row_ok[:, None] & (d < HEAD_D)[None, :]
    vmask = row_ok[:, None] & (dv < HEAD_DV)[None, :]
    q = tl.load(Q + tok[:, None] * sql + d[None, :] * sqd, mask=qmask, other=0.0)  # [BLOCK_M, D]
    do = tl.load(DO + tok[:, None] * sdl + dv[None, :] * sdd, mask=vmask, other=0.0)  # [BLOCK_M, DV]
    qf, dof = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + tok, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + tok, mask=row_ok, other=0.0)

    kg = _load_rows(K, gtok, skl, skd, row_ok, HEAD_D, BLOCK_D)
    _, ds = _row_key_ds(qf, dof, lse, delta, kg, _load_rows(V, gtok, svl, svd, row_ok, HEAD_DV, BLOCK_DV),
                        row_ok, qk_scale)
    dq = ds[:, None] * kg  # [BLOCK_M, D]

    pstart = tl.load(pack_start + rp)
    pcnt = tl.load(pack_count + rp)
    for j in range(K2):  # not unrolled: keeps compile time down
        ok = row_ok & (j < pcnt)
        kj = _load_rows(K, pstart + j, skl, skd, ok, HEAD_D, BLOCK_D)
        _, ds = _row_key_ds(qf, dof, lse, delta, kj, _load_rows(V, pstart + j, svl, svd, ok, HEAD_DV, BLOCK_DV),
                            ok, qk_scale)
        dq += ds[:, None] * kj

    for n0 in range(lo, hi, BLOCK_N):
        ktok, kslide, kok, k, v = _summary_tile(K, V, n0, hi, P, pack_summary, pack_slide, skl, skd, svl, svd,
                                                HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N)  # k [BLOCK_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        allowed = (slide[:, None] == kslide[None, :]) & kok[None, :] & row_ok[:, None]
        p_tile = tl.math.exp2(tl.where(allowed, s - lse[:, None], float("-inf")))  # [BLOCK_M, BLOCK_N]
        dp_tile = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds_tile = p_tile * (dp_tile - delta[:, None])
        dq += tl.dot(ds_tile.to(k.dtype), k, input_precision=PREC)

    tl.store(DQ + tok[:, None] * HEAD_D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _summary_bwd_dkv(
    pid, Q, K, V, DO, LSE, DELTA, DK, DV,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sdl, sdd, P, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    # key rows: the summaries of packs pid * BLOCK_N ...
    kp, key_ok, kslide, lo, hi = _summary_block(pack_slide, slide_pack_start, pid * BLOCK_N, P, BLOCK_N)
    ktok = tl.load(pack_summary + kp)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    kmask = key_ok[:, None] & (d < HEAD_D)[None, :]
    vmask = key_ok[:, None] & (dv < HEAD_DV)[None, :]
    k = tl.load(K + ktok[:, None] * skl + d[None, :] * skd, mask=kmask, other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + ktok[:, None] * svl + dv[None, :] * svd, mask=vmask, other=0.0)  # [BLOCK_N, DV]
    kf, vf = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    # every summary row of the key's slide
    for m0 in range(lo, hi, BLOCK_M):
        qtok, qslide, rok, q, do = _summary_tile(Q, DO, m0, hi, P, pack_summary, pack_slide, sql, sqd, sdl, sdd,
                                                 HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_M)  # q [BLOCK_M, D]
        lse = tl.load(LSE + qtok, mask=rok, other=0.0)
        delta = tl.load(DELTA + qtok, mask=rok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        allowed = (kslide[:, None] == qslide[None, :]) & rok[None, :] & key_ok[:, None]
        p_t = tl.math.exp2(tl.where(allowed, s_t - lse[None, :], float("-inf")))
        dvv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)

    if PATCH_SEES_SUMMARY:  # the pack's patch rows, one slot at a time
        pstart = tl.load(pack_start + kp)
        pcnt = tl.load(pack_count + kp)
        for j in range(K2):  # not unrolled: keeps compile time down
            ok = key_ok & (j < pcnt)
            qt = pstart + j
            qj = _load_rows(Q, qt, sql, sqd, ok, HEAD_D, BLOCK_D)
            doj = _load_rows(DO, qt, sdl, sdd, ok, HEAD_DV, BLOCK_DV)
            p, ds = _row_key_ds(qj, doj, tl.load(LSE + qt, mask=ok, other=0.0), tl.load(DELTA + qt, mask=ok, other=0.0),
                                kf, vf, ok, qk_scale)
            dk += ds[:, None] * qj
            dvv += p[:, None] * doj

    if GLOBAL_SEES_ALL:  # the slide's global row
        gtok = tl.load(slide_token_start + kslide)
        qg = _load_rows(Q, gtok, sql, sqd, key_ok, HEAD_D, BLOCK_D)
        dog = _load_rows(DO, gtok, sdl, sdd, key_ok, HEAD_DV, BLOCK_DV)
        p, ds = _row_key_ds(qg, dog, tl.load(LSE + gtok, mask=key_ok, other=0.0),
                            tl.load(DELTA + gtok, mask=key_ok, other=0.0), kf, vf, key_ok, qk_scale)
        dk += ds[:, None] * qg
        dvv += p[:, None] * dog

    tl.store(DK + ktok[:, None] * HEAD_D + d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + ktok[:, None] * HEAD_DV + dv[None, :], dvv.to(DV.dtype.element_ty), mask=vmask)


@triton.jit
def _global_bwd_split(
    split, s, pid_bh, Q, K, V, DO, LSE, DELTA, PART, slide_token_start,
    sql, sqd, skl, skd, svl, svd, sdl, sdd, S, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr,
):
    """Split `split` of slide s: its rows' grads on the global key, and the global row's dq on its keys."""
    # every token of the slide is a row that sees the global key
    g, lo, hi = _global_range(slide_token_start, s, split, NSPLIT, True)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    qg = tl.load(Q + g * sql + d * sqd, mask=d < HEAD_D, other=0.0).to(tl.float32)  # [D]
    kg = tl.load(K + g * skl + d * skd, mask=d < HEAD_D, other=0.0).to(tl.float32)
    vg = tl.load(V + g * svl + dv * svd, mask=dv < HEAD_DV, other=0.0).to(tl.float32)  # [DV]
    dog = tl.load(DO + g * sdl + dv * sdd, mask=dv < HEAD_DV, other=0.0).to(tl.float32)
    lse_g = tl.load(LSE + g)
    delta_g = tl.load(DELTA + g)

    dq = tl.zeros([BLOCK_D], tl.float32)
    dk = tl.zeros([BLOCK_D], tl.float32)
    dvv = tl.zeros([BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        ok = t < hi
        # column: rows t on key g
        qt = _load_rows(Q, t, sql, sqd, ok, HEAD_D, BLOCK_D)
        dot_ = _load_rows(DO, t, sdl, sdd, ok, HEAD_DV, BLOCK_DV)
        lse = tl.load(LSE + t, mask=ok, other=0.0)
        delta = tl.load(DELTA + t, mask=ok, other=0.0)
        p = tl.math.exp2(tl.where(ok, tl.sum(qt * kg[None, :], 1) * qk_scale - lse, float("-inf")))  # [BLOCK_N]
        ds = p * (tl.sum(dot_ * vg[None, :], 1) - delta)
        dvv += tl.sum(p[:, None] * dot_, 0)
        dk += tl.sum(ds[:, None] * qt, 0)
        if GLOBAL_SEES_ALL:  # row: the global query on keys t
            kt = _load_rows(K, t, skl, skd, ok, HEAD_D, BLOCK_D)
            vt = _load_rows(V, t, svl, svd, ok, HEAD_DV, BLOCK_DV)
            p = tl.math.exp2(tl.where(ok, tl.sum(kt * qg[None, :], 1) * qk_scale - lse_g, float("-inf")))
            ds = p * (tl.sum(vt * dog[None, :], 1) - delta_g)
            dq += tl.sum(ds[:, None] * kt, 0)
    if not GLOBAL_SEES_ALL:  # the global query sees only itself: one term, in split 0
        p = tl.math.exp2(tl.sum(qg * kg, 0) * qk_scale - lse_g)
        dq = tl.where(split == 0, p * (tl.sum(dog * vg, 0) - delta_g), 0.0) * kg
    part = PART + ((pid_bh.to(tl.int64) * S + s) * NSPLIT + split) * (2 * BLOCK_D + BLOCK_DV)  # [dq, dk, dv]
    tl.store(part + d, dq)
    tl.store(part + BLOCK_D + d, dk)
    tl.store(part + 2 * BLOCK_D + dv, dvv)


@triton.jit(do_not_specialize=["L", "P", "S"])
def _bwd(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, PART,
    pack_start, pack_count, pack_summary, pack_slide, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, L, P, S, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUMMARY_DKV_BLOCK_M: tl.constexpr, SUMMARY_DKV_BLOCK_N: tl.constexpr,
    SUMMARY_DQ_BLOCK_M: tl.constexpr, SUMMARY_DQ_BLOCK_N: tl.constexpr,
    GLOBAL_BLOCK_N: tl.constexpr, PATCH_BLOCK_M: tl.constexpr, NSPLIT: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    """Program axis 0: summary dk/dv, summary dq, S * NSPLIT global splits, patch programs."""
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    DO = _slice(DO, pid_bh, H, sdb, sdh)
    LSE += pid_bh.to(tl.int64) * L
    DELTA += pid_bh.to(tl.int64) * L
    DQ += pid_bh.to(tl.int64) * L * HEAD_D  # grads are contiguous [B, H, L, D]
    DK += pid_bh.to(tl.int64) * L * HEAD_D
    DV += pid_bh.to(tl.int64) * L * HEAD_DV
    n_dkv = tl.cdiv(P, SUMMARY_DKV_BLOCK_N)
    n_dq = tl.cdiv(P, SUMMARY_DQ_BLOCK_M)
    if pid < n_dkv:
        _summary_bwd_dkv(pid, Q, K, V, DO, LSE, DELTA, DK, DV, pack_start, pack_count, pack_summary, pack_slide,
                         slide_token_start, slide_pack_start, sql, sqd, skl, skd, svl, svd, sdl, sdd,
                         P, qk_scale, sm_scale, K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
                         SUMMARY_DKV_BLOCK_M, SUMMARY_DKV_BLOCK_N, PATCH_SEES_SUMMARY, GLOBAL_SEES_ALL, PREC)
    elif pid < n_dkv + n_dq:
        _summary_bwd_dq(pid - n_dkv, Q, K, V, DO, LSE, DELTA, DQ, pack_start, pack_count, pack_summary, pack_slide,
                        slide_token_start, slide_pack_start, sql, sqd, skl, skd, svl, svd, sdl, sdd,
                        P, qk_scale, sm_scale, K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV,
                        SUMMARY_DQ_BLOCK_M, SUMMARY_DQ_BLOCK_N, PREC)
    elif pid < n_dkv + n_dq + S * NSPLIT:
        pid -= n_dkv + n_dq
        _global_bwd_split(pid % NSPLIT, pid // NSPLIT, pid_bh, Q, K, V, DO, LSE, DELTA, PART, slide_token_start,
                          sql, sqd, skl, skd, svl, svd, sdl, sdd, S, qk_scale,
                          HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, NSPLIT, GLOBAL_BLOCK_N, GLOBAL_SEES_ALL)
    else:
        _patch_bwd(pid - n_dkv - n_dq - S * NSPLIT, Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
                   pack_start, pack_count, pack_summary, pack_slide, slide_token_start,
                   sql, sqd, skl, skd, svl, svd, sdl, sdd, P, qk_scale, sm_scale,
                   K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, PATCH_BLOCK_M, PATCH_SEES_SUMMARY, GLOBAL_SEES_ALL, PREC)


@triton.jit(do_not_specialize=["S", "L"])
def _bwd_merge(
    DQ, DK, DV, PART, slide_token_start, S, L, sm_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    NSPLIT: tl.constexpr,
):
    """Fixed-order sum of the split partials -> the global token's dq, dk, dv."""
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    sm_scale = tl.cast(sm_scale, tl.float32)
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    row = pid_bh.to(tl.int64) * L + tl.load(slide_token_start + s)  # grads are contiguous [B, H, L, D]
    part = PART + ((pid_bh.to(tl.int64) * S + s) * NSPLIT + tl.arange(0, NSPLIT)) * (2 * BLOCK_D + BLOCK_DV)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    dq = tl.sum(tl.load(part[:, None] + d[None, :]), 0)
    dk = tl.sum(tl.load(part[:, None] + BLOCK_D + d[None, :]), 0)
    dvv = tl.sum(tl.load(part[:, None] + 2 * BLOCK_D + dv[None, :]), 0)
    tl.store(DQ + row * HEAD_D + d, (dq * sm_scale).to(DQ.dtype.element_ty), mask=d < HEAD_D)
    tl.store(DK + row * HEAD_D + d, (dk * sm_scale).to(DK.dtype.element_ty), mask=d < HEAD_D)
    tl.store(DV + row * HEAD_DV + dv, dvv.to(DV.dtype.element_ty), mask=dv < HEAD_DV)


LAUNCHES = ("bwd_delta", "bwd", "bwd_merge")


def attention_bwd(do, q, k, v, o, lse, lay: meta.LayoutArgs, scale: float, flags: meta.MaskFlags, pack_size: int,
                  autotune: bool = False, cfg: dict | None = None):
    """Launch the backward (three launches) -> (dq, dk, dv), contiguous, in the dtypes of q, k, v.

    cfg: the launches' configs (default: the table's for this key, or tuned first when `autotune`).
    """
    if cfg is None:
        cfg = configs.resolve(q, pack_size, LAUNCHES, flags.global_sees_all, autotune,
                              lambda c: attention_bwd(do, q, k, v, o, lse, lay, scale, flags, pack_size, cfg=c))
    b, h, n_tok, d = q.shape
    dv = v.shape[-1]
    p, s = lay.num_packs, lay.num_slides
    k2 = pack_size ** 2
    bwd = dict(cfg["bwd"])
    nsplit = meta.num_splits(meta.size_bucket(n_tok), bwd.pop("SPLIT_TOKENS"))
    bd, bdv = meta.block_d(d), meta.block_d(dv)
    dq, dk, dvv = (meta.new_buffer(t.shape, t.dtype, t.device) for t in (q, k, v))  # contiguous
    delta = meta.new_buffer((b, h, n_tok), torch.float32, q.device)
    part = meta.new_buffer((b * h * s * nsplit * (2 * bd + bdv),), torch.float32, q.device)  # [dq, dk, dv]

    meta.launch(_bwd_delta, (meta.cdiv(n_tok, cfg["bwd_delta"]["BLOCK"]), b * h), cfg["bwd_delta"],
                o, do, delta, *meta.strides(o), *meta.strides(do), h, n_tok, HEAD_DV=dv, BLOCK_DV=bdv)
    n_programs = (meta.cdiv(p, bwd["SUMMARY_DKV_BLOCK_N"]) + meta.cdiv(p, bwd["SUMMARY_DQ_BLOCK_M"])
                  + s * nsplit + meta.cdiv(p, bwd["PATCH_BLOCK_M"] // k2))
    meta.launch(_bwd, (n_programs, b * h), bwd,
                q, k, v, do, lse, delta, dq, dk, dvv, part, lay.pack_patch_start, lay.pack_patch_count,
                lay.pack_summary_token, lay.pack_slide, lay.slide_token_start, lay.slide_pack_start,
                *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(do),
                h, n_tok, p, s, scale * meta.LOG2E, scale,
                K2=k2, HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, NSPLIT=nsplit,
                PREC=meta.dot_precision(q.dtype), **flags.constexprs())
    meta.launch(_bwd_merge, (s, b * h), cfg["bwd_merge"],
                dq, dk, dvv, part, lay.slide_token_start, s, n_tok, scale,
                HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, NSPLIT=nsplit)
    return dq, dk, dvv
