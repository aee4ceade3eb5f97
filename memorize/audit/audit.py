"""How much a causal language model memorized of your data, per sample, in bits (`memk audit`).

The model M (say, fine-tuned on the members) and the reference R (the model before fine-tuning)
each code every text whole with their own tokenizer (memorize/audit/scoring.py says which
tokens and how long texts are windowed). Per sample (Morris et al. 2025, PAPER.md):
H(x | M), H(x | R), the unintended memorization mem_U(x) = max(0, H(x | R) - H(x | M)), the
zlib-compressed length and the membership attacks' scores (memorize/audit/attacks.py). Per set
(members, non-members): totals; total memorization Σ [H(x) - H(x | M)] with H(x) the uniform
code of the text's UTF-8 bytes (8 bits a byte: the model-free code, as memk takes log2 V per
token for random data) and generalization = total - unintended. Per attack: ROC AUC and TPR
at 1% and 0.1% FPR with bootstrap intervals. The most-memorized samples, with their text.

Resume: each row of samples.jsonl is written (appended whole, fsynced) as soon as its sample is
coded, under a key over the models' identities (their spec and the content of their files; an
adapter's and its base's) and
every setting that changes a number; a re-run with the same key keeps the rows of texts it still
has and codes the rest (none: it only writes the summary again). Rows under another key are never
mixed in: that file is set aside under a name of its own. A damaged row is set aside and its
sample coded again. The output folder is locked while an audit writes it, as a sweep's is.

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

A refused start (a model that does not load, an interrupt before any row) removes the output
folders it created while they are still empty.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .attacks import ATTACKS, attack_metrics, attack_scores, zlib_bits
from .recall_dc_pdd import check_recall_shots
from .recall_dc_pdd import prepare as prepare_extra_attacks
from .extraction import DEFAULT_LENGTH, DEFAULT_PREFIXES, check_settings as check_extraction
from .extraction import extract, format_extraction, summarize_extraction
from .models import ScoringModel, load_scoring_model, resolve_dtype
from .references import describe as describe_references
from .references import each_reference_attack, format_references, per_reference_sets, reference_attacks
from .references import reference_fields, role_names
from .records import SAMPLES_CSV, data_record, provenance, write_samples_csv
from .report import write_outputs
from .risk import capacity_risk, format_risk, load_alpha, load_law
from .scoring import score_texts
from ..errors import ConfigError, DiskFull, warn
from ..outputs import atomic_write_text, content_digest, read_rows, set_aside
from ..runtime import cpu_threads_for_flops, progress_bar, resolve_device
from ..runs.store import lock_folder

FORMAT_VERSION = 2  # 2: rows carry "extraction" (and, with several references, "references")
SETS = ("member", "non-member")
SAMPLES = "samples.jsonl"
NUMBER = (int, float)
# The fields of a row of samples.jsonl and their JSON types: a row of this audit lacking one is damaged.
ROW_FIELDS = {"set": str, "index": int, "sha1": str, "chars": int, "bytes": int, "zlib_bits": NUMBER,
              "model_tokens": int, "model_bits": NUMBER, "reference_tokens": (int, type(None)),
              "reference_bits": (*NUMBER, type(None)), "mem_u_bits": (*NUMBER, type(None)), "attacks": dict,
              "extraction": (dict, type(None)), "text": str}
CODING = ("each model codes every token of the text as its own tokenizer splits it (no special tokens "
          "added), the first given only the model's start token (BOS, else EOS) as context, which is "
          "itself not coded; texts longer than the context are coded in sliding windows, each token once")


@dataclass(frozen=True)
class AuditSettings:
    window: int | None = None  # tokens a window holds; default (and at most): each model's context
    stride: int | None = None  # tokens a window moves by; default: half the window
    batch_tokens: int = 8192  # padded tokens a forward pass holds
    min_k: float = 0.2  # Min-K% and Min-K%++'s fraction of tokens
    # Min-K%++ needs the mean and spread of log p over the vocabulary at every token, a second
    # pass over each block of logits: about half the scoring time at V 50257.
    min_k_pp: bool = True
    bootstrap: int = 1000  # resamples for the intervals (0: none)
    seed: int = 0
    top: int = 20  # most-memorized samples kept in the summary
    chunk: int = 64  # texts coded between two writes of samples.jsonl
    extract_prefixes: tuple[int, ...] = DEFAULT_PREFIXES  # extraction's prefix lengths k in tokens (): none
    extract_length: int = DEFAULT_LENGTH  # tokens decoded after the prefix, at most
    # ReCaLL's prefix: this many non-members (0: no ReCaLL). Each text is coded again with the prefix in
    # front: about (shots + 1) times the model's pass where texts are of like length (audit_attacks.py).
    recall_shots: int = 0
    dc_pdd_cap: float = 0.01  # DC-PDD's a: each first-occurrence token's term is capped at it
    capacity_summary: str | None = None  # a run-capacity summary.json for α (None: memk's measured default)
    f1_law: str | None = None  # a run-generalization summary.json whose F1 law to use (None: memk's committed fit)

    def check(self) -> None:
        if self.window is not None and self.window < 2:
            raise ConfigError(f"--window {self.window} is too small; a window needs at least 2 tokens")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"--stride {self.stride} must be at least 1")
        if self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} must be positive")
        if not 0 < self.min_k <= 1:
            raise ConfigError(f"--min-k {self.min_k} must be a fraction in (0, 1], e.g. 0.2")
        if self.bootstrap < 0 or self.top < 0:
            raise ConfigError(f"--bootstrap ({self.bootstrap}) and --top ({self.top}) must be >= 0")
        if self.chunk < 1:
            raise ConfigError(f"chunk ({self.chunk}) must be at least 1 text")
        check_extraction(tuple(self.extract_prefixes), self.extract_length)
        if self.recall_shots < 0:
            raise ConfigError(f"--recall-shots {self.recall_shots} must be >= 0 (0: no ReCaLL)")
        if not self.dc_pdd_cap > 0:
            raise ConfigError(f"--dc-pdd-cap {self.dc_pdd_cap} must be positive (the paper's a is 0.01)")


@dataclass
class AuditResult:
    summary: dict
    samples: list[dict]  # one row per text: members first, then non-members, in input order


# --------------------------------------------------------------------------- inputs


def read_texts(source: str, column: str | None = None, split: str = "train", what: str = "members") -> list[str]:
    """The texts of one set: a text file (one sample per line, blank lines skipped), a JSON-lines
    file (.jsonl/.json; the --column field, default "text"), or a Hugging Face dataset (a
    save_to_disk folder or a Hub name; the --column column of --split)."""
    flag = f"--{what}"
    path = Path(source).expanduser()
    if path.is_dir():
        return _dataset_texts(str(path), split, column, flag)
    if not path.exists():
        if source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.endswith((".txt", ".jsonl", ".json")):
            raise ConfigError(f"{flag} {source}: no such file; give a text or JSON-lines file, or a dataset")
        return _dataset_texts(source, split, column, flag)
    try:
        raw = path.read_bytes().decode("utf-8")  # no newline translation: a lone "\r" is no line break
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {source}: not UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{flag} {source}: cannot read it ({e.strerror or e})") from None
    if path.suffix in (".jsonl", ".json"):
        texts = _jsonl_texts(raw, column or "text", flag, source)
    else:
        if column is not None:
            raise ConfigError(f"{flag} {source} is a text file (one sample per line); --column needs .jsonl or a dataset")
        texts = [line for line in _lines(raw) if line.strip()]
    if not texts:
        raise ConfigError(f"{flag} {source} holds no texts; give a file with one sample per line (or JSON lines)")
    return texts


def _lines(raw: str) -> list[str]:
    """A file's lines: split at "\n" alone (a trailing "\r" dropped). str.splitlines also breaks at form
    feeds, U+0085 and U+2028, which a sample (and a JSON string) may hold."""
    return [line[:-1] if line.endswith("\r") else line for line in raw.split("\n")]


def _jsonl_texts(raw: str, column: str, flag: str, source: str) -> list[str]:
    texts = []
    for number, line in enumerate(_lines(raw), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {source} line {number} is not JSON ({e.msg}); give one JSON object a line") from None
        if not isinstance(row, dict) or column not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{flag} {source} line {number} has no column {column!r} (it has {keys}); pick one with --column")
        if not isinstance(row[column], str):
            raise ConfigError(f"{flag} {source} line {number}: column {column!r} is not text; pick a text column")
        if row[column].strip():
            texts.append(row[column])
    return texts


def _dataset_texts(name: str, split: str, column: str | None, flag: str) -> list[str]:
    from ..corpus import hf_dataset_documents

    return hf_dataset_documents(name, split, column or "text", flags=(flag, "--split", "--column"), extra="audit")


# --------------------------------------------------------------------------- outputs


def prepare_output(out: Path) -> Path:
    """Create the output folder and check it takes files, before any model loads."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".memk-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {out} is not writable ({e.strerror or e}); choose another --out") from None
    return out


