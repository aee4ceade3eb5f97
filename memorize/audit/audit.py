"""How much a causal language model memorized of your data, per sample, in bits (`memk audit`): audit()
codes the member and non-member texts with the model and its references and writes the outputs.

The model M (say, fine-tuned on the members) and the reference R (the model before fine-tuning)
each code every text whole with their own tokenizer (memorize/audit/scoring.py says which
tokens and how long texts are windowed). Per sample (Morris et al. 2025, PAPER.md):
H(x | M), H(x | R), the unintended memorization mem_U(x) = max(0, H(x | R) - H(x | M)), the
zlib-compressed length and the membership attacks' scores (memorize/audit/attacks.py). Per set and
per attack: audit.json's summary (memorize/audit/summary.py). Each row is written to samples.jsonl
as soon as its sample is coded, and an interrupted audit resumes (memorize/audit/row_store.py).
--fail-if's outcome is audit.json's "fail_if" (memorize/audit/gate.py).

Several references (--reference A --reference B, memorize/audit/references.py): a sample's
reference code length is the shortest of theirs, H(x | R_best) = -log2 max_R p_R(x), as the paper
codes x with whichever model compresses it better; mem_U and the reference attack are given against
that best and against each reference alone. A PEFT adapter as the model (memorize/audit/models.py)
is merged into its base, and the base is the reference when none is given (audit.json's reference
says so in "default_reference").

Extraction (memorize/audit/extraction.py; on unless settings.extract_prefixes is empty): for k in
8, 16, 32, the model given a text's first k tokens decodes greedily up to 32 more; per text the
longest run of the true continuation it reproduces and whether it reproduced all of it; per set the
exact-extraction rate (members against non-members).
"""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import gate
from .attacks import attack_scores, zlib_bits
from .extraction import extract
from .models import load_scoring_model, resolve_dtype
from .recall_dc_pdd import check_recall_shots
from .recall_dc_pdd import prepare as prepare_extra_attacks
from .records import SAMPLES_CSV, data_record, provenance, write_samples_csv
from .references import each_reference_attack, reference_fields, role_names
from .report import write_outputs
from .risk import capacity_risk, load_alpha, load_law
from .row_store import SAMPLES, append_rows, audit_key, load_rows, new_folders, prepare_output, remove_if_empty
from .row_store import text_sha1
from .scoring import score_texts
from .scoring_model import ScoringModel
from .settings import AuditSettings
from .summary import summarize
from ..errors import ConfigError, DiskFull
from ..runtime import cpu_threads_for_flops, progress_bar, resolve_device
from ..runs.store import lock_folder

__all__ = ["AuditResult", "AuditSettings", "audit"]  # AuditSettings lives in settings.py; imported from here too


@dataclass
class AuditResult:
    summary: dict
    samples: list[dict]  # one row per text: members first, then non-members, in input order


def audit(model, members: list[str], nonmembers: list[str], reference=None, out: Path | None = None, *,
          device: str = "auto", dtype: str = "auto", settings: AuditSettings = AuditSettings(),
          progress: bool = True, frequency_texts: list[str] | None = None,
          sources: dict[str, str] | None = None, base_model: str | None = None) -> AuditResult:
    """Audit `model` on member and non-member texts, against `reference` if given (one, or a list: the
    best of them per sample, and each).

    model and reference are Hugging Face names or folders, memk checkpoint folders, PEFT adapter
    folders (on base_model if given, else on the base their adapter_config.json names; without a
    reference, the model's base is it), or ScoringModels (models.scoring_model_from wraps a
    transformers model you hold; such a model is scored on its own device in its own dtype, and
    asking for others is an error). With `out`, the outputs are written there (samples.jsonl as
    rows are computed, audit.json, the PNGs, report.html) and an interrupted audit resumes.

    frequency_texts: DC-PDD's corpus (default: the non-members, leave-one-out; memorize/audit/recall_dc_pdd.py).
    sources: where the texts came from ({"members": path, "non_members": path, "frequency_text": path}),
    recorded in audit.json with the files' digests.
    """
    settings.check()
    for name, texts in (("member", members), ("non-member", nonmembers)):
        if not texts:
            raise ConfigError(f"no {name} texts; give at least one (the attacks compare members with non-members)")
    check_recall_shots(settings.recall_shots, len(nonmembers))
    started = time.monotonic()
    risk_inputs = (*load_alpha(settings.capacity_summary), load_law(settings.f1_law))
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    references = [] if reference is None else list(reference) if isinstance(reference, (list, tuple)) else [reference]
    for held in (m for m in (model, *references) if isinstance(m, ScoringModel)):
        _check_held(held, device, dev, dtype, torch_dtype)
    created = new_folders(out)
    if out is not None:
        out = prepare_output(out)
    try:
        # Held until the outputs are written: a second audit (or sweep) into the folder would set
        # this one's samples.jsonl aside, or append to it, while it is being written.
        with lock_folder(out) if out is not None else contextlib.nullcontext():
            target = model if isinstance(model, ScoringModel) else load_scoring_model(model, dev, torch_dtype,
                                                                                      base_model)
            refs = [r if isinstance(r, ScoringModel) else load_scoring_model(r, dev, torch_dtype) for r in references]
            if not refs and target.base_source is not None:  # an adapter: its base is the natural reference
                refs = [load_scoring_model(target.base_source, dev, torch_dtype)]
                refs[0].details = {**refs[0].details, "default_reference":
                                   f"no reference given: the base of adapter {target.spec}"}
            timings = {"load_models": time.monotonic() - started}
            records = {"frequency_texts": frequency_texts, "sources": sources or {}, "risk_inputs": risk_inputs,
                       "timings": timings}
            with _cpu_threads(target, settings):
                return _audit(target, refs, members, nonmembers, out, settings, progress, records)
    except OSError as e:  # a full disk, a file that cannot be read or written: one line, not a traceback
        remove_if_empty(created)
        raise _file_error(e, out) from e
    except BaseException:
        remove_if_empty(created)
        raise


