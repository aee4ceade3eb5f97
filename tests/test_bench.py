"""The benchmark suite's own checks: it runs, its JSON is complete, ratios use the right
baseline, and a kernel with a wrong answer is refused before it is timed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from memk import kernels
from memk.bench import cases as C
from memk.bench import report as R
from memk.bench import run
from memk.bench.case import candidate_attention_backends, candidate_logprob_backends
from memk.bench.cli import bench
from memk.bench.common import format_bytes, format_rate, format_time
from memk.bench.suite_attention import attention_groups
from memk.bench.suite_logprob import logprob_groups
from memk.kernels import backends, reference

CPU = torch.device("cpu")
ENV_FIELDS = ("device_type", "device_name", "torch", "triton", "cuda", "torch_threads", "date")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One `memk bench --quick` run over every suite, shared by the tests below."""
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    result = CliRunner().invoke(bench, ["--quick", "--device", "cpu", "--max-time", "0.02", "--json", str(path)])
    assert result.exit_code == 0, result.output
    with open(path) as f:
        return json.load(f), result.output


def test_quick_run_completes_and_prints_a_table(quick_report):
    report, output = quick_report
    assert set(report["suites"]) == set(C.SUITES)
    assert "speed-up" in output and "peak mem" in output
    statuses = {r["status"] for r in report["results"]}
    assert statuses <= {"ok", "skipped"}
    for suite in C.SUITES:  # every suite measured its baseline
        assert any(r["suite"] == suite and r["status"] == "ok" for r in report["results"]), suite


def test_json_has_every_field(quick_report):
    report, _ = quick_report
    assert report["schema"] == run.SCHEMA
    for field in ENV_FIELDS:
        assert field in report["env"]
    assert report["results"]
    for r in report["results"]:
        assert set(run.RESULT_FIELDS) <= set(r), set(run.RESULT_FIELDS) - set(r)
        assert r["device"] == "cpu" and r["device_name"] and r["torch"] == torch.__version__ and r["date"]
        assert r["dtype"] and r["params"] and r["sweep"]["axis"]
        if r["status"] == "ok":
            assert r["time"]["median_s"] > 0 and r["time"]["rounds"] >= 1
            assert r["memory"]["peak_bytes"] >= 0 and r["memory"]["kind"]
            assert all(e["error"] <= e["tolerance"] for e in r["check"].values())
        else:
            assert r["reason"] and r["time"] is None


def _work(r):
    p = r["params"]
    if "members" in p:  # ensemble cases count model-steps: K runs' steps per call
        return p["members"]
    return p.get("tokens") or p.get("sequences") or p.get("tokens_per_step") or p["batch"] * p["seq"]


def test_throughput_is_work_over_median(quick_report):
    report, _ = quick_report
    for r in report["results"]:
        if r["status"] == "ok":
            assert r["throughput"]["value"] == pytest.approx(_work(r) / r["time"]["median_s"], rel=1e-9)


def test_ratios_are_against_the_named_baselines(quick_report):
    report, _ = quick_report
    by_key = {(r["group"], r["variant"]): r for r in report["results"]}
    checked = 0
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        expected = {}
        for name in r["compare_to"]:
            base = by_key.get((r["group"], name))
            if base is not None and base["status"] == "ok":
                expected[name] = base["time"]["median_s"] / r["time"]["median_s"]
        assert r["ratios"] == pytest.approx(expected)
        checked += len(expected)
    assert checked  # bf16 training is compared with the float32 reference model even without memk kernels
    train = [r for r in report["results"] if r["suite"] == "train" and r["variant"] == "sdpa+reference bfloat16"]
    assert train and train[0]["compare_to"] == ["sdpa+reference float32"]
    for r in report["results"]:  # candidates of kernel suites are compared with every baseline of their group
        if r["suite"] == "logprob" and r["role"] == "candidate":
            assert set(r["compare_to"]) == {"log_softmax+gather", "log_softmax+gather (compile)"} or \
                set(r["compare_to"]) == {"F.cross_entropy", "F.cross_entropy (compile)", "liger:cross_entropy"} or \
                set(r["compare_to"]) == {"log_softmax+gather+sum", "log_softmax+gather+sum (compile)"} or \
                set(r["compare_to"]) == {"linear+log_softmax+gather", "linear+log_softmax+gather (compile)"}


