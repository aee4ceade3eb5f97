"""The CPU kernel's instruction-set paths (16-lane AVX-512, 8-lane AVX2, 4-lane baseline), each against float64.

memk.kernels.fused_logprob.cpu_isa() names the path the kernel runs; every path this CPU can run
is forced in turn here and checked at sizes that exercise its vector body, its partial last
vector and its blocks (rows longer than a block, the max in a later block or in the tail), in
every dtype, with strided rows, ignored targets and -inf, NaN and +inf logits in the body and in
the tail.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess

import pytest
import torch

from memk.kernels import fused_logprob as ce

ISAS = ("avx512", "avx2", "baseline")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Forward: float32 arithmetic relative to log p; gradient: the rounding of its own dtype.
GRAD_EPS = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(scope="module", autouse=True)
def built():
    missing = ce.missing_build_requirements("cpu")
    if missing is not None:
        pytest.skip(f"cannot build the fused kernels here: {missing}")
    ce.load_extension()


@pytest.fixture(autouse=True)
def best_path_after():
    yield
    ce.cpu_isa("best")


def _use(isa: str) -> None:
    try:
        ce.cpu_isa(isa)
    except ValueError as exc:
        pytest.skip(f"this CPU cannot run the {isa} path: {exc}")


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _compiler_is_gcc() -> bool:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return False
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return "clang" not in out.lower() and ("gcc" in out.lower() or "g++" in out.lower() or "free software" in out.lower())


def test_the_best_path_the_cpu_has_is_chosen():
    flags = _cpu_flags()
    if platform.machine() != "x86_64" or flags is None:
        assert ce.cpu_isa() == "baseline"
        return
    if not _compiler_is_gcc():
        pytest.skip("the AVX2 and AVX-512 paths are built by GCC only")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= flags:
        want = "avx512"
    elif {"avx2", "fma"} <= flags:
        want = "avx2"
    else:
        want = "baseline"
    assert ce.cpu_isa() == want
    # a lesser path can be forced, and "best" goes back
    assert ce.cpu_isa("baseline") == "baseline" and ce.cpu_isa() == "baseline"
    assert ce.cpu_isa("best") == want


@pytest.mark.skipif(not platform.system() == "Linux", reason="the kernel is built with OpenMP on Linux")
def test_the_kernel_runs_on_torchs_threads():
    """at::parallel_for is header code: built without OpenMP, the kernel ran every row on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.memk.cpu_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.memk.cpu_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_an_unknown_or_unavailable_path_is_an_error_that_changes_nothing():
    before = ce.cpu_isa()
    with pytest.raises(ValueError, match="choose baseline, avx2 or avx512"):
        ce.cpu_isa("sse9")
    assert ce.cpu_isa() == before
    if before != "avx512":
        with pytest.raises(ValueError, match="up to " + before):
            ce.cpu_isa("avx512")