def audit_key(model: ScoringModel, references: list[ScoringModel], settings: dict) -> str:
    """What every number of a row depends on: the models' identities and the settings."""
    refs = [r.fingerprint for r in references]
    return content_digest([FORMAT_VERSION, model.fingerprint, refs[0] if len(refs) == 1 else refs or None, settings])


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _is_row(row, key: str) -> bool:
    """A row of samples.jsonl: of another audit (any key but ours: its file is set aside whole), or of
    this one with every field, of its type."""
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return False
    if row["key"] != key:
        return True
    return (all(isinstance(row.get(name), kind) for name, kind in ROW_FIELDS.items()) and row["set"] in SETS
            and all(isinstance(score, NUMBER) for score in row["attacks"].values()))


def _load_rows(path: Path, key: str, wanted: dict[tuple[str, int], str]) -> list[dict]:
    """The rows of an earlier run of this audit still valid. A damaged row (the cut-off last line of a
    killed run, an edit) is set aside and its sample coded again; another audit's file is set aside."""
    if not path.exists():
        return []
    rows = read_rows(path, lambda row: _is_row(row, key), "and its sample is coded again")
    if any(row["key"] != key for row in rows):
        aside = _set_aside_other(path)
        warn(f"{path} holds an audit of other models or settings; set aside as {aside.name}, starting over")
        return []
    unique = {(r["set"], r["index"]): r for r in rows if wanted.get((r["set"], r["index"])) == r["sha1"]}
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in unique.values()))  # only the rows still wanted
    return list(unique.values())