@contextlib.contextmanager
def _cpu_threads(target: ScoringModel, settings: AuditSettings):
    """One thread for small models on the CPU (a second costs more than it gains on a busy CPU); the
    caller's thread count back afterwards."""
    threads = torch.get_num_threads()
    if target.device.type == "cpu":
        torch.set_num_threads(cpu_threads_for_flops(2.0 * target.parameters * settings.batch_tokens))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _file_error(e: OSError, out: Path | None) -> ConfigError:
    """The ConfigError (one line, exit status 2 on the command line) an OSError during the audit becomes."""
    where = e.filename or out or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the device writing {where}; free some space and run the same command "
                        "again (the samples written are kept)")
    return ConfigError(f"cannot read or write {where} ({e.strerror or e}); fix that and run the same command again "
                       "(the samples written are kept)")


def _audit(target: ScoringModel, refs: list[ScoringModel], members: list[str], nonmembers: list[str],
           out: Path | None, settings: AuditSettings, progress: bool, records: dict | None = None) -> AuditResult:
    records = records or {"timings": {}}
    timings, clock = records["timings"], time.monotonic()
    texts = [("member", i, t) for i, t in enumerate(members)] + [("non-member", i, t) for i, t in enumerate(nonmembers)]
    roles = {"model": target, **dict(zip(role_names(len(refs)), refs))}
    windows = {role: _window(m, settings) for role, m in roles.items()}
    limits = gate.parse_limits(settings.fail_if)  # a limit on what this audit will not compute: refused before coding
    gate.check_available(limits, reference=bool(refs), extraction=bool(settings.extract_prefixes),
                         attacks=gate.attacks_in_table(len(refs), settings.min_k_pp, bool(settings.recall_shots)))
    numbers = {"window_stride": windows, "min_k": settings.min_k, "min_k_pp": settings.min_k_pp,
               "device": target.device.type,
               "dtype": str(target.head_dtype).split(".")[-1],
               "extract_prefixes": list(settings.extract_prefixes), "extract_length": settings.extract_length}
    extra = prepare_extra_attacks(target, nonmembers, windows["model"], settings.batch_tokens,
                                  recall_shots=settings.recall_shots, cap=settings.dc_pdd_cap,
                                  frequency_texts=records.get("frequency_texts"))
    numbers.update(extra.numbers)  # ReCaLL's prefix and DC-PDD's counts change the rows' numbers
    key = audit_key(target, refs, numbers)
    path = out / SAMPLES if out is not None else None
    done = load_rows(path, key, {(s, i): text_sha1(t) for s, i, t in texts}) if path is not None else []
    have = {(r["set"], r["index"]) for r in done}
    todo = [x for x in texts if (x[0], x[1]) not in have]

    tokens = {role: m.encode([t for _, _, t in todo]) for role, m in roles.items()}
    for role, m in roles.items():
        empty = next((todo[j] for j, ids in enumerate(tokens[role]) if not ids), None)
        if empty is not None:
            raise ConfigError(f"{empty[0]} text {empty[1]} ({empty[2][:40]!r}) is no tokens at all to {m.spec}'s "
                              "tokenizer; drop it from the input")
    order = sorted(range(len(todo)), key=lambda j: -len(tokens["model"][j]))  # long first: running out of memory shows at once
    timings["prepare"] = time.monotonic() - clock
    timings["score"] = timings["extraction"] = timings["recall_dc_pdd"] = 0.0
    rows = list(done)
    bar = progress_bar(total=len(texts), initial=len(done), desc="audit", unit="text", disable=not progress)
    for begin in range(0, len(order), settings.chunk):
        part = order[begin:begin + settings.chunk]
        clock = time.monotonic()
        scored = {role: score_texts(m, [tokens[role][j] for j in part], *windows[role], settings.batch_tokens,
                                    moments=role == "model" and settings.min_k_pp)
                  for role, m in roles.items()}
        timings["score"] += time.monotonic() - clock
        clock = time.monotonic()
        extracted = (extract(target, [tokens["model"][j] for j in part], tuple(settings.extract_prefixes),
                             settings.extract_length, settings.batch_tokens)
                     if settings.extract_prefixes else [None] * len(part))
        new = [_row(key, todo[j], scored["model"][n], [scored[r][n] for r in role_names(len(refs))],
                    settings.min_k, extracted[n]) for n, j in enumerate(part)]
        timings["extraction"] += time.monotonic() - clock
        clock = time.monotonic()
        extra.add_scores(new, [tokens["model"][j] for j in part], scored["model"])
        timings["recall_dc_pdd"] += time.monotonic() - clock
        if path is not None:
            append_rows(path, new)
        rows.extend(new)
        bar.update(len(new))
    bar.close()

    rank = {(s, i): n for n, (s, i, _) in enumerate(texts)}
    rows.sort(key=lambda r: rank[(r["set"], r["index"])])
    clock = time.monotonic()
    summary = summarize(rows, target, refs, settings, numbers)
    summary["risk"] = _risk(rows, target, refs, settings, records.get("risk_inputs"))
    summary["fail_if"] = gate.outcome(limits, summary, rows)
    timings["summarize"] = time.monotonic() - clock
    sources = records.get("sources", {})
    data = [data_record("members", members, sources.get("members")),
            data_record("non-members", nonmembers, sources.get("non_members"))]
    if records.get("frequency_texts") is not None or sources.get("frequency_text"):
        data.append(data_record("frequency-text", records.get("frequency_texts"), sources.get("frequency_text")))
    summary["provenance"] = provenance({"model": target.fingerprint, "reference": None,
                                        **dict(zip(role_names(len(refs)), (r.fingerprint for r in refs)))}, data)
    summary["timings"] = {"seconds": {k: round(v, 3) for k, v in timings.items()}, "texts_coded": len(todo),
                          "note": "this run's: a resumed audit codes only the texts it lacked; writing the "
                                  "outputs (after this file's numbers) is not counted"}
    if out is not None:
        write_outputs(out, summary, rows)
        write_samples_csv(out / SAMPLES_CSV, rows)
    return AuditResult(summary, rows)


