"""Backward Triton kernels of topo-pack attention and their launcher: three launches.

Deterministic: every gradient element is written by one program, or summed in a fixed
order (the summary rows' dq below); no order-dependent atomics.

With p = exp2(s - lse) (base-2 scores and the forward's base-2 LSE),
delta = rowsum(dO * O) and ds = p * (dO.v - delta):
dq = scale * sum ds k, dk = scale * sum ds q, dv = sum p dO.

- ``_bwd_prep`` (launch 1): delta of the global and summary rows; zeroes the dq semaphores.
- ``_bwd`` (launch 2), a 1-D grid with the (b, h) slice fastest, its programs split
  between the parts by program id:
  - summary keys (KV-stationary): dk, dv of SUMMARY_BLOCK_N consecutive summary keys of
    one slide, looping over the slide's summary rows in SUMMARY_BLOCK_M tiles (4 matmuls
    a tile, whole tiles unmasked). With DQ_ORDERED a fifth, ds k, adds the tile's dq into
    an fp32 buffer in a fixed order: key block j of a slide waits on the row block's
    semaphore until blocks 0 .. j-1 have added theirs (FlashAttention-3's deterministic
    dq; a block only ever waits on blocks launched before it). Plus the terms of the
    pack's patch rows (patch_to_summary) and of the global row (global_to_all).
  - summary dq (only without DQ_ORDERED): Q-stationary over the slide's summary keys, 3 matmuls a tile.
  - patch: PATCH_ITERS blocks of PATCH_BLOCK_M // K2 packs of one slide: dq, dk, dv of
    their patch tokens (delta from O here); their summary rows' dq from their own
    patches and the global key (an fp32 buffer); one partial sum per program of the
    global token's gradients: its key column (patch and summary rows of these packs)
    and, under global_to_all, its row's dq.
- ``_bwd_merge`` (launch 3): the summary rows' dq (the two fp32 buffers, scaled) and the
  global token's dq, dk, dv (its slide's partials in a fixed order plus its own term).

HBM traffic over the patch tokens (k*k of every k*k+1 tokens): q, k, v, o, dO read once
and dq, dk, dv written once, by the patch programs; nothing else reads them, except that
under patch_to_summary the summary key programs read the patch rows' q, dO and O again. The
summary tokens are re-read per tile as in FlashAttention, and their fp32 dq buffers
add two writes and two reads of P x head_dim floats.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs as configs, triton_meta as meta
from .triton_fwd import _patch_rows, _rows, _slice, _slide_block, _store_rows, _vec


@triton.jit
def _row_key_ds(qf, dof, lse, delta, kf, vf, ok, qk_scale):
    """One key per row, everything [M, *] fp32 (or broadcast): (p, ds) of that key, 0 where not ok."""
    p = tl.math.exp2(tl.where(ok, tl.sum(qf * kf, 1) * qk_scale - lse, float("-inf")))
    return p, p * (tl.sum(dof * vf, 1) - delta)


@triton.jit(do_not_specialize=["L", "S", "n_sem"])
def _bwd_prep(O, DO, DELTA, SEM, slide_token_start, slide_pack_start,
              sob, soh, sol, sod, sdb, sdh, sdl, sdd, H, L, S, n_sem,
              HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """delta of BLOCK summary rows of one slide (and of its global row); zeroes the semaphores."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    for i in range(pid, n_sem, tl.num_programs(0)):
        tl.store(SEM + pid_bh.to(tl.int64) * n_sem + i, 0)
    slide, first, count, lo, hi = _slide_block(pid, slide_pack_start, S, BLOCK, CHUNK)
    if count > 0:
        O = _slice(O, pid_bh, H, sob, soh)
        DO = _slice(DO, pid_bh, H, sdb, sdh)
        DELTA += pid_bh.to(tl.int64) * L
        g = tl.load(slide_token_start + slide)
        r = tl.arange(0, BLOCK)
        ok = r < count
        tok = g + 1 + (first - lo) + r
        o = _rows(O, tok, sol, sod, ok, HEAD_DV, BLOCK_DV).to(tl.float32)
        do = _rows(DO, tok, sdl, sdd, ok, HEAD_DV, BLOCK_DV).to(tl.float32)
        tl.store(DELTA + tok, tl.sum(o * do, 1), mask=ok)
        if first == lo:
            tl.store(DELTA + g, tl.sum(_vec(O, g, sol, sod, HEAD_DV, BLOCK_DV) * _vec(DO, g, sdl, sdd, HEAD_DV,
                                                                                        BLOCK_DV), 0))