def test_compute_ratios_divides_baseline_by_candidate():
    def rec(variant, median, compare_to=(), status="ok"):
        return {"group": "g", "variant": variant, "status": status, "compare_to": list(compare_to),
                "time": {"median_s": median} if status == "ok" else None, "ratios": {}, "ratio_vs_best_baseline": None}

    records = [rec("slow", 4.0), rec("fast", 1.0), rec("gone", None, status="skipped"),
               rec("memk", 2.0, ("slow", "fast", "gone"))]
    run.compute_ratios(records)
    assert records[3]["ratios"] == {"slow": 2.0, "fast": 0.5}
    assert records[3]["ratio_vs_best_baseline"] == 0.5
    assert records[0]["ratios"] == {}


def test_scaling_exponent_of_a_power_law():
    recs = [{"status": "ok", "suite": "s", "family": "f", "variant": "v", "sweep": {"axis": "tokens", "value": n},
             "time": {"median_s": 1e-9 * n ** 1.5}} for n in (1024, 4096, 16384)]
    (s,) = run.scaling(recs)
    assert s["exponent"] == pytest.approx(1.5)


def test_times_rates_and_sizes_have_three_significant_digits_in_the_largest_unit_reached():
    assert [format_time(s) for s in (1.5, 0.0512345, 0.00821, 1.44e-5)] == ["1.5 s", "51.2 ms", "8.21 ms", "14.4 µs"]
    assert format_time(0.9996) == "1000 ms" and format_time(1234.5) == "1234 s"  # never an exponent
    assert format_rate(942570, "tokens/s") == "943 ktokens/s" and format_rate(0.5, "sequences/s") == "0.5 sequences/s"
    assert [format_bytes(n) for n in (None, 0, 512, 40 * 1024, 1571 * 2**20)] == ["–", "0 B", "512 B", "40 KiB", "1.53 GiB"]


# ---- wrong, missing and unavailable kernels -----------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """Register test-only backends for one test; the registry is restored afterwards."""
    monkeypatch.setattr(backends, "_LOGPROB_LOADERS", dict(backends._LOGPROB_LOADERS))
    monkeypatch.setattr(backends, "_ATTENTION_LOADERS", dict(backends._ATTENTION_LOADERS))
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    return backends


class _WrongGradient(torch.autograd.Function):
    """Right forward, gradient 5% too large: only the backward check can catch it."""

    @staticmethod
    def forward(ctx, logits, targets):
        ctx.save_for_backward(logits, targets)
        return reference.token_logprobs(logits, targets)

    @staticmethod
    def backward(ctx, grad):
        logits, targets = ctx.saved_tensors
        probs = torch.softmax(logits.float(), -1)
        onehot = torch.nn.functional.one_hot(targets.long(), logits.shape[-1]).float()
        return (1.05 * grad.unsqueeze(-1) * (onehot - probs)).to(logits.dtype), None


def _run_logprob(backends_, op, backward, with_baseline=False):
    groups = [g for g in logprob_groups(CPU, ["float32"], quick=True, backends=backends_)
              if g.params["op"] == op and (g.params["pass"] == "fwd+bwd") == backward]
    wanted = None if with_baseline else (lambda c: c.variant.role == "candidate")
    return run.run_groups(groups, CPU, run.RunOptions(max_time=0.01), case_filter=wanted)["results"]


def test_wrong_forward_is_refused_before_timing(registry):
    registry.register_logprob_backend("bench-wrong", lambda: kernels.LogprobOps(
        lambda x, t: reference.token_logprobs(x, t) + 1e-3,  # off by a thousandth of a nat (~5e-5 relative)
        reference.cross_entropy, reference.sequence_bits))
    results = _run_logprob(["bench-wrong"], "token_logprobs", backward=False, with_baseline=True)
    wrong = next(r for r in results if r["variant"] == "memk:bench-wrong")
    assert wrong["status"] == "refused" and wrong["time"] is None and wrong["throughput"] is None
    assert wrong["check"]["output"]["error"] > wrong["check"]["output"]["tolerance"]
    assert "refused before timing" in wrong["reason"]
    baseline = next(r for r in results if r["variant"] == "log_softmax+gather")
    assert baseline["status"] == "ok"  # the rest of the group still runs


