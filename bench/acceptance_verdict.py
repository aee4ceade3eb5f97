"""The closing verdict of bench/gpu_acceptance.sh: each of the issue's targets (docs/gpu.md), the
figure measured for it in the run's output folder, and PASS, FAIL or why it was not judged.

The targets are benchmarks, not tests: a missed target is a FAIL row, never a failed stage. In
CPU mode (the results' device is a CPU) the figures are computed the same way and shown, but not
judged: the targets are for an H100.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

# Where the script's stages write, under its output folder.
BENCH_DIR = "bench"
SCIENCE_ALPHA = "science/alpha.json"
PLAN_JSON = "plan/paper.json"
ENV_JSON = "env.json"
DEVICE_SLUG = "device-slug.txt"
VERDICT_MD = "verdict.md"

# The targets (docs/gpu.md).
BANDWIDTH_FACTOR = 1.3  # fused CE fwd+bwd within 1.3x of reading the logits twice and writing the gradient once
CE_VS_EAGER = 2.0
ATTENTION_SEQ64_VS_BEST_SDPA = 1.3
ATTENTION_SEQ1024_VS_FLASH = 0.8
ENSEMBLE_VS_ONE_AT_A_TIME = 5.0  # model-steps/s of an ensemble of 1-layer models at batch 2048 (issue 13)
PAPER_PLAN_HOURS = 24.0  # the paper preset's dry-run estimate "in hours, not days" (issue 13)


@dataclass
class Row:
    target: str
    figure: str
    status: str  # PASS, FAIL, reported (no target to judge), n/a (not measured), cpu (CPU mode: not judged)


def load_bench_results(bench_dir: str) -> tuple[list[dict], dict | None]:
    """Every result of the bench JSON files in a folder, and the environment of the first."""
    results, env = [], None
    for path in sorted(glob.glob(os.path.join(bench_dir, "*.json"))):
        with open(path) as f:
            report = json.load(f)
        if not str(report.get("schema", "")).startswith("memk-bench/"):
            continue
        env = env or report["env"]
        results += report["results"]
    return results, env


def _not_measured(record: dict | None, what: str) -> str:
    if record is None:
        return f"not measured: no {what} in the results"
    return f"not measured: {what} {record['status']}" + (f" ({record['reason']})" if record.get("reason") else "")


def _judge(ok: bool, judged: bool) -> str:
    return ("PASS" if ok else "FAIL") if judged else "cpu"


def _largest_group(records: list[dict]) -> list[dict]:
    """The records of the group with the largest swept size among `records`."""
    if not records:
        return []
    top = max(r["sweep"]["value"] for r in records)
    return [r for r in records if r["sweep"]["value"] == top]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def cross_entropy_rows(results: list[dict], device_name: str, judged: bool) -> list[Row]:
    from .timing import peak_bandwidth

    group = _largest_group([r for r in results if r["suite"] == "logprob" and r["params"].get("op") == "cross_entropy"
                            and r["params"].get("pass") == "fwd+bwd" and r["params"].get("vocab") == 2048
                            and r["dtype"] == "bfloat16"])
    memk = next((r for r in group if r["variant"].startswith("memk:")), None)
    n = group[0]["params"]["tokens"] if group else 131072
    label = f"fused cross-entropy fwd+bwd, N {n:,}, V 2048, bfloat16"
    if memk is None or memk["status"] != "ok":
        reason = _not_measured(memk, "memk's fused cross-entropy")
        return [Row(f"{label}: {t}", reason, "n/a") for t in
                ("within 1.3x of the bandwidth floor", "at least 2x eager PyTorch", "faster than torch.compile",
                 "faster than Liger-Kernel")]
    median = memk["time"]["median_s"]
    rows = []
    peak = peak_bandwidth(device_name)
    if peak is None:
        rows.append(Row(f"{label}: within {BANDWIDTH_FACTOR}x of the bandwidth floor",
                        f"{_ms(median)}; no datasheet bandwidth for {device_name}", "n/a"))
    else:
        floor = 3 * n * 2048 * 2 / peak.bytes_per_s  # read the bf16 logits twice, write the gradient once
        rows.append(Row(f"{label}: within {BANDWIDTH_FACTOR}x of the bandwidth floor",
                        f"{_ms(median)} = {median / floor:.2f}x the floor {_ms(floor)} ({peak.source})",
                        _judge(median / floor <= BANDWIDTH_FACTOR, judged)))
    by_variant = {r["variant"]: r for r in group}
    for name, target, threshold, strict in (
        ("F.cross_entropy", f"at least {CE_VS_EAGER:g}x eager PyTorch", CE_VS_EAGER, False),
        ("F.cross_entropy (compile)", "faster than torch.compile", 1.0, True),
        ("liger:cross_entropy", "faster than Liger-Kernel", 1.0, True),
    ):
        ratio = memk["ratios"].get(name)
        if ratio is None:
            rows.append(Row(f"{label}: {target}", _not_measured(by_variant.get(name), name), "n/a"))
        else:
            ok = ratio > threshold if strict else ratio >= threshold
            rows.append(Row(f"{label}: {target}", f"{ratio:.2f}x {name} ({_ms(median)})", _judge(ok, judged)))
    return rows


def attention_rows(results: list[dict], judged: bool) -> list[Row]:
    attention = [r for r in results if r["suite"] == "attention" and r["params"].get("pass") == "fwd+bwd"]
    # bfloat16 where measured (GPU); the CPU mode runs float32 (Triton's interpreter gets bfloat16 wrong)
    dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in attention) or not attention else attention[0]["dtype"]
    # the long sequence: 1024 on a GPU, shorter in the CPU mode
    long_seq = max((r["params"]["seq"] for r in attention if r["params"].get("seq", 0) > 64), default=1024)
    rows = []
    for seq, head_dim in ((64, 32), (64, 64), (long_seq, 64)):
        group = [r for r in attention if r["params"].get("seq") == seq and r["params"].get("head_dim") == head_dim
                 and r["dtype"] == dtype]
        memk = next((r for r in group if r["variant"] == "memk:triton"), None)
        if seq == 64:
            target = f"Triton attention fwd+bwd, seq 64, head_dim {head_dim}, {dtype}: at least " \
                     f"{ATTENTION_SEQ64_VS_BEST_SDPA}x the best SDPA backend"
        else:
            target = f"Triton attention fwd+bwd, seq {seq}, head_dim 64, {dtype}: at least " \
                     f"{ATTENTION_SEQ1024_VS_FLASH}x SDPA's flash backend"
        if memk is None or memk["status"] != "ok" or not memk["ratios"]:
            rows.append(Row(target, _not_measured(memk, "memk's triton attention"), "n/a"))
            continue
        if seq == 64:
            best_name = min(memk["ratios"], key=memk["ratios"].get)  # the fastest baseline gives the smallest ratio
            ratio = memk["ratios"][best_name]
            rows.append(Row(target, f"{ratio:.2f}x {best_name}, the fastest SDPA backend here",
                            _judge(ratio >= ATTENTION_SEQ64_VS_BEST_SDPA, judged)))
        else:
            ratio = memk["ratios"].get("sdpa:flash_attention")
            if ratio is None:
                flash = next((r for r in group if r["variant"] == "sdpa:flash_attention"), None)
                rows.append(Row(target, _not_measured(flash, "sdpa:flash_attention"), "n/a"))
            else:
                rows.append(Row(target, f"{ratio:.2f}x sdpa:flash_attention",
                                _judge(ratio >= ATTENTION_SEQ1024_VS_FLASH, judged)))
    return rows


def train_rows(results: list[dict], judged: bool) -> list[Row]:
    rows = []
    train = [r for r in results if r["suite"] == "train" and not _is_ensemble(r)]
    for key in dict.fromkeys(r["group"] for r in train):
        group = [r for r in train if r["group"] == key]
        name = group[0]["params"].get("name", key)
        best_by_dtype = {}
        for dtype in ("float32", "bfloat16"):
            reference = f"sdpa+reference {dtype}"
            memk = [r for r in group if r["dtype"] == dtype and r["status"] == "ok"
                    and not r["variant"].startswith("sdpa+reference") and reference in r["ratios"]]
            target = f"training step of {name}, {dtype}: memk's backends faster than plain PyTorch"
            if not memk:
                rows.append(Row(target, "not measured: no memk variant ran in this dtype", "n/a"))
                continue
            best = max(memk, key=lambda r: r["ratios"][reference])
            best_by_dtype[dtype] = best
            compiled = best["ratios"].get(f"{reference} (compile)")
            figure = f"{best['variant']}: {best['ratios'][reference]:.2f}x eager" + (
                f", {compiled:.2f}x torch.compile" if compiled is not None else ", torch.compile not measured")
            rows.append(Row(target, figure, _judge(best["ratios"][reference] > 1.0, judged)))
        if len(best_by_dtype) == 2:
            f32, bf16 = best_by_dtype["float32"], best_by_dtype["bfloat16"]
            rows.append(Row(f"training step of {name}: bfloat16 against float32 (memk's fastest of each)",
                            f"bfloat16 {_ms(bf16['time']['median_s'])}, float32 {_ms(f32['time']['median_s'])}: "
                            f"{f32['time']['median_s'] / bf16['time']['median_s']:.2f}x", "reported"))
    if not rows:
        rows.append(Row("training step of the paper's sizes: memk's backends faster than plain PyTorch",
                        "not measured: no train results", "n/a"))
    return rows


def _is_ensemble(record: dict) -> bool:
    return record["family"].startswith("ensemble step")


def ensemble_rows(results: list[dict], judged: bool) -> list[Row]:
    """Per model and dtype, at the largest K measured: the ensemble's model-steps/s over one at a time."""
    from .suite_ensemble import ENSEMBLE, ENSEMBLE_COMPILED, ENSEMBLE_GRAPHED, ONE_AT_A_TIME

    rows = []
    ensembles = [r for r in results if r["suite"] == "train" and _is_ensemble(r)]
    for family in dict.fromkeys(r["family"] for r in ensembles):
        group = _largest_group([r for r in ensembles if r["family"] == family])
        first = group[0]
        target = (f"{first['params']['members']} runs of {first['params']['name']} at batch {first['params']['batch']}, "
                  f"{first['dtype']}: an ensemble at least {ENSEMBLE_VS_ONE_AT_A_TIME:g}x the model-steps/s of one at a time")
        measured = [r for r in group if r["variant"] in (ENSEMBLE, ENSEMBLE_COMPILED, ENSEMBLE_GRAPHED)
                    and r["status"] == "ok"
                    and ONE_AT_A_TIME in r["ratios"]]
        if not measured:
            ensemble = next((r for r in group if r["variant"] == ENSEMBLE), None)
            rows.append(Row(target, _not_measured(ensemble, "the ensemble"), "n/a"))
            continue
        parts = [f"{r['variant']} {r['ratios'][ONE_AT_A_TIME]:.2f}x ({r['throughput']['value']:.4g} model-steps/s)"
                 for r in measured]
        best = max(r["ratios"][ONE_AT_A_TIME] for r in measured)
        rows.append(Row(target, ", ".join(parts), _judge(best >= ENSEMBLE_VS_ONE_AT_A_TIME, judged)))
    return rows