def _check_against_float64(x: torch.Tensor, t: torch.Tensor, ignore_index: int = -100):
    """cross_entropy(reduction="none") and its gradient under a random upstream, against float64."""
    x = x.detach().requires_grad_(True)
    got = -ce.cross_entropy(x, t, ignore_index=ignore_index, reduction="none")
    x64 = x.detach().double().requires_grad_(True)
    want = -torch.nn.functional.cross_entropy(x64, t, ignore_index=ignore_index, reduction="none")
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=2e-5)
    upstream = torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (got.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    eps = GRAD_EPS[x.dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=eps, atol=eps * float(x64.grad.abs().max()))
    assert torch.all(x.grad[t == ignore_index] == 0)


# 1..65: within one vector group and around it; 511/513/2051: around the blocks (512 elements for
# 4 and 8 lanes, 2048 for 16); 5000: several blocks and a tail.
VOCABS = [1, 3, 16, 17, 63, 64, 65, 511, 513, 2051, 5000]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_matches_float64_at_odd_sizes_and_strided_rows(isa, dtype):
    _use(isa)
    g = torch.Generator().manual_seed(hash((isa, str(dtype))) % 2**31)
    for vocab in VOCABS:
        rows = 13
        wide = (torch.randn(rows, vocab + 7, generator=g, dtype=torch.float64) * 4).to(dtype)
        x = wide[:, 3:3 + vocab]  # rows 7 elements apart, not aligned
        t = torch.randint(0, vocab, (rows,), generator=g)
        t[4] = -100
        _check_against_float64(x, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_finds_a_max_that_comes_late(isa, dtype):
    """Rows that rise: every block raises the running max (the sum is rescaled each time); and rows
    whose max is the very last element (in the partial last vector)."""
    _use(isa)
    vocab = 5000
    ramp = torch.linspace(-30.0, 30.0, vocab, dtype=torch.float64)
    x = torch.stack([ramp, ramp.flip(0), torch.zeros(vocab, dtype=torch.float64), ramp * 0.01]).clone()
    x[2, -1] = 25.0
    x = x.to(dtype)
    t = torch.tensor([vocab - 1, 0, vocab - 1, 1234])
    _check_against_float64(x, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_handles_non_finite_logits_in_the_body_and_the_tail(isa, dtype):
    _use(isa)
    vocab = 70  # 64 in the vector body (every width), 6 in the tail
    x = torch.full((9, vocab), 0.5, dtype=dtype)
    x[0, 13] = float("nan")
    x[1, 67] = float("nan")
    x[2, 20] = float("inf")
    x[3, 69] = float("inf")
    x[4, 9] = float("-inf")
    x[5, 66] = float("-inf")
    x[6] = float("-inf")
    x[7, :] = float("-inf")
    x[7, 68] = 1.0
    x[8, 0] = float("-inf")
    t = torch.tensor([1, 2, 3, 4, 5, 6, 7, 68, 0])
    x = x.requires_grad_(True)
    logp = ce.token_logprobs(x, t)
    logp.sum().backward()
    assert torch.isnan(logp[:4]).all() and torch.isnan(x.grad[:4]).all()
    want = -math.log(69.0)  # one logit of the 70 is -inf: probability 0
    torch.testing.assert_close(logp[4:6].double(), torch.tensor([want, want], dtype=torch.float64), rtol=1e-5, atol=2e-5)
    assert x.grad[4, 9] == 0 and x.grad[5, 66] == 0  # -inf logits: exactly zero gradient
    assert torch.isnan(logp[6])  # a row of -inf
    assert logp[7] == 0 and torch.all(x.grad[7] == 0)  # one finite logit: p = 1
    assert logp[8] == float("-inf")  # the target is -inf


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_is_exact_at_any_offset_and_near_the_float_max(isa):
    _use(isa)
    g = torch.Generator().manual_seed(3)
    for offset in (1e4, 1e6, 1e8):
        x = torch.randn(7, 2051, generator=g, dtype=torch.float64) * 4 + offset
        t = torch.randint(0, 2051, (7,), generator=g)
        _check_against_float64(x.float(), t)
    x = torch.full((2, 10), 3e38)
    x[1, :4] = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, 0.0,
                             torch.finfo(torch.float32).max])
    x[1, 4:] = -3e38
    logp = ce.token_logprobs(x, torch.tensor([3, 0]))
    torch.testing.assert_close(logp.double(), torch.tensor([math.log(0.1), math.log(0.5)], dtype=torch.float64))


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_sums_long_rows_without_losing_small_terms(isa):
    """2^22 logits a row: each lane's float sums stay short (blocks are added in double)."""
    _use(isa)
    vocab = 2**22
    x = torch.randn((2, vocab), generator=torch.Generator().manual_seed(22))
    t = torch.tensor([0, vocab - 1])
    got = ce.token_logprobs(x, t)
    want = torch.log_softmax(x.double(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_every_path_writes_a_gradient_larger_than_the_caches_right(isa):
    """A float32 gradient of 64 MB or more is written with non-temporal stores, from each row's first
    aligned element (rows of 50257 floats start anywhere); the rest of each row by ordinary stores."""
    _use(isa)
    rows, vocab = 335, 50257  # 67 MB
    g = torch.Generator().manual_seed(64)
    x = (torch.randn(rows, vocab, generator=g) * 3).requires_grad_(True)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[3] = -100
    upstream = torch.randn(rows, generator=g)
    (ce.cross_entropy(x, t, reduction="none") * upstream).sum().backward()
    for start in range(0, rows, 40):
        part = slice(start, start + 40)
        x64 = x.detach()[part].double().requires_grad_(True)
        want = torch.nn.functional.cross_entropy(x64, t[part], reduction="none")
        (want * upstream[part].double()).sum().backward()
        # every entry to float32's relative precision (a skipped one, 0 or stale, would stand out)
        torch.testing.assert_close(x.grad[part].double(), x64.grad, rtol=2e-5, atol=1e-30)
    assert torch.all(x.grad[3] == 0)


def test_the_paths_agree():
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(64, 3001, generator=g) * 3).requires_grad_(True)
    t = torch.randint(0, 3001, (64,), generator=g)
    results = {}
    for isa in ISAS:
        try:
            ce.cpu_isa(isa)
        except ValueError:
            continue
        x.grad = None
        logp = ce.token_logprobs(x, t)
        logp.sum().backward()
        results[isa] = (logp.detach(), x.grad.clone())
    assert "baseline" in results
    ref_logp, ref_grad = results["baseline"]
    for isa, (logp, grad) in results.items():
        torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=2e-5, msg=isa)
        torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=2e-6, msg=isa)


def test_a_large_gradient_is_recycled_once_freed_and_never_while_alive():
    """The backward's gradient (16 MB here) goes back to a one-slot cache when freed, and the next one
    of its size takes it, already mapped; memory a live tensor holds is never handed out."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1024, 4096, generator=g).requires_grad_(True)
    t = torch.randint(0, 4096, (1024,), generator=g)
    t[:7] = -100
    x64 = x.detach().double().requires_grad_(True)
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(x64, t), x64)[0]
    ce.cross_entropy(x, t).backward()
    first = x.grad
    x.grad = None
    ce.cross_entropy(x, t).backward()
    assert x.grad.data_ptr() != first.data_ptr()  # `first` is alive: its memory is not reused
    second = x.grad.data_ptr()
    del first
    x.grad = None  # both freed: the newest is kept
    ce.cross_entropy(x, t).backward()
    assert x.grad.data_ptr() == second
    torch.testing.assert_close(x.grad.double(), want, rtol=2e-5, atol=2e-5 * float(want.abs().max()))
    assert torch.all(x.grad[:7] == 0)  # ignored rows are written too, not left as the last call's
    x.grad = None
    torch.ops.memk.cpu_release_cached()