def test_wrong_gradient_is_refused(registry):
    registry.register_logprob_backend("bench-wrong-grad", lambda: kernels.LogprobOps(
        _WrongGradient.apply, reference.cross_entropy, reference.sequence_bits))
    fwd = next(r for r in _run_logprob(["bench-wrong-grad"], "token_logprobs", False) if r["role"] == "candidate")
    bwd = next(r for r in _run_logprob(["bench-wrong-grad"], "token_logprobs", True) if r["role"] == "candidate")
    assert fwd["status"] == "ok"  # its forward is right
    assert bwd["status"] == "refused" and bwd["time"] is None
    assert bwd["check"]["grad_logits"]["error"] > bwd["check"]["grad_logits"]["tolerance"]


def test_nan_answer_is_refused(registry):
    registry.register_logprob_backend("bench-nan", lambda: kernels.LogprobOps(
        reference.token_logprobs, lambda x, t, **kw: reference.cross_entropy(x, t, **kw) * float("nan"),
        reference.sequence_bits))
    (r,) = [r for r in _run_logprob(["bench-nan"], "cross_entropy", False) if r["role"] == "candidate"]
    assert r["status"] == "refused"


def test_wrong_attention_is_refused(registry):
    registry.register_attention_backend("bench-wrong", lambda: lambda qkv, n_head: reference.packed_causal_attention_sdpa(qkv, n_head) * 1.001)
    groups = [g for g in attention_groups(CPU, ["float32"], quick=True, backends=["bench-wrong"])
              if g.params["pass"] == "fwd" and g.params["head_dim"] == 32]
    results = run.run_groups(groups, CPU, run.RunOptions(max_time=0.01),
                             case_filter=lambda c: c.variant.role == "candidate")["results"]
    wrong = next(r for r in results if r["variant"] == "memk:bench-wrong")
    assert wrong["status"] == "refused" and wrong["time"] is None


def test_missing_and_unavailable_backends_are_skipped_with_the_reason(registry):
    def unavailable():
        raise kernels.BackendUnavailable("no compiler here; use the reference backend")

    registry.register_logprob_backend("bench-unavailable", unavailable)
    results = _run_logprob(["bench-unavailable", "bench-not-registered"], "cross_entropy", False, with_baseline=True)
    by_variant = {r["variant"]: r for r in results}
    assert by_variant["memk:bench-unavailable"]["status"] == "skipped"
    assert "no compiler here" in by_variant["memk:bench-unavailable"]["reason"]
    assert by_variant["memk:bench-not-registered"]["status"] == "skipped"
    assert "not registered" in by_variant["memk:bench-not-registered"]["reason"]
    assert by_variant["F.cross_entropy"]["status"] == "ok"


def test_memk_backends_are_benchmarked_when_they_run_here(quick_report):
    """memk's fused log-prob backend is a candidate always; where it loads, its cases are timed."""
    report, _ = quick_report
    assert "fused" in candidate_logprob_backends() and "reference" not in candidate_logprob_backends()
    assert "triton" in candidate_attention_backends()
    fused = [r for r in report["results"] if r["variant"] in ("memk:fused", "sdpa+fused float32")]
    assert fused
    try:
        kernels.logprob_ops("fused")
    except (ValueError, kernels.BackendUnavailable) as exc:
        assert all(r["status"] == "skipped" for r in fused), exc
    else:
        assert all(r["status"] == "ok" for r in fused), [(r["id"], r["reason"]) for r in fused if r["status"] != "ok"]


# ---- the other front ends -----------------------------------------------------------------


def test_cli_rejects_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(bench, ["--device", "cuda", "--quick"])
    assert result.exit_code != 0 and "no CUDA device" in result.output


