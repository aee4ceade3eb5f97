"""memk.bench: benchmark cases shared by `memk bench` and pytest-benchmark
(`pytest tests/benchmarks/bench_cases.py --benchmark-only`: the front end lives with the tests,
out of the installed package).

    case.py             what a case is (Group, Variant, Runner, Case, Skip) and what every suite builds with
    suite_logprob.py    the logprob suite's op groups, with its families suite_logprob_linear.py
                        (linear_cross_entropy) and suite_logprob_head.py (head_token_logprobs)
    logprob_float64.py  the logprob suite's float64 truths, a block of rows at a time
    compiled.py         torch.compile'd baselines
    suite_attention.py  the attention suite
    suite_model.py      the train and bits suites (the GPT model)
    anchors.py          other libraries' fused cross-entropy (Liger-Kernel, cut-cross-entropy), where installed
    choices.py          the suites, dtypes and presets the command line offers (no torch)
    cases.py            which cases a run has: suites, default dtypes, presets, selection
    run.py              build, check against float64, time, ratios, JSON, the terminal table
    timing.py           CPU and CUDA timing, peak memory, peak FLOP/s and bandwidth, environment metadata
    common.py           device choice and synchronisation, formatting of times, rates and sizes
    cli.py              `memk bench`
    report.py           the benchmarks page's results (docs/benchmarks.md) and plots from bench/results/*.json
    gpu_acceptance.sh   the GPU acceptance run (and its CPU mode, in CI)
    acceptance.py       its commands: environment, build; with acceptance_junit.py (the tests' counts),
                        acceptance_science.py (α) and acceptance_verdict.py (the targets, the verdict)
    busy_cpu.py         threads on a busy CPU: the thread policy's calibration and the contention target
    ray_vs_local.py     the default capacity preset on two one-thread Ray tasks against the local executor
    preset_wall.py      the default presets' wall-clock several ways, idle or beside busy loops
    command_runs.py     what those two share: whole commands timed, busy loops
    precision_step.py   a run's CPU training step in each precision, and where its time goes
"""