def _risk(rows: list[dict], target: ScoringModel, refs: list[ScoringModel], settings: AuditSettings,
          risk_inputs: tuple | None) -> dict:
    """audit.json's "risk" (memorize/audit/risk.py): capacity, the members' bits under the reference, the F1s."""
    alpha, alpha_source, law = risk_inputs or (*load_alpha(settings.capacity_summary), load_law(settings.f1_law))
    members = [r for r in rows if r["set"] == "member"]
    member_bits = float(np.sum([r["reference_bits"] for r in members], dtype=np.float64)) if refs else None
    return capacity_risk(target.parameters, member_bits, [r["attacks"]["loss"] for r in members],
                         [r["attacks"]["loss"] for r in rows if r["set"] == "non-member"], alpha=alpha,
                         alpha_source=alpha_source, law=law, resamples=settings.bootstrap, seed=settings.seed)


def _check_held(held: ScoringModel, device: str, dev: torch.device, dtype: str, torch_dtype: torch.dtype) -> None:
    """A model the caller holds is scored where and as it is: a device or dtype asked for that it is
    not on is an error, not a silent copy of the caller's weights."""
    if device != "auto" and (held.device.type, held.device.index or 0) != (dev.type, dev.index or 0):
        raise ConfigError(f"{held.spec} is on {held.device}, but device {device!r} was asked for; move it there "
                          "first (module.to(...)) or leave device at 'auto'")
    if dtype != "auto" and held.head_dtype != torch_dtype:
        raise ConfigError(f"{held.spec} holds {str(held.head_dtype).split('.')[-1]} weights, but dtype {dtype!r} "
                          "was asked for; convert it first (module.to(dtype)) or leave dtype at 'auto'")


def _window(model: ScoringModel, settings: AuditSettings) -> tuple[int, int]:
    width = min(settings.window or model.context, model.context)
    stride = settings.stride or max(1, width // 2)
    if stride >= width:
        raise ConfigError(f"--stride {stride} must be smaller than the window ({width} tokens for {model.spec})")
    return width, stride


def _row(key: str, text: tuple[str, int, str], score, reference_scores: list, min_k: float,
         extraction: dict | None = None) -> dict:
    kind, index, body = text
    compressed = zlib_bits(body)
    row = {
        "key": key, "set": kind, "index": index, "sha1": text_sha1(body),
        "chars": len(body), "bytes": len(body.encode("utf-8")), "zlib_bits": compressed,
        "model_tokens": score.tokens, "model_bits": score.bits,
        "reference_tokens": None, "reference_bits": None, "mem_u_bits": None,
    }
    row.update(reference_fields(score.bits, reference_scores))  # the best reference's; each one's where several
    row["attacks"] = attack_scores(score.bits, score.logp, score.z, compressed, row["reference_bits"], min_k)
    row["attacks"].update(each_reference_attack(row))
    row["extraction"] = extraction
    row["text"] = body
    return row