def test_pytest_benchmark_collects_the_same_cases():
    front_end = Path(__file__).parent / "benchmarks" / "bench_cases.py"  # run by name: not a test_*.py
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(front_end), "--collect-only", "-q", "--memk-quick", "--memk-device", "cpu",
         "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=120, cwd=front_end.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    collected = {line.split("[", 1)[1].rstrip("]") for line in out.stdout.splitlines() if "test_case[" in line}
    expected = {c.id for c in C.cases_for(C.groups_for(list(C.SUITES), CPU, quick=True))}
    assert collected == expected


def test_report_rewrites_only_the_marked_section(quick_report, tmp_path):
    report, _ = quick_report
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.json").write_text(json.dumps(report))
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# memk\n\nintro\n\n{R.START}\nold table\n{R.END}\n\nafter\n")
    result = CliRunner().invoke(R.main, ["--results", str(results), "--doc", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert text.startswith("# memk\n\nintro\n\n" + R.START) and text.endswith(R.END + "\n\nafter\n")
    assert "old table" not in text
    section = text.split(R.START)[1].split(R.END)[0]
    assert report["env"]["device_name"] in section and "torch " + torch.__version__ in section
    assert "GPU rows are owed" in section
    # Links are relative to the file they are written into: the page's to ../results/, SUMMARY.md's to itself.
    assert "[json](../results/cpu.json)" in section and "[bench/results/](../results/)" in section
    summary = (results / "SUMMARY.md").read_text()
    assert "[json](cpu.json)" in summary and "[bench/results/](./)" in summary
    with pytest.raises(ValueError, match="markers"):
        R.replace_section("no markers", "x")


def test_the_headline_shows_the_largest_size_that_ran_not_one_skipped_for_memory():
    def result(value, status):
        return {"suite": "train", "family": "ensemble step B512", "group": f"g{value}", "status": status,
                "sweep": {"axis": "members", "value": value}}

    ran = [result(1, "ok"), result(4, "ok"), result(16, "skipped"), result(64, "skipped")]
    assert R._headline_groups(ran) == ["g4"]
    assert R._headline_groups([result(16, "skipped"), result(64, "skipped")]) == ["g64"]  # nothing ran: the largest


# ---- the command line: issue 11's bench items -----------------------------------------------


def test_bench_help_imports_no_torch():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from memk.cli.main import cli\n"
            "result = CliRunner().invoke(cli, ['bench', '--help'])\n"
            "assert result.exit_code == 0, result.output\n"
            "assert '--preset' in result.output and '--quick' in result.output\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_torch_free_names_match_the_suites():
    from memk.bench import choices
    from memk.bench.case import TORCH_DTYPES

    assert choices.DTYPE_NAMES == tuple(TORCH_DTYPES)
    assert choices.SUITES == tuple(C._BUILDERS)
    for preset in choices.PRESETS:
        assert C.groups_for(["logprob"], CPU, quick=True, preset=preset)


def test_quick_duration_in_help_is_the_benchmarks_pages_figure():
    from memk.bench.cli import QUICK_DURATION, QUICK_HELP

    page = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md").read_text()  # the checkout's
    bench_section = page.split("## `memk bench`", 1)[1]
    assert QUICK_DURATION in QUICK_HELP and f"`--quick` takes {QUICK_DURATION}" in " ".join(bench_section.split())


def test_json_path_that_cannot_be_written_fails_before_anything_runs(tmp_path, monkeypatch):
    from memk.bench.cli import json_path_problem

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert "is a file, not a folder" in json_path_problem(str(a_file / "out.json"))
    assert "is a file, not a folder" in json_path_problem(str(a_file / "deeper" / "out.json"))
    assert "does not exist; create it (mkdir -p" in json_path_problem(str(tmp_path / "new" / "out.json"))
    assert "is a folder" in json_path_problem(str(tmp_path))
    assert json_path_problem(str(tmp_path / "out.json")) is None

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before the --json path was checked")

    monkeypatch.setattr(run, "run_groups", must_not_run)
    result = CliRunner().invoke(bench, ["--quick", "--device", "cpu", "--json", str(a_file / "out.json")])
    assert result.exit_code == 2
    assert "is a file, not a folder" in result.output and "memk bench:" not in result.output


def test_each_result_is_printed_once(quick_report):
    report, output = quick_report
    lines = output.splitlines()
    # A table row's cells are two or more spaces apart: group, variant, median, ... on a wide terminal;
    # on a narrow one each group is a heading line and its rows (variant, median, ...) are indented below it.
    rows, heading = [], None
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if line and not line[0].isspace() and len(cells) == 1:
            heading = cells[0]
        rows.append((cells if not line[:1].isspace() else [heading, *cells]))
    checked = 0
    for r in report["results"]:
        if r["status"] == "ok":
            median = format_time(r["time"]["median_s"])
            showing = [cells for cells in rows if cells[:3] == [r["group"], r["variant"], median]]
            assert len(showing) == 1, (r["id"], showing)
            checked += 1
    assert checked
    # progress names each case once, before it runs
    assert sum(1 for line in lines if re.match(r"\[\d+/\d+\] ", line)) == len(report["results"])


def test_sdpa_backends_without_a_cpu_kernel_say_cuda_only(quick_report):
    report, _ = quick_report
    cuda_only = [r for r in report["results"]
                 if r["variant"] in ("sdpa:efficient_attention", "sdpa:cudnn_attention")]
    assert cuda_only
    for r in cuda_only:
        assert r["status"] == "skipped"
        assert "runs on CUDA only" in r["reason"] and "No viable backend" not in r["reason"]


def test_an_interrupted_run_keeps_and_writes_the_finished_cases(tmp_path, monkeypatch):
    calls = []
    real_run_case = run.run_case

    def run_case_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("SIGTERM")
        return real_run_case(*args, **kwargs)

    monkeypatch.setattr(run, "run_case", run_case_then_interrupt)
    path = tmp_path / "partial.json"
    result = CliRunner().invoke(bench, ["--quick", "--device", "cpu", "--suite", "logprob", "--max-time", "0.01",
                                        "--json", str(path)])
    assert result.exit_code == 1
    report = json.loads(path.read_text())
    assert len(report["results"]) == 2
    assert report["interrupted"].startswith("interrupted (SIGTERM) after 2 of ")
    assert "interrupted" in result.output


def test_sigterm_becomes_an_interruption():
    import signal

    from memk.bench.cli import _sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) == before


def test_report_of_a_cuda_run_names_the_device_in_every_row(quick_report, tmp_path):
    """A made-up CUDA-shaped report (never committed): the page's rows are GPU rows."""
    report, _ = quick_report
    fake = json.loads(json.dumps(report))
    gpu = "NVIDIA H100 80GB HBM3"
    fake["env"].update(device_type="cuda", device_name=gpu, cuda="13.0")
    for r in fake["results"]:
        r.update(device="cuda", device_name=gpu)
        if r["status"] == "ok" and r["suite"] == "train":
            r["tflops"] = 1.0
            r["mfu"] = {"value": 1.0 / 989, "peak_tflops": 989.0, "peak_source": "H100 SXM datasheet, dense float32"}
    results = tmp_path / "results"
    results.mkdir()
    (results / "h100.json").write_text(json.dumps(fake))
    page = tmp_path / "benchmarks.md"
    page.write_text(f"{R.START}\n{R.END}\n")
    result = CliRunner().invoke(R.main, ["--results", str(results), "--doc", str(page)])
    assert result.exit_code == 0, result.output
    section = page.read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| suite")]
    assert rows and all(f"| {gpu} |" in row for row in rows)
    assert "GPU rows are owed" not in section
    assert "MFU" in section and "CUDA 13.0" in section


def test_cpu_timing_stops_when_calls_turn_slower_than_planned():
    """Rounds are planned from one call; if later calls are slower (a busy machine), timing stops
    at twice its budget instead of running the planned rounds out."""
    import time

    from memk.bench import timing

    calls = []

    def fast_once_then_slow():
        calls.append(1)
        time.sleep(0.001 if len(calls) == 1 else 0.02)

    t = timing.time_cpu(fast_once_then_slow, max_time=0.1, min_rounds=3, warmup_time=0.0)
    assert t.iterations_per_round == 1
    # planned from the 1 ms first call: 100 rounds of 20 ms (2 s); stopped after about 0.2 s
    assert 3 <= t.rounds <= 20


# ---- the terminal table fits the terminal -------------------------------------------------------


def _table_record(group, variant, status="ok", reason=None, ratios=None, role="candidate", device="cpu", tflops=None):
    timed = status == "ok"
    return {"group": group, "variant": variant, "status": status, "reason": reason, "role": role, "device": device,
            "ratios": ratios or {}, "tflops": tflops, "mfu": {"value": 0.123} if tflops else None,
            "time": {"median_s": 0.0256} if timed else None,
            "throughput": {"value": 160e3, "unit": "tokens/s"} if timed else None,
            "memory": {"peak_bytes": 32 * 2**20} if timed else None}


SKIP_REASON = ("No viable backend for scaled_dot_product_attention was found. This is likely due to turning off "
               "both the math kernel and the fused kernels.")
ERROR_REASON = ("the triton attention backend runs on CUDA; on CPU only the test interpreter runs it, and interpreter "
                "timings mean nothing")


def _wide_report():
    group = "logprob/token_logprobs fwd+bwd V50257 float32/tokens=4096"
    results = [
        _table_record(group, "log_softmax+gather+sum (compile)", role="baseline"),
        _table_record(group, "memk:fused", ratios={"log_softmax+gather+sum": 3.07,
                                                   "log_softmax+gather+sum (compile)": 0.73, "liger:cross_entropy": 1.25}),
        _table_record("attention/packed causal fwd+bwd D128 H4 float32/seq=1024", "sdpa:efficient_attention",
                      "skipped", SKIP_REASON),
        _table_record("attention/packed causal fwd+bwd D128 H4 float32/seq=1024", "sdpa:cudnn_attention",
                      "skipped", SKIP_REASON),
        _table_record("attention/packed causal fwd+bwd D128 H4 float32/seq=1024", "memk:triton", "error", ERROR_REASON),
        _table_record("train/train step B32 bfloat16/params=1e6", "sdpa+fused bfloat16", device="cuda", tflops=12.34,
                      ratios={"sdpa+reference float32": 1.5}),
    ]
    env = {"device_name": "AMD EPYC 7B13 64-Core Processor", "device_type": "cpu", "torch_threads": 2,
           "torch": "2.13.0+cpu", "triton": "3.9.0", "cuda": None, "date": "2026-11-25T19:33:01Z"}
    scaling = [{"suite": "attention", "family": "packed causal fwd+bwd D128 H4 float32",
                "variant": "sdpa:flash_attention", "exponent": 0.53, "axis": "seq"}]
    return {"results": results, "env": env, "scaling": scaling}


@pytest.mark.parametrize("width", [80, 120])
def test_the_table_fits_the_width_and_cuts_no_word(width):
    report = _wide_report()
    table = run.format_table(report, width=width)
    lines = table.splitlines()
    assert max(map(len, lines)) <= width, "\n".join(line for line in lines if len(line) > width)
    words = set(table.split())
    for r in report["results"]:  # every word of every cell is there whole
        for text in (r["group"], r["variant"], r["reason"] or "", *r["ratios"]):
            assert set(text.split()) <= words, text
    flat = " ".join(table.split())
    for reason in (SKIP_REASON, ERROR_REASON):  # each reason once, as a note under the table, read back whole
        assert flat.count(reason) == 1
    assert flat.count("skipped [1]") == 2 and flat.count("error [2]") == 1
    assert "[1] " + SKIP_REASON in flat and "[2] " + ERROR_REASON in flat
    assert ("x3.07 vs log_softmax+gather+sum, x0.73 vs log_softmax+gather+sum (compile), "
            "x1.25 vs liger:cross_entropy") in flat
    assert "12.3 TFLOP/s, MFU 12.3%" in flat
    (fused,) = [line for line in lines if line.strip().startswith("memk:fused")]
    assert "25.6 ms" in fused and "160 ktokens/s" in fused and "32 MiB" in fused


def test_a_wide_terminal_keeps_each_case_on_one_line():
    table = run.format_table(_wide_report(), width=250)
    (fused,) = [line for line in table.splitlines() if "memk:fused" in line]
    assert "25.6 ms" in fused and fused.rstrip().endswith("x1.25 vs liger:cross_entropy")


def test_a_logprob_floor_is_the_slower_of_its_memory_traffic_and_its_exps():
    from memk.bench import roofline

    rates = roofline.Rates(read_bytes_per_s=10e9, write_bytes_per_s=5e9, exp_per_s=1e9, read_bytes=1, write_bytes=1,
                           threads=2, isa="avx512")
    fwd = roofline.logprob_floor(1000, 4, backward=False, rates=rates)
    assert fwd["bytes_read"] == 4000 and fwd["bytes_written"] == 0 and fwd["exps"] == 1000
    assert fwd["memory_s"] == pytest.approx(4000 / 10e9) and fwd["exp_s"] == pytest.approx(1000 / 1e9)
    assert fwd["time_s"] == fwd["exp_s"] and fwd["bound"] == "exp"
    both = roofline.logprob_floor(1000, 2, backward=True, rates=rates)  # bfloat16: read twice, gradient written once
    assert both["bytes_read"] == 4000 and both["bytes_written"] == 2000 and both["exps"] == 2000
    assert both["memory_s"] == pytest.approx(4000 / 10e9 + 2000 / 5e9)
    fast_exp = roofline.Rates(**{**roofline.asdict(rates), "exp_per_s": 1e12})
    assert roofline.logprob_floor(1000, 4, backward=False, rates=fast_exp)["bound"] == "memory"


def test_cpu_logprob_cases_are_reported_against_their_floor_with_the_cpus_isa(quick_report):
    report, output = quick_report
    flags = report["env"]["cpu_isa_flags"]
    assert isinstance(flags, list)
    with_floor = 0
    for r in report["results"]:
        assert r["cpu_isa_flags"] == flags
        op_group = r["suite"] == "logprob" and r["params"]["op"] != "linear_cross_entropy"
        if not op_group:
            assert r["floor"] is None and r["fraction_of_floor"] is None
            continue
        floor, rates = r["floor"], r["floor"]["rates"]
        assert rates["isa"] in ("avx512", "avx2", "baseline") and rates["threads"] == report["env"]["torch_threads"]
        if r["params"]["op"] == "head_token_logprobs":  # the head's matmul, then the exps
            assert floor["time_s"] == pytest.approx(floor["matmul_s"] + floor["exp_s"]) and floor["bound"] == "matmul+exp"
            assert rates["matmul_flops_per_s"] > 0 and rates["exp_per_s"] > 0
        else:
            assert floor["time_s"] == max(floor["memory_s"], floor["exp_s"]) > 0
            assert rates["read_bytes_per_s"] > 0 and rates["write_bytes_per_s"] > 0 and rates["exp_per_s"] > 0
            backward = r["params"]["pass"] == "fwd+bwd"
            assert floor["bytes_written"] == (floor["bytes_read"] // 2 if backward else 0)
        if r["status"] == "ok":
            assert r["fraction_of_floor"] == pytest.approx(r["time"]["median_s"] / floor["time_s"])
            with_floor += 1
    assert with_floor
    assert "its floor (" in output and "bench/roofline.py" in output


def test_the_report_names_the_cpus_vector_units():
    assert R.isa_summary(["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"]) == "; AVX-512 with bf16, AMX"
    assert R.isa_summary(["avx2", "fma"]) == "; AVX2"
    assert R.isa_summary([]) == "" and R.isa_summary(None) == ""


def test_memk_backward_memory_counts_the_gradient_it_writes(quick_report):
    """The CPU kernel keeps a freed gradient for the next backward; the memory measurement lets it go first,
    so a forward + backward's peak still counts its gradient (the size of the logits)."""
    report, _ = quick_report
    cases = [r for r in report["results"] if r["suite"] == "logprob" and r["variant"] == "memk:fused"
             and r["params"].get("pass") == "fwd+bwd" and r["status"] == "ok" and "logits_shape" in r["params"]]
    for r in cases:
        n = 1
        for size in r["params"]["logits_shape"]:
            n *= size
        assert r["memory"]["peak_bytes"] >= 0.9 * 4 * n, r["id"]


def test_a_result_file_records_its_command_without_this_machines_paths():
    from memk.bench.run import command_line

    argv = ["/home/me/venv/bin/memk", "bench", "--suite", "train", "--json", "/work/study/cpu.json",
            "--filter", "train step", "--json=/tmp/x/other.json", "relative/out.json"]
    assert command_line(argv) == ("memk bench --suite train --json cpu.json --filter train step "
                                  "--json=other.json relative/out.json")
