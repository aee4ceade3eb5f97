"""Fused attention in Triton (FlashAttention-2 style), forward and backward.

    attention(q, k, v, causal=True, scale=None)       q, k, v: (batch, heads, seq, head_dim)
    attention_packed(qkv, n_head, causal=True, scale=None)
                                                       qkv: (batch, seq, 3·d_model) -> (batch, seq, d_model)

`attention_packed` reads q, k and v straight out of the qkv projection through strides
(last axis [q | k | v], heads contiguous inside each, as memk.kernels.reference.split_heads
reads it) and writes its output as (batch, seq, heads·head_dim), so the model makes no split,
transpose or contiguous copy on either side; its gradient comes back as one (batch, seq,
3·d_model) tensor for the qkv projection.

Two regimes, picked by sequence length:
- short sequences (forward up to ONE_TILE_MAX_SEQ = 128, backward up to
  ONE_TILE_MAX_SEQ_BACKWARD = 64: the memorization shape is 64 tokens): one program holds the whole
  (seq x seq) score tile of a (batch, head) and several heads per program, so forward is one
  plain softmax and backward computes dq, dk and dv in one pass with no second kernel.
- longer sequences: the usual blocked loops with online softmax and a causal early exit;
  backward is a small delta = rowsum(o·do) kernel, a dk/dv kernel and a dq kernel.

The forward saves the row log-sum-exp (natural log, float32, (batch, heads, seq)); backward
recomputes the probabilities from it and never stores the attention matrix. Accumulation is
float32 for float16, bfloat16 and float32 inputs. head_dim may be anything from 1 to 128: it is
padded (masked) up to a power of two >= 16 inside the kernel, so 16/32/64/128 waste nothing.
q, k and v must have the same shape (self-attention: causal means key j <= query i).

Both entry points are torch.library.triton_op custom ops (memk::attention, memk::attention_packed
with their backward ops) so autograd and torch.compile see them. Block sizes (and heads per
program) come from triton.autotune over a few configs keyed on (seq_len, head_dim, causal); the
key is the exact seq_len, so each new length autotunes (and compiles) once per process.

Importing this module imports triton; memk.kernels imports it lazily. On CPU it runs only under
the Triton interpreter (TRITON_INTERPRET=1, for tests), in float32 or float16 (the interpreter's
bfloat16 dots are wrong, so bfloat16 is refused there): otherwise use the "sdpa" or "reference"
attention backends.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import reference
from .interfaces import BackendUnavailable

# exp(x) = exp2(x * LOG2E): the kernels work in base 2. Inside @triton.jit functions it and ln 2
# are written as literals (1.4426950408889634, 0.6931471805599453): jit code reads no plain globals.
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
# Longest sequences the one-tile kernels take; longer ones go to the blocked kernels. The
# one-tile backward holds about ten (seq x head_dim) or (seq x seq) tiles at once, so it stops
# earlier than the forward. Guesses from register budgets, to be tuned on a GPU; tests lower
# them to exercise the blocked kernels on short sequences.
ONE_TILE_MAX_SEQ = 128
ONE_TILE_MAX_SEQ_BACKWARD = 64


def _interpreting() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once: triton.jit decides at decoration time (below) whether kernels are interpreted.
_INTERPRET = _interpreting()


def _configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    # Under the interpreter the autotuner would run (and time) every config on the CPU, which
    # takes minutes; one config is launched directly and still exercises every code path.
    return [interpreter] if _INTERPRET else gpu


def _launch(kernel):
    # wrap_triton lets torch.compile trace the launch; interpreted kernels are launched as they are
    # (older torch rejects them in wrap_triton).
    return kernel if _INTERPRET else torch.library.wrap_triton(kernel)


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs inner dimensions >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision dots unless the user allowed TF32 for matmuls, as torch does.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # triton's default; ignored for 16-bit operands


# ---------------------------------------------------------------------------------------------
# One-tile kernels: short sequences. A program loops over HEADS (batch, head) pairs and
# holds each one's whole (SEQ_BLOCK x SEQ_BLOCK) tile.
# ---------------------------------------------------------------------------------------------

_TILE_CONFIGS = _configs(
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
def _attn_fwd_tile(
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
def _attn_bwd_tile(
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
    return _configs(gpu, triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1))


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
def _attn_fwd_blocked(
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
def _attn_bwd_delta(
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
def _attn_bwd_dkdv(
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
def _attn_bwd_dq(
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


# ---------------------------------------------------------------------------------------------
# Launchers. They take (batch, heads, seq, head_dim) views with unit stride along head_dim and any
# other strides, so the packed entry point passes views into qkv and into its outputs.
# ---------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, o, lse, causal: bool, scale: float) -> None:
    """Write o (like q) and lse (batch, heads, seq) float32 for the 4-d views q, k, v."""
    batch, n_head, seq_len, head_dim = q.shape
    n_bh = batch * n_head
    common = dict(
        CAUSAL=causal, HEAD_DIM=head_dim, D_BLOCK=_head_block(head_dim), DOT_PREC=_dot_precision(q.dtype)
    )
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    if seq_len <= ONE_TILE_MAX_SEQ:
        _launch(_attn_fwd_tile)[lambda meta: (triton.cdiv(n_bh, meta["HEADS"]),)](
            q, k, v, o, lse, *strides, n_bh, n_head, seq_len, scale * LOG2E,
            SEQ_BLOCK=max(16, triton.next_power_of_2(seq_len)), **common,
        )
    else:
        _launch(_attn_fwd_blocked)[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), n_bh)](
            q, k, v, o, lse, *strides, n_head, seq_len, scale * LOG2E, **common,
        )


def _backward(do, q, k, v, o, lse, dq, dk, dv, causal: bool, scale: float) -> None:
    """Write dq, dk, dv (views like q, k, v) from the output gradient do (a view like o)."""
    batch, n_head, seq_len, head_dim = q.shape
    n_bh = batch * n_head
    d_block = _head_block(head_dim)
    common = dict(CAUSAL=causal, HEAD_DIM=head_dim, D_BLOCK=d_block, DOT_PREC=_dot_precision(q.dtype))
    sq, sk, sv, so, sdo = _strides(q), _strides(k), _strides(v), _strides(o), _strides(do)
    sdq, sdk, sdv = _strides(dq), _strides(dk), _strides(dv)
    if seq_len <= ONE_TILE_MAX_SEQ_BACKWARD:
        _launch(_attn_bwd_tile)[lambda meta: (triton.cdiv(n_bh, meta["HEADS"]),)](
            q, k, v, o, do, lse, dq, dk, dv, *sq, *sk, *sv, *so, *sdo, *sdq, *sdk, *sdv,
            n_bh, n_head, seq_len, scale, scale * LOG2E,
            SEQ_BLOCK=max(16, triton.next_power_of_2(seq_len)), **common,
        )
        return
    delta = torch.empty((batch, n_head, seq_len), device=q.device, dtype=torch.float32)
    delta_block = 64
    _launch(_attn_bwd_delta)[(triton.cdiv(seq_len, delta_block), n_bh)](
        o, do, delta, *so, *sdo, n_head, seq_len, HEAD_DIM=head_dim, D_BLOCK=d_block, BLOCK_M=delta_block,
    )
    _launch(_attn_bwd_dkdv)[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), n_bh)](
        q, k, v, do, lse, delta, dk, dv, *sq, *sk, *sv, *sdo, *sdk, *sdv,
        n_head, seq_len, scale, scale * LOG2E, **common,
    )
    _launch(_attn_bwd_dq)[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), n_bh)](
        q, k, v, do, lse, delta, dq, *sq, *sk, *sv, *sdo, *sdq,
        n_head, seq_len, scale, scale * LOG2E, **common,
    )


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # kernels index head_dim with stride 1


def _packed_views(qkv: torch.Tensor, n_head: int):
    """q, k, v as (batch, heads, seq, head_dim) views into qkv (batch, seq, 3·d_model)."""
    batch, seq_len, three_d = qkv.shape
    head_dim = three_d // (3 * n_head)
    return qkv.view(batch, seq_len, 3, n_head, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _heads_view(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(batch, seq, heads·head_dim) -> (batch, heads, seq, head_dim) view."""
    return x.unflatten(-1, (n_head, x.shape[-1] // n_head)).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Custom ops (autograd + torch.compile) and the public functions.
# ---------------------------------------------------------------------------------------------


@torch.library.triton_op("memk::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    _forward(q, k, v, o, lse, causal, scale)
    return o, lse


@torch.library.triton_op("memk::attention_backward", mutates_args=())
def _attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v = _unit_last(do), _unit_last(q), _unit_last(k), _unit_last(v)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _backward(do, q, k, v, o, lse, dq, dk, dv, causal, scale)
    return dq, dk, dv


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _attention_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.memk.attention_backward(do.to(o.dtype), q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


@torch.library.triton_op("memk::attention_packed", mutates_args=())
def _attention_packed_op(
    qkv: torch.Tensor, n_head: int, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = _unit_last(qkv)
    batch, seq_len, three_d = qkv.shape
    q, k, v = _packed_views(qkv, n_head)
    o = torch.empty((batch, seq_len, three_d // 3), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((batch, n_head, seq_len), device=qkv.device, dtype=torch.float32)
    _forward(q, k, v, _heads_view(o, n_head), lse, causal, scale)
    return o, lse


@torch.library.triton_op("memk::attention_packed_backward", mutates_args=())
def _attention_packed_backward_op(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, n_head: int, causal: bool, scale: float
) -> torch.Tensor:
    do, qkv = _unit_last(do), _unit_last(qkv)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)  # one gradient for the qkv projection
    q, k, v = _packed_views(qkv, n_head)
    dq, dk, dv = _packed_views(dqkv, n_head)
    _backward(_heads_view(do, n_head), q, k, v, _heads_view(o, n_head), lse, dq, dk, dv, causal, scale)
    return dqkv


def _attention_packed_setup(ctx, inputs, output):
    qkv, n_head, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.n_head, ctx.causal, ctx.scale = n_head, causal, scale


def _attention_packed_grad(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    dqkv = torch.ops.memk.attention_packed_backward(do.to(o.dtype), qkv, o, lse, ctx.n_head, ctx.causal, ctx.scale)
    return dqkv, None, None, None


_attention_packed_op.register_autograd(_attention_packed_grad, setup_context=_attention_packed_setup)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda" or (_INTERPRET and t.device.type == "cpu"):
        return
    raise RuntimeError(
        f"the triton attention kernel runs on CUDA tensors, got a tensor on {t.device}. "
        "On CPU use the 'sdpa' (torch scaled_dot_product_attention) or 'reference' attention backend; "
        "the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) runs it on CPU for tests only."
    )


def _check_dtype_head_dim(t: torch.Tensor, head_dim: int) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"triton attention takes float16, bfloat16 or float32 inputs, got {t.dtype}; cast first")
    if _INTERPRET and t.dtype == torch.bfloat16:
        # The interpreter's bfloat16 dots come out wrong by orders of magnitude (checked with
        # triton 3.9): refuse rather than return garbage.
        raise TypeError(
            "triton attention cannot run bfloat16 under the Triton interpreter (TRITON_INTERPRET=1), "
            "whose bfloat16 dots are wrong: use float32 or float16 under the interpreter, "
            "and bfloat16 on a CUDA GPU (without TRITON_INTERPRET)"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"triton attention supports head_dim 1..{MAX_HEAD_DIM}, got {head_dim}; "
            "use the 'sdpa' backend (torch.nn.functional.scaled_dot_product_attention) for larger heads"
        )


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(q kᵀ·scale [+ causal mask]) v for q, k, v of shape (batch, heads, seq, head_dim).

    scale defaults to 1/sqrt(head_dim). Returns (batch, heads, seq, head_dim) in q's dtype;
    differentiable in q, k and v.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("q, k and v must be torch tensors")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k and v must all have shape (batch, heads, seq, head_dim), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must share dtype and device, got {q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}"
        )
    _check_device(q)
    _check_dtype_head_dim(q, q.shape[-1])
    if q.numel() == 0:  # nothing to launch; the reference keeps autograd's graph
        return reference.attention(q, k, v, causal=causal, scale=scale)
    o, _ = torch.ops.memk.attention(q, k, v, bool(causal), _resolve_scale(scale, q.shape[-1]))
    return o


def attention_packed(qkv: torch.Tensor, n_head: int, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Attention straight from the fused qkv projection: (batch, seq, 3·d_model) -> (batch, seq, d_model).

    The last axis of qkv is [q | k | v], each d_model = n_head·head_dim with heads contiguous
    (memk.kernels.reference.split_heads); the output is heads merged back, ready for the output
    projection. scale defaults to 1/sqrt(head_dim).
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError("qkv must be a torch tensor")
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"n_head must be a positive integer, got {n_head!r}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * n_head):
        raise ValueError(
            f"qkv must have shape (batch, seq, 3·n_head·head_dim) = (batch, seq, 3·d_model), got {tuple(qkv.shape)} "
            f"with n_head={n_head} (last axis must be divisible by {3 * n_head})"
        )
    _check_device(qkv)
    head_dim = qkv.shape[-1] // (3 * n_head)
    _check_dtype_head_dim(qkv, head_dim)
    if qkv.numel() == 0:  # nothing to launch; the reference keeps autograd's graph
        q, k, v = reference.split_heads(qkv, n_head)
        return reference.merge_heads(reference.attention(q, k, v, causal=causal, scale=scale))
    o, _ = torch.ops.memk.attention_packed(qkv, n_head, bool(causal), _resolve_scale(scale, head_dim))
    return o


def packed_causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """The `triton` attention backend (memk.kernels.packed_attention("triton"))."""
    return attention_packed(qkv, n_head, causal=True)


def load_backend():
    """The `triton` backend's loader: packed_causal_attention, if it can run on this machine."""
    if not (_INTERPRET or torch.cuda.is_available()):
        raise BackendUnavailable(
            "the 'triton' attention backend needs a CUDA device (the Triton interpreter, "
            "TRITON_INTERPRET=1, runs it on CPU for tests only); use 'sdpa' or 'reference' on CPU"
        )
    return packed_causal_attention