@triton.jit
def _kv_tile(k, v, dk, dvv, key_ok, j, Q, DO, LSE, DELTA, DQ_SUM, lock, qt, qp, n_ok,
             sql, sqd, sdl, sdd, qk_scale,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             MASKED: tl.constexpr, DQ_ORDERED: tl.constexpr, PREC: tl.constexpr):
    """Summary rows qt (packs qp; the first n_ok real when MASKED) on key block j: dk, dv, and the ordered dq."""
    rok = tl.arange(0, qt.shape[0]) < n_ok
    q = _rows(Q, qt, sql, sqd, rok, HEAD_D, BLOCK_D, MASKED)  # [BLOCK_M, D]
    do = _rows(DO, qt, sdl, sdd, rok, HEAD_DV, BLOCK_DV, MASKED)  # [BLOCK_M, DV]
    lse = tl.load(LSE + qt, mask=rok, other=0.0)
    delta = tl.load(DELTA + qt, mask=rok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :]  # [BLOCK_N, BLOCK_M]
    if MASKED:
        allowed = key_ok[:, None] & rok[None, :]
    else:
        allowed = key_ok[:, None]
    p_t = tl.math.exp2(tl.where(allowed, s_t, float("-inf")))
    dvv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    if DQ_ORDERED:
        dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=PREC)  # [BLOCK_M, D] fp32
        ptr = DQ_SUM + qp[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        if j == 0:
            tl.store(ptr, dq, mask=rok[:, None])
        else:
            while tl.atomic_add(lock, 0, sem="acquire") < j:  # blocks 0 .. j-1 of the slide have added
                pass
            tl.atomic_add(ptr, dq, mask=rok[:, None], sem="relaxed")
        tl.debug_barrier()
        tl.atomic_xchg(lock, j + 1, sem="release")
    return dk, dvv


@triton.jit
def _summary_bwd_kv(
    pid, Q, K, V, O, DO, LSE, DELTA, DK, DV, DQ_SUM, SEM,
    pack_start, pack_count, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sol, sod, sdl, sdd, S, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr, DQ_ORDERED: tl.constexpr, PATCH_SEES_SUMMARY: tl.constexpr,
    GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    slide, first, count, lo, hi = _slide_block(pid, slide_pack_start, S, BLOCK_N, CHUNK)
    if count > 0:
        g = tl.load(slide_token_start + slide)
        j = (first - lo) // BLOCK_N  # the key block's place in its slide
        r = tl.arange(0, BLOCK_N)
        key_ok = r < count
        ktok = g + 1 + (first - lo) + r
        k = _rows(K, ktok, skl, skd, key_ok, HEAD_D, BLOCK_D)  # [BLOCK_N, D]
        v = _rows(V, ktok, svl, svd, key_ok, HEAD_DV, BLOCK_DV)  # [BLOCK_N, DV]
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dvv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

        # every summary row of the slide: whole tiles unmasked, then the rest
        n_rows = hi - lo
        n_full = n_rows // BLOCK_M
        qt = g + 1 + tl.arange(0, BLOCK_M)
        qp = lo + tl.arange(0, BLOCK_M)
        lock = SEM + lo // BLOCK_M + slide  # the slide's first row block (meta.slide_blocks numbering)
        for _ in range(n_full):
            dk, dvv = _kv_tile(k, v, dk, dvv, key_ok, j, Q, DO, LSE, DELTA, DQ_SUM, lock, qt, qp, BLOCK_M,
                               sql, sqd, sdl, sdd, qk_scale, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, False, DQ_ORDERED,
                               PREC)
            qt += BLOCK_M
            qp += BLOCK_M
            lock += 1
        if n_full * BLOCK_M < n_rows:
            dk, dvv = _kv_tile(k, v, dk, dvv, key_ok, j, Q, DO, LSE, DELTA, DQ_SUM, lock, qt, qp,
                               n_rows - n_full * BLOCK_M, sql, sqd, sdl, sdd, qk_scale,
                               HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, True, DQ_ORDERED, PREC)

        kf, vf = k.to(tl.float32), v.to(tl.float32)
        if PATCH_SEES_SUMMARY:  # the pack's patch rows, one slot at a time
            kp = tl.where(key_ok, first + r, first)
            pstart = tl.load(pack_start + kp)
            pcnt = tl.load(pack_count + kp)
            for i in range(K2):  # not unrolled: keeps compile time down
                ok = key_ok & (i < pcnt)
                t = pstart + i
                qi = _rows(Q, t, sql, sqd, ok, HEAD_D, BLOCK_D).to(tl.float32)
                doi = _rows(DO, t, sdl, sdd, ok, HEAD_DV, BLOCK_DV).to(tl.float32)
                delta = tl.sum(_rows(O, t, sol, sod, ok, HEAD_DV, BLOCK_DV).to(tl.float32) * doi, 1)
                p, ds = _row_key_ds(qi, doi, tl.load(LSE + t, mask=ok, other=0.0), delta, kf, vf, ok, qk_scale)
                dk += ds[:, None] * qi
                dvv += p[:, None] * doi

        if GLOBAL_SEES_ALL:  # the slide's global row
            qg = _vec(Q, g, sql, sqd, HEAD_D, BLOCK_D)[None, :]
            dog = _vec(DO, g, sdl, sdd, HEAD_DV, BLOCK_DV)[None, :]
            p, ds = _row_key_ds(qg, dog, tl.load(LSE + g), tl.load(DELTA + g), kf, vf, key_ok, qk_scale)
            dk += ds[:, None] * qg
            dvv += p[:, None] * dog

        _store_rows(DK, ktok, HEAD_D, 1, dk * sm_scale, key_ok, HEAD_D, BLOCK_D)
        _store_rows(DV, ktok, HEAD_DV, 1, dvv, key_ok, HEAD_DV, BLOCK_DV)


@triton.jit
def _dq_tile(q, do, lse, delta, dq, K, V, kt, n_ok, skl, skd, svl, svd, qk_scale,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             MASKED: tl.constexpr, PREC: tl.constexpr):
    """dq of rows q from one tile of summary keys kt (the first n_ok real when MASKED)."""
    kok = tl.arange(0, kt.shape[0]) < n_ok
    k = _rows(K, kt, skl, skd, kok, HEAD_D, BLOCK_D, MASKED)  # [BLOCK_N, D]
    v = _rows(V, kt, svl, svd, kok, HEAD_DV, BLOCK_DV, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None]  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(kok[None, :], s, float("-inf"))
    p = tl.math.exp2(s)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def _summary_bwd_dq(
    pid, Q, K, V, DO, LSE, DELTA, DQ_SUM, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sdl, sdd, S, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr,
):
    """dq of BLOCK_M summary rows of one slide from the slide's summary keys, into DQ_SUM."""
    slide, first, count, lo, hi = _slide_block(pid, slide_pack_start, S, BLOCK_M, CHUNK)
    if count > 0:
        g = tl.load(slide_token_start + slide)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < count
        tok = g + 1 + (first - lo) + r
        q = _rows(Q, tok, sql, sqd, row_ok, HEAD_D, BLOCK_D)  # [BLOCK_M, D]
        do = _rows(DO, tok, sdl, sdd, row_ok, HEAD_DV, BLOCK_DV)
        lse = tl.load(LSE + tok, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + tok, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_keys = hi - lo
        n_full = n_keys // BLOCK_N
        kt = g + 1 + tl.arange(0, BLOCK_N)
        for _ in range(n_full):
            dq = _dq_tile(q, do, lse, delta, dq, K, V, kt, BLOCK_N, skl, skd, svl, svd, qk_scale,
                          HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, False, PREC)
            kt += BLOCK_N
        if n_full * BLOCK_N < n_keys:
            dq = _dq_tile(q, do, lse, delta, dq, K, V, kt, n_keys - n_full * BLOCK_N, skl, skd, svl, svd, qk_scale,
                          HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, True, PREC)
        tl.store(DQ_SUM + (first + r)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], dq, mask=row_ok[:, None])


@triton.jit
def _patch_bwd(
    pid, Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, DQ_ROW, PART,
    pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
    sql, sqd, skl, skd, svl, svd, sol, sod, sdl, sdd, S, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, ITERS: tl.constexpr, CHUNK: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    PACKS: tl.constexpr = BLOCK_M // K2
    slide, first, count, lo, hi = _slide_block(pid, slide_pack_start, S, PACKS * ITERS, CHUNK)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    if count > 0:
        g = tl.load(slide_token_start + slide)
        qg = _vec(Q, g, sql, sqd, HEAD_D, BLOCK_D)[None, :]  # [1, D]
        kg = _vec(K, g, skl, skd, HEAD_D, BLOCK_D)[None, :]
        vg = _vec(V, g, svl, svd, HEAD_DV, BLOCK_DV)[None, :]
        dog = _vec(DO, g, sdl, sdd, HEAD_DV, BLOCK_DV)[None, :]
        lse_g = tl.load(LSE + g)
        delta_g = tl.load(DELTA + g)
        gdq = tl.zeros([BLOCK_D], tl.float32)  # this program's part of the global token's dq, dk, dv
        gdk = tl.zeros([BLOCK_D], tl.float32)
        gdv = tl.zeros([BLOCK_DV], tl.float32)
        r = tl.arange(0, BLOCK_M)
        for it in range(ITERS):
            if it * PACKS < count:
                f = first + it * PACKS
                n = tl.minimum(count - it * PACKS, PACKS)
                pk, slot, row_ok, tok = _patch_rows(f, n, pack_start, pack_count, K2, BLOCK_M)
                q = _rows(Q, tok, sql, sqd, row_ok, HEAD_D, BLOCK_D)  # [BLOCK_M, D]
                k = _rows(K, tok, skl, skd, row_ok, HEAD_D, BLOCK_D)
                v = _rows(V, tok, svl, svd, row_ok, HEAD_DV, BLOCK_DV)  # [BLOCK_M, DV]
                do = _rows(DO, tok, sdl, sdd, row_ok, HEAD_DV, BLOCK_DV)
                qf, kf, vf, dof = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32), do.to(tl.float32)
                lse = tl.load(LSE + tok, mask=row_ok, other=0.0)
                delta = tl.sum(_rows(O, tok, sol, sod, row_ok, HEAD_DV, BLOCK_DV).to(tl.float32) * dof, 1)

                # the global key: dq of these rows, and their part of its dk, dv
                p, ds = _row_key_ds(qf, dof, lse, delta, kg, vg, row_ok, qk_scale)
                dq = ds[:, None] * kg  # [BLOCK_M, D]
                gdk += tl.sum(ds[:, None] * qf, 0)
                gdv += tl.sum(p[:, None] * dof, 0)

                stok = tl.load(pack_summary + pk)
                if PATCH_SEES_SUMMARY:  # dq from the pack's summary key (its dk, dv: the summary key programs)
                    ks = _rows(K, stok, skl, skd, row_ok, HEAD_D, BLOCK_D).to(tl.float32)
                    p, ds = _row_key_ds(qf, dof, lse, delta, ks, _rows(V, stok, svl, svd, row_ok, HEAD_DV,
                                                                       BLOCK_DV).to(tl.float32), row_ok, qk_scale)
                    dq += ds[:, None] * ks

                # block-diagonal: rows and keys are the same patch tokens
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_M]
                same_pack = (pk[:, None] == pk[None, :]) & row_ok[:, None] & row_ok[None, :]
                p = tl.math.exp2(tl.where(same_pack, s - lse[:, None], float("-inf")))
                ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
                dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)  # [BLOCK_M, D]
                dvv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)

                # the pack's summary row sees these patch keys and the global key
                qs = _rows(Q, stok, sql, sqd, row_ok, HEAD_D, BLOCK_D).to(tl.float32)
                dos = _rows(DO, stok, sdl, sdd, row_ok, HEAD_DV, BLOCK_DV).to(tl.float32)
                lse_s = tl.load(LSE + stok, mask=row_ok, other=0.0)
                delta_s = tl.load(DELTA + stok, mask=row_ok, other=0.0)
                p, ds = _row_key_ds(qs, dos, lse_s, delta_s, kf, vf, row_ok, qk_scale)
                dk += ds[:, None] * qs
                dvv += p[:, None] * dos
                first_slot = row_ok & (slot == 0)  # one row per pack
                p_g, ds_g = _row_key_ds(qs, dos, lse_s, delta_s, kg, vg, first_slot, qk_scale)
                gdk += tl.sum(ds_g[:, None] * qs, 0)
                gdv += tl.sum(p_g[:, None] * dos, 0)
                # the summary rows' dq from these keys: each pack's slots summed (a one-hot matmul)
                one_hot = ((r // K2)[None, :] == r[:, None]).to(tl.float32)  # [pack slot, row]
                dqs = tl.dot(one_hot, ds[:, None] * kf + ds_g[:, None] * kg, input_precision="ieee")
                tl.store(DQ_ROW + (f + r)[:, None] * BLOCK_D + d[None, :], dqs,
                         mask=(r < n)[:, None])

                if GLOBAL_SEES_ALL:  # the global row sees these patch keys and the packs' summary keys
                    p, ds = _row_key_ds(qg, dog, lse_g, delta_g, kf, vf, row_ok, qk_scale)
                    dk += ds[:, None] * qg
                    dvv += p[:, None] * dog
                    gdq += tl.sum(ds[:, None] * kf, 0)
                    ks = _rows(K, stok, skl, skd, first_slot, HEAD_D, BLOCK_D).to(tl.float32)
                    vs = _rows(V, stok, svl, svd, first_slot, HEAD_DV, BLOCK_DV).to(tl.float32)
                    p, ds = _row_key_ds(qg, dog, lse_g, delta_g, ks, vs, first_slot, qk_scale)
                    gdq += tl.sum(ds[:, None] * ks, 0)

                _store_rows(DQ, tok, HEAD_D, 1, dq * sm_scale, row_ok, HEAD_D, BLOCK_D)
                _store_rows(DK, tok, HEAD_D, 1, dk * sm_scale, row_ok, HEAD_D, BLOCK_D)
                _store_rows(DV, tok, HEAD_DV, 1, dvv, row_ok, HEAD_DV, BLOCK_DV)
        part = PART + pid.to(tl.int64) * (2 * BLOCK_D + BLOCK_DV)  # [dq, dk, dv]
        tl.store(part + d, gdq)
        tl.store(part + BLOCK_D + d, gdk)
        tl.store(part + 2 * BLOCK_D + dv, gdv)


@triton.jit(do_not_specialize=["L", "P", "S", "BH"])
def _bwd(
    Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, DQ_SUM, DQ_ROW, PART, SEM,
    pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod, sdb, sdh, sdl, sdd,
    H, BH, L, P, S, qk_scale, sm_scale,
    K2: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SUMMARY_BLOCK_M: tl.constexpr, SUMMARY_BLOCK_N: tl.constexpr, DQ_ORDERED: tl.constexpr,
    SUMMARY_DQ_BLOCK_M: tl.constexpr, SUMMARY_DQ_BLOCK_N: tl.constexpr,
    PATCH_BLOCK_M: tl.constexpr, PATCH_ITERS: tl.constexpr, CHUNK: tl.constexpr,
    PATCH_SEES_SUMMARY: tl.constexpr, GLOBAL_SEES_ALL: tl.constexpr, PREC: tl.constexpr,
):
    """Program id = part program * BH + (b, h) slice: summary keys, (without DQ_ORDERED) summary dq, patch."""
    # inductor passes Python floats as fp64; keep the softmax state in fp32
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = pid % BH
    pid = pid // BH
    Q = _slice(Q, pid_bh, H, sqb, sqh)
    K = _slice(K, pid_bh, H, skb, skh)
    V = _slice(V, pid_bh, H, svb, svh)
    O = _slice(O, pid_bh, H, sob, soh)
    DO = _slice(DO, pid_bh, H, sdb, sdh)
    LSE += pid_bh.to(tl.int64) * L
    DELTA += pid_bh.to(tl.int64) * L
    DQ += pid_bh.to(tl.int64) * L * HEAD_D  # grads are contiguous [B, H, L, D]
    DK += pid_bh.to(tl.int64) * L * HEAD_D
    DV += pid_bh.to(tl.int64) * L * HEAD_DV
    DQ_SUM += pid_bh.to(tl.int64) * P * BLOCK_D  # fp32 [B*H, P, BLOCK_D]
    DQ_ROW += pid_bh.to(tl.int64) * P * BLOCK_D
    n_kv = P // SUMMARY_BLOCK_N + S  # meta.slide_blocks
    n_dq = 0 if DQ_ORDERED else P // SUMMARY_DQ_BLOCK_M + S
    n_patch = P // (PATCH_BLOCK_M // K2 * PATCH_ITERS) + S
    if pid < n_kv:
        _summary_bwd_kv(pid, Q, K, V, O, DO, LSE, DELTA, DK, DV, DQ_SUM,
                        SEM + pid_bh.to(tl.int64) * (P // SUMMARY_BLOCK_M + S),
                        pack_start, pack_count, slide_token_start, slide_pack_start,
                        sql, sqd, skl, skd, svl, svd, sol, sod, sdl, sdd, S, qk_scale, sm_scale,
                        K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, SUMMARY_BLOCK_M, SUMMARY_BLOCK_N, CHUNK,
                        DQ_ORDERED, PATCH_SEES_SUMMARY, GLOBAL_SEES_ALL, PREC)
    elif pid < n_kv + n_dq:
        _summary_bwd_dq(pid - n_kv, Q, K, V, DO, LSE, DELTA, DQ_SUM, slide_token_start, slide_pack_start,
                        sql, sqd, skl, skd, svl, svd, sdl, sdd, S, qk_scale,
                        HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, SUMMARY_DQ_BLOCK_M, SUMMARY_DQ_BLOCK_N, CHUNK, PREC)
    else:
        _patch_bwd(pid - n_kv - n_dq, Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, DQ_ROW,
                   PART + pid_bh.to(tl.int64) * n_patch * (2 * BLOCK_D + BLOCK_DV),
                   pack_start, pack_count, pack_summary, slide_token_start, slide_pack_start,
                   sql, sqd, skl, skd, svl, svd, sol, sod, sdl, sdd, S, qk_scale, sm_scale,
                   K2, HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, PATCH_BLOCK_M, PATCH_ITERS, CHUNK,
                   PATCH_SEES_SUMMARY, GLOBAL_SEES_ALL, PREC)


@triton.jit(do_not_specialize=["L", "P", "S", "n_patch"])
def _bwd_merge(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DQ_SUM, DQ_ROW, PART, pack_summary, slide_token_start, slide_pack_start,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sdb, sdh, sdl, sdd,
    H, L, P, S, n_patch, qk_scale, sm_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PATCH_PACKS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Programs 0 .. S-1: the global tokens' dq, dk, dv; then BLOCK packs each: their summary rows' dq."""
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    DQ += pid_bh.to(tl.int64) * L * HEAD_D  # grads are contiguous [B, H, L, D]
    if pid < S:
        DK += pid_bh.to(tl.int64) * L * HEAD_D
        DV += pid_bh.to(tl.int64) * L * HEAD_DV
        g = tl.load(slide_token_start + pid)
        lo = tl.load(slide_pack_start + pid)
        hi = tl.load(slide_pack_start + pid + 1)
        # the slide's patch programs (meta.slide_blocks numbering), in order
        W: tl.constexpr = 2 * BLOCK_D + BLOCK_DV
        part = PART + (pid_bh.to(tl.int64) * n_patch + lo // PATCH_PACKS + pid) * W
        n = (hi - lo + PATCH_PACKS - 1) // PATCH_PACKS
        dq = tl.zeros([BLOCK_D], tl.float32)
        dk = tl.zeros([BLOCK_D], tl.float32)
        dvv = tl.zeros([BLOCK_DV], tl.float32)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            ok = (i < n)[:, None]
            dq += tl.sum(tl.load(part + i[:, None] * W + d[None, :], mask=ok, other=0.0), 0)
            dk += tl.sum(tl.load(part + i[:, None] * W + BLOCK_D + d[None, :], mask=ok, other=0.0), 0)
            dvv += tl.sum(tl.load(part + i[:, None] * W + 2 * BLOCK_D + dv[None, :], mask=ok, other=0.0), 0)
        # the global row on its own key
        qg = _vec(_slice(Q, pid_bh, H, sqb, sqh), g, sql, sqd, HEAD_D, BLOCK_D)
        kg = _vec(_slice(K, pid_bh, H, skb, skh), g, skl, skd, HEAD_D, BLOCK_D)
        vg = _vec(_slice(V, pid_bh, H, svb, svh), g, svl, svd, HEAD_DV, BLOCK_DV)
        dog = _vec(_slice(DO, pid_bh, H, sdb, sdh), g, sdl, sdd, HEAD_DV, BLOCK_DV)
        p = tl.math.exp2(tl.sum(qg * kg, 0) * qk_scale - tl.load(LSE + pid_bh.to(tl.int64) * L + g))
        ds = p * (tl.sum(dog * vg, 0) - tl.load(DELTA + pid_bh.to(tl.int64) * L + g))
        tl.store(DQ + g * HEAD_D + d, ((dq + ds * kg) * sm_scale).to(DQ.dtype.element_ty), mask=d < HEAD_D)
        tl.store(DK + g * HEAD_D + d, ((dk + ds * qg) * sm_scale).to(DK.dtype.element_ty), mask=d < HEAD_D)
        tl.store(DV + g * HEAD_DV + dv, (dvv + p * dog).to(DV.dtype.element_ty), mask=dv < HEAD_DV)
    else:
        pp = (pid - S) * BLOCK + tl.arange(0, BLOCK)
        ok = pp < P
        tok = tl.load(pack_summary + pp, mask=ok, other=0)
        at = pid_bh.to(tl.int64) * P * BLOCK_D + pp[:, None] * BLOCK_D + d[None, :]
        dqs = tl.load(DQ_SUM + at, mask=ok[:, None], other=0.0) + tl.load(DQ_ROW + at, mask=ok[:, None], other=0.0)
        tl.store(DQ + tok[:, None] * HEAD_D + d[None, :], (dqs * sm_scale).to(DQ.dtype.element_ty),
                 mask=ok[:, None] & (d < HEAD_D)[None, :])


LAUNCHES = ("bwd_prep", "bwd", "bwd_merge")


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
    bwd = cfg["bwd"]
    bd, bdv = meta.block_d(d), meta.block_d(dv)
    patch_packs = bwd["PATCH_BLOCK_M"] // k2 * bwd["PATCH_ITERS"]
    n_kv = meta.slide_blocks(p, s, bwd["SUMMARY_BLOCK_N"])
    n_dq = 0 if bwd["DQ_ORDERED"] else meta.slide_blocks(p, s, bwd["SUMMARY_DQ_BLOCK_M"])
    n_patch = meta.slide_blocks(p, s, patch_packs)
    n_sem = meta.slide_blocks(p, s, bwd["SUMMARY_BLOCK_M"]) if bwd["DQ_ORDERED"] else 0
    dq, dk, dvv = (meta.new_buffer(t.shape, t.dtype, t.device) for t in (q, k, v))  # contiguous
    # one fp32 workspace: delta (global and summary rows only), the summary rows' two dq buffers, the patch
    # programs' partials [dq, dk, dv], the semaphores (int32, zeroed by _bwd_prep); each part 128-byte aligned
    sizes = tuple(-(-n // 32) * 32 for n in (b * h * n_tok, b * h * p * bd, b * h * p * bd,
                                              b * h * n_patch * (2 * bd + bdv), max(1, b * h * n_sem)))
    delta, dq_sum, dq_row, part, sem = meta.new_buffer((sum(sizes),), torch.float32, q.device).split(sizes)
    sem = sem.view(torch.int32)

    prep = dict(cfg["bwd_prep"])
    block = prep.pop("BLOCK")
    meta.launch(_bwd_prep, (meta.slide_blocks(p, s, block), b * h), prep,
                o, do, delta, sem, lay.slide_token_start, lay.slide_pack_start, *meta.strides(o), *meta.strides(do),
                h, n_tok, s, n_sem, HEAD_DV=dv, BLOCK_DV=bdv, BLOCK=block, CHUNK=meta.SLIDE_CHUNK)
    meta.launch(_bwd, ((n_kv + n_dq + n_patch) * b * h,), bwd,
                q, k, v, o, do, lse, delta, dq, dk, dvv, dq_sum, dq_row, part, sem, *lay,
                *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(o), *meta.strides(do),
                h, b * h, n_tok, p, s, scale * meta.LOG2E, scale,
                K2=k2, HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, CHUNK=meta.SLIDE_CHUNK,
                PREC=meta.dot_precision(q.dtype), **flags.constexprs())
    merge = dict(cfg["bwd_merge"])
    block = merge.pop("BLOCK")
    meta.launch(_bwd_merge, (s + meta.cdiv(p, block), b * h), merge,
                q, k, v, do, lse, delta, dq, dk, dvv, dq_sum, dq_row, part, lay.pack_summary_token,
                lay.slide_token_start, lay.slide_pack_start,
                *meta.strides(q), *meta.strides(k), *meta.strides(v), *meta.strides(do),
                h, n_tok, p, s, n_patch, scale * meta.LOG2E, scale,
                HEAD_D=d, HEAD_DV=dv, BLOCK_D=bd, BLOCK_DV=bdv, PATCH_PACKS=patch_packs, BLOCK=block)
    return dq, dk, dvv
