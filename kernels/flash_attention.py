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

The kernels live beside this file, one family each: flash_attention_tile.py (one tile) and
flash_attention_blocked.py (blocked loops), with what both need of Triton in triton_runtime.py;
this module launches them and registers the ops.

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

import torch
import triton

from . import reference
from .flash_attention_blocked import attn_bwd_delta, attn_bwd_dkdv, attn_bwd_dq, attn_fwd_blocked
from .flash_attention_tile import attn_bwd_tile, attn_fwd_tile
from .interfaces import BackendUnavailable
from .triton_runtime import INTERPRET as _INTERPRET
from .triton_runtime import launch as _launch

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


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs inner dimensions >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: full-precision dots unless the user allowed TF32 for matmuls, as torch does.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # triton's default; ignored for 16-bit operands


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
        _launch(attn_fwd_tile)[lambda meta: (triton.cdiv(n_bh, meta["HEADS"]),)](
            q, k, v, o, lse, *strides, n_bh, n_head, seq_len, scale * LOG2E,
            SEQ_BLOCK=max(16, triton.next_power_of_2(seq_len)), **common,
        )
    else:
        _launch(attn_fwd_blocked)[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), n_bh)](
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
        _launch(attn_bwd_tile)[lambda meta: (triton.cdiv(n_bh, meta["HEADS"]),)](
            q, k, v, o, do, lse, dq, dk, dv, *sq, *sk, *sv, *so, *sdo, *sdq, *sdk, *sdv,
            n_bh, n_head, seq_len, scale, scale * LOG2E,
            SEQ_BLOCK=max(16, triton.next_power_of_2(seq_len)), **common,
        )
        return
    delta = torch.empty((batch, n_head, seq_len), device=q.device, dtype=torch.float32)
    delta_block = 64
    _launch(attn_bwd_delta)[(triton.cdiv(seq_len, delta_block), n_bh)](
        o, do, delta, *so, *sdo, n_head, seq_len, HEAD_DIM=head_dim, D_BLOCK=d_block, BLOCK_M=delta_block,
    )
    _launch(attn_bwd_dkdv)[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), n_bh)](
        q, k, v, do, lse, delta, dk, dv, *sq, *sk, *sv, *sdo, *sdk, *sdv,
        n_head, seq_len, scale, scale * LOG2E, **common,
    )
    _launch(attn_bwd_dq)[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), n_bh)](
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