def linear_rows(results: list[dict]) -> list[Row]:
    """memk against the libraries that fuse the classifier matmul (no target: reported)."""
    group = _largest_group([r for r in results if r["suite"] == "logprob"
                            and r["params"].get("op") == "linear_cross_entropy" and r["dtype"] == "bfloat16"])
    memk = next((r for r in group if r["variant"].startswith("linear+memk:")), None)
    if memk is None or memk["status"] != "ok":
        return [Row("classifier matmul + cross-entropy, bfloat16 (against cut-cross-entropy)",
                    _not_measured(memk, "memk's linear+cross-entropy"), "n/a")]
    d = memk["params"]["d_model"]
    parts = [f"{x:.2f}x {name}" for name, x in memk["ratios"].items()]
    missing = [r["variant"] for r in group if r["role"] == "baseline" and r["status"] != "ok"]
    return [Row(f"classifier matmul + cross-entropy fwd+bwd, N {memk['params']['tokens']:,}, d {d}, bfloat16",
                ", ".join(parts) + (f" (not measured: {', '.join(missing)})" if missing else ""), "reported")]


def science_rows(alpha: dict | None) -> list[Row]:
    if alpha is None:
        return [Row("capacity slice (V 2048, S 64): α per precision and bfloat16/float32", "not measured", "n/a")]
    a = alpha["alpha"]
    figure = ", ".join(f"α {p} {v:.2f}" for p, v in sorted(a.items()))
    if alpha["ratio"] is not None:
        figure += f", ratio {alpha['ratio']:.3f}"
    figure += (f" (paper {alpha['paper_alpha']['bfloat16']} / {alpha['paper_alpha']['float32']} = "
               f"{alpha['paper_ratio']:.3f})")
    return [Row("capacity slice (V 2048, S 64): α per precision and bfloat16/float32", figure, "reported")]


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def plan_rows(plan: dict | None, judged: bool) -> list[Row]:
    target = f"`paper` preset: the dry run's estimate at the step caps within {PAPER_PLAN_HOURS:g} h (hours, not days)"
    if plan is None:
        return [Row(target, "not measured", "n/a")]
    figure = (f"{plan['preset']} preset: {_duration(plan['planned_s'])} as planned, "
              f"{_duration(plan['one_at_a_time_s'])} one run at a time (probes took {plan['probe_s']:g} s)")
    return [Row(target, figure, _judge(plan["planned_s"] <= PAPER_PLAN_HOURS * 3600, judged and plan["preset"] == "paper"))]


def verdict_rows(out_dir: str) -> tuple[list[Row], dict | None]:
    results, env = load_bench_results(os.path.join(out_dir, BENCH_DIR))
    judged = env is not None and env["device_type"] == "cuda"
    device_name = env["device_name"] if env else "unknown device"
    alpha, plan = (_read_json(os.path.join(out_dir, name)) for name in (SCIENCE_ALPHA, PLAN_JSON))
    rows = (cross_entropy_rows(results, device_name, judged) + attention_rows(results, judged)
            + train_rows(results, judged) + ensemble_rows(results, judged) + plan_rows(plan, judged)
            + linear_rows(results) + science_rows(alpha))
    return rows, env


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def format_verdict(rows: list[Row], env: dict | None) -> str:
    if env is None:
        head = "No bench results: every benchmark target is unmeasured."
    elif env["device_type"] == "cuda":
        head = f"Targets on {env['device_name']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}):"
    else:
        head = (f"CPU mode on {env['device_name']}: the figures are computed as on a GPU (Triton under its "
                "interpreter) but not judged; the targets are for an H100.")
    lines = [head, "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {r.target} | {r.figure.replace('|', '/')} | {r.status} |" for r in rows]
    return "\n".join(lines)