def _set_aside_other(path: Path) -> Path:
    """samples.jsonl moved to samples.jsonl.other-DATE, or -DATE-2, -3, ... where audits set aside within
    one second would take the same name: none overwrites another (no race: we hold the folder's lock)."""
    stamp = f".other-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    suffix, n = stamp, 1
    while path.with_name(path.name + suffix).exists():
        n += 1
        suffix = f"{stamp}-{n}"
    return set_aside(path, suffix)


def _append_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))  # whole lines in one write
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- the audit


def audit(model, members: list[str], nonmembers: list[str], reference=None, out: Path | None = None, *,
          device: str = "auto", dtype: str = "auto", settings: AuditSettings = AuditSettings(),
          progress: bool = True, frequency_texts: list[str] | None = None,
          sources: dict[str, str] | None = None, base_model: str | None = None) -> AuditResult:
    """Audit `model` on member and non-member texts, against `reference` if given (one, or a list: the
    best of them per sample, and each).

    model and reference are Hugging Face names or folders, memk checkpoint folders, PEFT adapter
    folders (on base_model if given, else on the base their adapter_config.json names; without a
    reference, the model's base is it), or ScoringModels (audit_models.scoring_model_from wraps a
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
    created = _new_folders(out)
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
        _remove_if_empty(created)
        raise _file_error(e, out) from e
    except BaseException:
        _remove_if_empty(created)
        raise


def _new_folders(out: Path | None) -> list[Path]:
    """The folders creating `out` will make (out and any missing parents), innermost first."""
    new = []
    folder = None if out is None else Path(out).expanduser().absolute()
    while folder is not None and not folder.exists() and folder != folder.parent:
        new.append(folder)
        folder = folder.parent
    return new


def _remove_if_empty(folders: list[Path]) -> None:
    """A refused start leaves no folder it made: each of them still empty is removed, innermost first."""
    for folder in folders:
        try:
            folder.rmdir()  # only if empty: rows written, or another process's files, keep it
        except OSError:
            return


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
    done = _load_rows(path, key, {(s, i): _sha1(t) for s, i, t in texts}) if path is not None else []
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
            _append_rows(path, new)
        rows.extend(new)
        bar.update(len(new))
    bar.close()

    rank = {(s, i): n for n, (s, i, _) in enumerate(texts)}
    rows.sort(key=lambda r: rank[(r["set"], r["index"])])
    clock = time.monotonic()
    summary = summarize(rows, target, refs, settings, numbers)
    summary["risk"] = _risk(rows, target, refs, settings, records.get("risk_inputs"))
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
        "key": key, "set": kind, "index": index, "sha1": _sha1(body),
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


def summarize(rows: list[dict], model: ScoringModel, references: list[ScoringModel], settings: AuditSettings,
              numbers: dict) -> dict:
    """audit.json: the models, the settings, per-set totals, per-attack metrics, the top samples."""
    by_set = {s: [r for r in rows if r["set"] == s] for s in SETS}
    sets = {}
    for name, group in by_set.items():
        model_bits = float(np.sum([r["model_bits"] for r in group], dtype=np.float64))
        uniform = 8.0 * sum(r["bytes"] for r in group)
        block = {
            "samples": len(group), "chars": sum(r["chars"] for r in group), "bytes": sum(r["bytes"] for r in group),
            "model_tokens": sum(r["model_tokens"] for r in group), "model_bits": model_bits,
            "model_bits_per_byte": model_bits / max(1, sum(r["bytes"] for r in group)),
            "zlib_bits": sum(r["zlib_bits"] for r in group),
            "total_memorization_bits": uniform - model_bits,
        }
        if references:
            mem_u = np.array([r["mem_u_bits"] for r in group], dtype=np.float64)
            block.update(
                reference_tokens=sum(r["reference_tokens"] for r in group),
                reference_bits=float(np.sum([r["reference_bits"] for r in group], dtype=np.float64)),
                unintended_memorization_bits=float(mem_u.sum()),
                mean_unintended_memorization_bits=float(mem_u.mean()),
                samples_with_unintended_memorization=int((mem_u > 0).sum()),
                generalization_bits=uniform - model_bits - float(mem_u.sum()),
            )
            if len(references) > 1:
                block["references"] = per_reference_sets(group, len(references), uniform, model_bits)
        sets[name] = block
    attacks = {}
    for name, label in ATTACKS.items():
        # A row may lack an attack's score: ReCaLL's prefix non-members are not scored by it.
        scores = [[r["attacks"][name] for r in by_set[s] if name in r["attacks"]] for s in SETS]
        if not all(scores):
            continue
        attacks[name] = {"label": label, **attack_metrics(*scores, resamples=settings.bootstrap, seed=settings.seed)}
        if len(scores[1]) < len(by_set["non-member"]):
            attacks[name]["scored"] = {"member": len(scores[0]), "non-member": len(scores[1]),
                                       "note": "the non-members of ReCaLL's prefix are left out of its evaluation"}
    described = [r.describe() for r in references]
    if len(references) > 1:
        attacks["reference"]["label"] = f"reference-calibrated loss, best of {len(references)} references"
    attacks.update(reference_attacks(rows, described, settings.bootstrap, settings.seed))
    ranked_by = "mem_u_bits" if references else "loss"
    ranked = sorted(rows, key=lambda r: -(r["mem_u_bits"] if references else r["attacks"]["loss"]))
    return {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.describe(),
        "reference": describe_references(described),
        "references": described,
        "coding": CODING,
        "settings": {**asdict(settings), **numbers},
        "sets": sets,
        "attacks": attacks,
        "top_ranked_by": ranked_by,
        "top": [{k: r[k] for k in ("set", "index", "model_bits", "reference_bits", "mem_u_bits", "model_tokens",
                                    "extraction", "text")} for r in ranked[:settings.top]],
        "extraction": summarize_extraction(rows, tuple(settings.extract_prefixes), settings.extract_length),
    }


def format_table(summary: dict) -> str:
    """The table `memk audit` prints at the end."""
    has_ref = summary["reference"] is not None
    lines = [f"{'set':<11} {'samples':>7} {'H(x|M) bits':>13} " + (f"{'H(x|R) bits':>13} {'mem_U bits':>12} "
             f"{'mem_U/sample':>12} {'generalization':>14}" if has_ref else "")]
    for name, b in summary["sets"].items():
        line = f"{name:<11} {b['samples']:>7} {b['model_bits']:>13.1f} "
        if has_ref:
            line += (f"{b['reference_bits']:>13.1f} {b['unintended_memorization_bits']:>12.1f} "
                     f"{b['mean_unintended_memorization_bits']:>12.2f} {b['generalization_bits']:>14.1f}")
        lines.append(line.rstrip())
    if has_ref and summary["reference"].get("default_reference"):
        lines.append(f"reference: {summary['reference']['spec']} ({summary['reference']['default_reference']})")
    lines.extend(["", format_references(summary)] if format_references(summary) else [])
    lines.extend(["", format_extraction(summary)] if summary.get("extraction") else [])
    lines.append("")
    lines.append(f"{'attack':<48} {'AUC':>20} {'TPR@1%FPR':>20} {'TPR@0.1%FPR':>20}")
    for a in summary["attacks"].values():
        cells = []
        for metric in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
            interval = a.get(f"{metric}_interval")
            cells.append(f"{a[metric]:.3f}" + (f" [{interval[0]:.2f},{interval[1]:.2f}]" if interval else ""))
        lines.append(f"{a['label']:<48} " + " ".join(f"{c:>20}" for c in cells))
    risk = format_risk(summary.get("risk"))
    return "\n".join(lines + ([""] + risk if risk else []))
