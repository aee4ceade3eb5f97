"""The blocked Triton attention kernels (memk.kernels.flash_attention launches them): sequences
longer than the one-tile kernels take (memk.kernels.flash_attention_tile).

FlashAttention-2's loops: the forward over key blocks with an online softmax and a causal early
exit; the backward as a delta = rowsum(o·do) kernel, a dk/dv kernel over query blocks and a dq
kernel over key blocks, each recomputing probabilities from the saved log-sum-exp.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_runtime import autotune_configs

# ---------------------------------------------------------------------------------------------
# Blocked kernels: longer sequences. Every loop is split into blocks that need no mask
# (fully inside the sequence and, if causal, fully on or below the diagonal) and blocks that do.
# ---------------------------------------------------------------------------------------------


def _blocked_configs(pairs, interpreter_pair):
    gpu = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for m, n in pairs
        for w, st in [(4, 2), (4, 3), (8, 2)]
    ]
    m, n = interpreter_pair
    return autotune_configs(gpu, triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1))


# The forward and dq kernels need BLOCK_M % BLOCK_N == 0, dk/dv needs BLOCK_N % BLOCK_M == 0
# (so the causal diagonal falls on block boundaries). Interpreter pairs differ in M and N to
# exercise that.
_FWD_CONFIGS = _blocked_configs([(64, 32), (64, 64), (128, 32), (128, 64)], (64, 32))
_DQ_CONFIGS = _blocked_configs([(64, 32), (64, 64), (128, 32), (128, 64)], (64, 32))
_DKDV_CONFIGS = _blocked_configs([(32, 64), (64, 64), (32, 128), (64, 128)], (32, 64))


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_d, lo, hi, seq_len, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["seq_len", "HEAD_DIM", "CAUSAL"])
@triton.jit
def attn_fwd_blocked(
    Q, K, V, O, LSE,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    n_head, seq_len, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_head).to(tl.int64)
    h = (bh % n_head).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_BLOCK)
    q_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N  # keys below this need no sequence mask
    hi = seq_len
    if CAUSAL:
        full_end = tl.minimum(full_end, start_m)  # blocks left of the diagonal block (BLOCK_M % BLOCK_N == 0)
        hi = tl.minimum(start_m + BLOCK_M, seq_len)  # causal early exit
    # Unmasked blocks first: the masked block(s) hold key 0 only when full_end == 0, so m_i is
    # finite after the first block either way.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_d, 0, full_end, seq_len, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PREC,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, sks, svs, offs_m, offs_d, full_end, hi, seq_len, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PREC,
    )
    o = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < seq_len)


@triton.jit
def attn_bwd_delta(
    O, DO, DELTA, sob, soh, sos, sdob, sdoh, sdos, n_head, seq_len,
    HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_head).to(tl.int64)
    h = (bh % n_head).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_BLOCK)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sdos, offs_n, offs_d, lo, hi,
    seq_len, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Works on transposed scores sT = k qᵀ (BLOCK_N x BLOCK_M) so no tile needs a transpose but q's.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        if MASKED:
            keep = row_ok[None, :] & (offs_n[:, None] < seq_len)
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(keep, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["seq_len", "HEAD_DIM", "CAUSAL"])
@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos,
    sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    n_head, seq_len, scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // n_head).to(tl.int64)
    h = (bh % n_head).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_BLOCK)
    kv_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + bh.to(tl.int64) * seq_len
    delta_base = DELTA + bh.to(tl.int64) * seq_len

    dk = tl.zeros([BLOCK_N, D_BLOCK], tl.float32)
    dv = tl.zeros([BLOCK_N, D_BLOCK], tl.float32)
    full_end = (seq_len // BLOCK_M) * BLOCK_M  # query blocks below this need no sequence mask
    lo = 0
    diag_end = 0
    if CAUSAL:
        lo = start_n  # queries before this key block see none of it (BLOCK_N % BLOCK_M == 0)
        diag_end = tl.minimum(start_n + BLOCK_N, seq_len)  # query blocks crossing the diagonal
    # Causal diagonal blocks, then blocks wholly below it, then the ragged tail of the sequence.
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sdos, offs_n, offs_d, lo, diag_end,
        seq_len, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_M, DOT_PREC,
    )
    mid = tl.maximum(diag_end, lo)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sdos, offs_n, offs_d, mid,
        tl.maximum(full_end, mid), seq_len, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_M, DOT_PREC,
    )
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sdos, offs_n, offs_d,
        tl.maximum(full_end, mid), seq_len, seq_len, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_M, DOT_PREC,
    )
    dk *= scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d, lo, hi, seq_len, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["seq_len", "HEAD_DIM", "CAUSAL"])
@triton.jit
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdob, sdoh, sdos, sdqb, sdqh, sdqs,
    n_head, seq_len, scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_head).to(tl.int64)
    h = (bh % n_head).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_BLOCK)
    row_ok = offs_m < seq_len
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    hi = seq_len
    if CAUSAL:
        full_end = tl.minimum(full_end, start_m)
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d, 0, full_end, seq_len, qk_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PREC,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, sks, svs, offs_m, offs_d, full_end, hi, seq_len, qk_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PREC,
    )
    dq *= scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
