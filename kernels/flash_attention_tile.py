"""The one-tile Triton attention kernels (memk.kernels.flash_attention launches them): short
sequences, forward up to ONE_TILE_MAX_SEQ and backward up to ONE_TILE_MAX_SEQ_BACKWARD tokens.

A program takes HEADS (batch, head) pairs and holds each one's whole (SEQ_BLOCK x SEQ_BLOCK) score
tile: the forward is one plain softmax, the backward computes dq, dk and dv in one pass. Scores
are in base 2 (qk_scale = scale·log2 e); head_dim is padded (masked) to D_BLOCK, a power of two >= 16.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_runtime import autotune_configs

# ---------------------------------------------------------------------------------------------
# One-tile kernels: short sequences. A program loops over HEADS (batch, head) pairs and
# holds each one's whole (SEQ_BLOCK x SEQ_BLOCK) tile.
# ---------------------------------------------------------------------------------------------

_TILE_CONFIGS = autotune_configs(
    [triton.Config({"HEADS": h}, num_warps=w, num_stages=1) for h, w in [(1, 4), (2, 4), (4, 4), (1, 8), (2, 2), (4, 2)]],
    triton.Config({"HEADS": 2}, num_warps=4, num_stages=1),
)


def _prune_tile_configs(configs, named_args, **kwargs):
    # Several heads per program pays off only for small tiles (the many-small-heads case); for big
    # ones the unrolled head loop only costs compile time (and the autotuner compiles every config).
    args = {**named_args, **kwargs}
    small = args["SEQ_BLOCK"] * args["D_BLOCK"] <= 64 * 64
    return [c for c in configs if small or c.kwargs["HEADS"] == 1]


@triton.jit
def _attn_fwd_tile_one(
    bh, Q, K, V, O, LSE,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    n_head, seq_len, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, SEQ_BLOCK: tl.constexpr, D_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = (bh // n_head).to(tl.int64)
    h = (bh % n_head).to(tl.int64)
    offs_s = tl.arange(0, SEQ_BLOCK)
    offs_d = tl.arange(0, D_BLOCK)
    io_mask = (offs_s[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_s[:, None] * sqs + offs_d[None, :], mask=io_mask, other=0.0)
    k = tl.load(K + b * skb + h * skh + offs_s[:, None] * sks + offs_d[None, :], mask=io_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_s[:, None] * svs + offs_d[None, :], mask=io_mask, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # base-2 scaled scores
    keep = offs_s[None, :] < seq_len
    if CAUSAL:
        keep = keep & (offs_s[None, :] <= offs_s[:, None])
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, 1)  # every row keeps key 0, so m is finite
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / l[:, None]

    tl.store(O + b * sob + h * soh + offs_s[:, None] * sos + offs_d[None, :], o.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_s, (m + tl.log2(l)) * 0.6931471805599453, mask=offs_s < seq_len)


@triton.autotune(
    configs=_TILE_CONFIGS, key=["seq_len", "HEAD_DIM", "CAUSAL"], prune_configs_by={"early_config_prune": _prune_tile_configs}
)
@triton.jit
def attn_fwd_tile(
    Q, K, V, O, LSE,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    n_bh, n_head, seq_len, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, SEQ_BLOCK: tl.constexpr, D_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, HEADS: tl.constexpr,
):
    for i in tl.static_range(HEADS):  # several small heads per program: fewer, fuller programs
        bh = tl.program_id(0) * HEADS + i
        if bh < n_bh:
            _attn_fwd_tile_one(
                bh, Q, K, V, O, LSE, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                n_head, seq_len, qk_scale, CAUSAL, HEAD_DIM, SEQ_BLOCK, D_BLOCK, DOT_PREC,
            )


@triton.jit
def _attn_bwd_tile_one(
    bh, Q, K, V, O, DO, LSE, DQ, DK, DV,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, sdob, sdoh, sdos,
    sdqb, sdqh, sdqs, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    n_head, seq_len, scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, SEQ_BLOCK: tl.constexpr, D_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    b = (bh // n_head).to(tl.int64)
    h = (bh % n_head).to(tl.int64)
    offs_s = tl.arange(0, SEQ_BLOCK)
    offs_d = tl.arange(0, D_BLOCK)
    rows = offs_s[:, None]
    cols = offs_d[None, :]
    io_mask = (rows < seq_len) & (cols < HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + rows * sqs + cols, mask=io_mask, other=0.0)
    k = tl.load(K + b * skb + h * skh + rows * sks + cols, mask=io_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + rows * svs + cols, mask=io_mask, other=0.0)
    o = tl.load(O + b * sob + h * soh + rows * sos + cols, mask=io_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows * sdos + cols, mask=io_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_s, mask=offs_s < seq_len, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(o·do), no separate kernel

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    keep = offs_s[None, :] < seq_len
    if CAUSAL:
        keep = keep & (offs_s[None, :] <= offs_s[:, None])
    p = tl.where(keep, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])  # padded rows: do = 0 and delta = 0, so ds = 0
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * scale

    tl.store(DQ + b * sdqb + h * sdqh + rows * sdqs + cols, dq.to(DQ.dtype.element_ty), mask=io_mask)
    tl.store(DK + b * sdkb + h * sdkh + rows * sdks + cols, dk.to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + b * sdvb + h * sdvh + rows * sdvs + cols, dv.to(DV.dtype.element_ty), mask=io_mask)


@triton.autotune(
    configs=_TILE_CONFIGS, key=["seq_len", "HEAD_DIM", "CAUSAL"], prune_configs_by={"early_config_prune": _prune_tile_configs}
)
@triton.jit
def attn_bwd_tile(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, sdob, sdoh, sdos,
    sdqb, sdqh, sdqs, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
    n_bh, n_head, seq_len, scale, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, SEQ_BLOCK: tl.constexpr, D_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, HEADS: tl.constexpr,
):
    for i in tl.static_range(HEADS):
        bh = tl.program_id(0) * HEADS + i
        if bh < n_bh:
            _attn_bwd_tile_one(
                bh, Q, K, V, O, DO, LSE, DQ, DK, DV,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos, sdob, sdoh, sdos,
                sdqb, sdqh, sdqs, sdkb, sdkh, sdks, sdvb, sdvh, sdvs,
                n_head, seq_len, scale, qk_scale, CAUSAL, HEAD_DIM, SEQ_BLOCK, D_BLOCK, DOT_PREC,
            )
