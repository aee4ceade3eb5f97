"""The floor of a fused log-prob case on a CPU: the least time its memory traffic and its exps can take on
this machine, from rates measured in the same run, next to the case (`memk bench` reports every time of
such a group as a fraction of it).

A log-prob case moves the logits and takes exps:
  forward              reads the logits once; one exp per logit
  forward + backward   reads them twice (the backward reads them again) and writes the gradient, of
                       the logits' size, once; two exps per logit
Its floor is the larger of the two limits:
  memory   bytes read / read bandwidth + bytes written / write bandwidth
  exp      exps / exp throughput
The rates are measured through memk's CPU kernel's own probes (torch.ops.memk.cpu_probe_*), on the
kernel's threads and instruction set: a streaming read of the case's own logits, copy after copy as
the case cycles through them (so the read meets the same caches as the case's); a streaming write into
a buffer already written once (the first-touch page faults of a fresh allocation, which a case's new
gradient pays, are not in the floor: the write is); and sums of exp over a 2048-float block in L1, the
kernel's inner loop. Each rate is the best of a few tries: the floor is what the machine reached at
that moment, so no case is judged against a rate the machine did not show.

head_token_logprobs (log p(target) from hidden states and the head's weight) is a matmul and then the
log-prob pass over its logits: its floor is the matmul's flops at torch.mm's rate on this machine
(one block of the head, into memory already mapped) plus one exp per logit at the exp rate.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch

PROBE_TRIES = 5
EXP_BLOCK = 2048  # floats summed by one pass of the exp probe (8 KB: in L1)
EXP_PROBE_S = 0.02  # seconds one try of the exp probe aims at
WRITE_BUFFER_MAX = 256 * 2**20  # bytes: a write larger than every cache runs at one rate

# The CPU flags that say which vector units a result ran with (/proc/cpuinfo names).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_isa_flags() -> list[str]:
    """The ISA_FLAGS this CPU has (Linux /proc/cpuinfo; [] where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


@dataclass
class Rates:
    read_bytes_per_s: float
    write_bytes_per_s: float
    exp_per_s: float
    read_bytes: int  # bytes one read try covers (one copy of the logits)
    write_bytes: int
    threads: int  # the threads the kernel's loops run on (torch.ops.memk.cpu_threads)
    isa: str  # the kernel's instruction-set path (memk.kernels.fused_logprob.cpu_isa)


def _best_time(fn, tries: int) -> float:
    fn()  # warm: pages mapped, code loaded
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """x's bytes as a flat float32 tensor (the read probe reads bytes, whatever they hold)."""
    flat = x.detach().reshape(-1)
    if flat.dtype == torch.float32:
        return flat
    raw = flat.view(torch.uint8)
    return raw[: raw.numel() // 4 * 4].view(torch.float32)


def measure_rates(buffers: list[torch.Tensor], tries: int = PROBE_TRIES) -> Rates:
    """Read, write and exp rates of this CPU through the kernel's probes; `buffers` are read in turn
    (a case's rotated copies of its logits, contiguous CPU tensors)."""
    from memk.kernels import fused_logprob

    fused_logprob.load_extension()
    ops = torch.ops.memk
    views = [_as_float32(b) for b in buffers]
    turn = {"i": 0}

    def read():
        ops.cpu_probe_read(views[turn["i"] % len(views)])
        turn["i"] += 1

    read_s = _best_time(read, tries * len(views))
    read_bytes = views[0].numel() * 4

    write_buffer = torch.empty(max(1, min(read_bytes, WRITE_BUFFER_MAX) // 4))
    write_s = _best_time(lambda: ops.cpu_probe_write(write_buffer), tries)
    write_bytes = write_buffer.numel() * 4
    del write_buffer

    return Rates(read_bytes_per_s=read_bytes / read_s, write_bytes_per_s=write_bytes / write_s,
                 exp_per_s=measure_exp_rate(tries), read_bytes=read_bytes, write_bytes=write_bytes,
                 threads=ops.cpu_threads(), isa=fused_logprob.cpu_isa())


def measure_exp_rate(tries: int = PROBE_TRIES) -> float:
    """exps per second of the kernel's exp-and-sum loop over a block in L1, on the kernel's threads."""
    from memk.kernels import fused_logprob

    fused_logprob.load_extension()
    block = -10 * torch.rand(EXP_BLOCK, generator=torch.Generator().manual_seed(0))  # exp(x - max) has x - max <= 0
    t0 = time.perf_counter()
    torch.ops.memk.cpu_probe_exp(block, 64)
    per_pass = max((time.perf_counter() - t0) / 64, 1e-9)
    repeats = max(64, int(EXP_PROBE_S / per_pass))
    exp_s = _best_time(lambda: torch.ops.memk.cpu_probe_exp(block, repeats), tries)
    return EXP_BLOCK * repeats / exp_s


def logprob_floor(n_logits: int, element_bytes: int, backward: bool, rates: Rates) -> dict:
    """The floor of a log-prob case over n_logits logits of element_bytes each: forward, or forward + backward."""
    passes = 2 if backward else 1
    bytes_read = passes * n_logits * element_bytes
    bytes_written = n_logits * element_bytes if backward else 0
    exps = passes * n_logits
    memory_s = bytes_read / rates.read_bytes_per_s + bytes_written / rates.write_bytes_per_s
    exp_s = exps / rates.exp_per_s
    return {
        "time_s": max(memory_s, exp_s),
        "bound": "memory" if memory_s >= exp_s else "exp",
        "memory_s": memory_s,
        "exp_s": exp_s,
        "bytes_read": bytes_read,
        "bytes_written": bytes_written,
        "exps": exps,
        "rates": asdict(rates),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "method": "bench/roofline.py: max(bytes read / read rate + bytes written / write rate, exps / exp rate); "
                  "rates from memk's CPU kernel probes, best of a few tries, in the same run",
    }


def logprob_group_floor(backward: bool):
    """A Group.floor for a log-prob group whose inputs hold "copies" of (logits, targets): measured on CPU, None elsewhere."""

    def floor(inputs: dict, device: torch.device) -> dict | None:
        if device.type != "cpu":
            return None  # a GPU's floor is its datasheet bandwidth (bench/acceptance.py)
        logits = [x for x, _ in inputs["copies"]]
        rates = measure_rates(logits)
        return logprob_floor(logits[0].numel(), logits[0].element_size(), backward, rates)

    return floor


def head_floor(n_tokens: int, vocab: int, d_model: int, matmul_flops_per_s: float, exp_per_s: float) -> dict:
    """The floor of log p(target) from hidden states and a head: the head's matmul at the machine's matmul
    rate, then one exp per logit (the two run one after the other on the same cores, so they add)."""
    flops = 2.0 * n_tokens * vocab * d_model
    matmul_s = flops / matmul_flops_per_s
    exps = n_tokens * vocab
    exp_s = exps / exp_per_s
    return {
        "time_s": matmul_s + exp_s,
        "bound": "matmul+exp",
        "matmul_s": matmul_s,
        "exp_s": exp_s,
        "flops": flops,
        "exps": exps,
        "rates": {"matmul_flops_per_s": matmul_flops_per_s, "exp_per_s": exp_per_s},
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "method": "bench/roofline.py: flops / matmul rate + exps / exp rate; the matmul rate is torch.mm's on one "
                  "block of the head (head_logprob.CPU_BLOCK_BYTES of logits) into memory already mapped, the exp "
                  "rate memk's CPU kernel probe's; best of a few tries, in the same run",
    }


def head_group_floor():
    """A Group.floor for a head_token_logprobs group (inputs: hidden, weight): measured on CPU, None elsewhere."""

    def floor(inputs: dict, device: torch.device) -> dict | None:
        if device.type != "cpu":
            return None
        from memk.kernels import fused_logprob
        from memk.kernels.head_logprob import CPU_BLOCK_BYTES

        hidden, weight = inputs["hidden"], inputs["weight"]
        (n_tokens, d_model), vocab = hidden.shape, weight.shape[0]
        rows = max(1, min(n_tokens, CPU_BLOCK_BYTES // (4 * vocab)))
        block = hidden[:rows]
        out = torch.zeros(rows, vocab, dtype=weight.dtype)  # written once: mapped
        mm_s = _best_time(lambda: torch.mm(block, weight.t(), out=out), PROBE_TRIES)
        result = head_floor(n_tokens, vocab, d_model, 2.0 * rows * vocab * d_model / mm_s, measure_exp_rate())
        result["rates"].update(threads=torch.ops.memk.cpu_threads(), isa=fused_logprob.cpu_isa())
        return result

    return floor
