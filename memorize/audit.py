"""How much a causal language model memorized of your data, per sample, in bits (`memk audit`).

The model M (say, fine-tuned on the members) and the reference R (the model before fine-tuning)
each code every text whole with their own tokenizer (memorize/audit_scoring.py says which
tokens and how long texts are windowed). Per sample (Morris et al. 2025, PAPER.md):
H(x | M), H(x | R), the unintended memorization mem_U(x) = max(0, H(x | R) - H(x | M)), the
zlib-compressed length and the membership attacks' scores (memorize/attacks.py). Per set
(members, non-members): totals; total memorization Σ [H(x) - H(x | M)] with H(x) the uniform
code of the text's UTF-8 bytes (8 bits a byte: the model-free code, as memk takes log2 V per
token for random data) and generalization = total - unintended. Per attack: ROC AUC and TPR
at 1% and 0.1% FPR with bootstrap intervals. The most-memorized samples, with their text.

Resume: each row of samples.jsonl is written (appended whole, fsynced) as soon as its sample is
coded, under a key over both models' identities (their spec and the content of their files) and
every setting that changes a number; a re-run with the same key keeps the rows of texts it still
has and codes the rest (none: it only writes the summary again). Rows under another key are never
mixed in: that file is set aside under a name of its own. A damaged row is set aside and its
sample coded again. The output folder is locked while an audit writes it, as a sweep's is.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .attacks import ATTACKS, attack_metrics, attack_scores, zlib_bits
from .audit_models import ScoringModel, load_scoring_model, resolve_dtype
from .audit_report import write_outputs
from .audit_scoring import score_texts
from .errors import ConfigError, DiskFull, warn
from .outputs import atomic_write_text, content_digest, read_rows, set_aside
from .runtime import cpu_threads_for_flops, progress_bar, resolve_device
from .store import lock_folder

FORMAT_VERSION = 1
SETS = ("member", "non-member")
SAMPLES = "samples.jsonl"
NUMBER = (int, float)
# The fields of a row of samples.jsonl and their JSON types: a row of this audit lacking one is damaged.
ROW_FIELDS = {"set": str, "index": int, "sha1": str, "chars": int, "bytes": int, "zlib_bits": NUMBER,
              "model_tokens": int, "model_bits": NUMBER, "reference_tokens": (int, type(None)),
              "reference_bits": (*NUMBER, type(None)), "mem_u_bits": (*NUMBER, type(None)), "attacks": dict,
              "text": str}
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
    from .corpus import hf_dataset_documents

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


def audit_key(model: ScoringModel, reference: ScoringModel | None, settings: dict) -> str:
    """What every number of a row depends on: both models' identities and the settings."""
    return content_digest([FORMAT_VERSION, model.fingerprint, reference and reference.fingerprint, settings])


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
          progress: bool = True) -> AuditResult:
    """Audit `model` on member and non-member texts, against `reference` if given.

    model and reference are Hugging Face names or folders, memk checkpoint folders, or
    ScoringModels (audit_models.scoring_model_from wraps a transformers model you hold; such a
    model is scored on its own device in its own dtype, and asking for others is an error). With
    `out`, the outputs are written there (samples.jsonl as rows are computed, audit.json, the
    PNGs, report.html) and an interrupted audit resumes.
    """
    settings.check()
    for name, texts in (("member", members), ("non-member", nonmembers)):
        if not texts:
            raise ConfigError(f"no {name} texts; give at least one (the attacks compare members with non-members)")
    dev = resolve_device(device)
    if out is not None:
        out = prepare_output(out)
    torch_dtype = resolve_dtype(dtype, dev)
    for held in (m for m in (model, reference) if isinstance(m, ScoringModel)):
        _check_held(held, device, dev, dtype, torch_dtype)
    try:
        # Held until the outputs are written: a second audit (or sweep) into the folder would set
        # this one's samples.jsonl aside, or append to it, while it is being written.
        with lock_folder(out) if out is not None else contextlib.nullcontext():
            target = model if isinstance(model, ScoringModel) else load_scoring_model(model, dev, torch_dtype)
            ref = reference if reference is None or isinstance(reference, ScoringModel) else load_scoring_model(
                reference, dev, torch_dtype)
            with _cpu_threads(target, settings):
                return _audit(target, ref, members, nonmembers, out, settings, progress)
    except OSError as e:  # a full disk, a file that cannot be read or written: one line, not a traceback
        raise _file_error(e, out) from e


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


def _audit(target: ScoringModel, ref: ScoringModel | None, members: list[str], nonmembers: list[str],
           out: Path | None, settings: AuditSettings, progress: bool) -> AuditResult:
    texts = [("member", i, t) for i, t in enumerate(members)] + [("non-member", i, t) for i, t in enumerate(nonmembers)]
    roles = {"model": target, **({"reference": ref} if ref is not None else {})}
    windows = {role: _window(m, settings) for role, m in roles.items()}
    numbers = {"window_stride": windows, "min_k": settings.min_k, "min_k_pp": settings.min_k_pp,
               "device": target.device.type,
               "dtype": str(target.head_dtype).split(".")[-1]}
    key = audit_key(target, ref, numbers)
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
    rows = list(done)
    bar = progress_bar(total=len(texts), initial=len(done), desc="audit", unit="text", disable=not progress)
    for begin in range(0, len(order), settings.chunk):
        part = order[begin:begin + settings.chunk]
        scored = {role: score_texts(m, [tokens[role][j] for j in part], *windows[role], settings.batch_tokens,
                                    moments=role == "model" and settings.min_k_pp)
                  for role, m in roles.items()}
        new = [_row(key, todo[j], scored["model"][n], scored["reference"][n] if ref is not None else None,
                    settings.min_k) for n, j in enumerate(part)]
        if path is not None:
            _append_rows(path, new)
        rows.extend(new)
        bar.update(len(new))
    bar.close()

    rank = {(s, i): n for n, (s, i, _) in enumerate(texts)}
    rows.sort(key=lambda r: rank[(r["set"], r["index"])])
    summary = summarize(rows, target, ref, settings, numbers)
    if out is not None:
        write_outputs(out, summary, rows)
    return AuditResult(summary, rows)


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


def _row(key: str, text: tuple[str, int, str], score, reference_score, min_k: float) -> dict:
    kind, index, body = text
    compressed = zlib_bits(body)
    row = {
        "key": key, "set": kind, "index": index, "sha1": _sha1(body),
        "chars": len(body), "bytes": len(body.encode("utf-8")), "zlib_bits": compressed,
        "model_tokens": score.tokens, "model_bits": score.bits,
        "reference_tokens": None, "reference_bits": None, "mem_u_bits": None,
    }
    if reference_score is not None:
        row.update(reference_tokens=reference_score.tokens, reference_bits=reference_score.bits,
                   mem_u_bits=max(0.0, reference_score.bits - score.bits))
    row["attacks"] = attack_scores(score.bits, score.logp, score.z, compressed, row["reference_bits"], min_k)
    row["text"] = body
    return row


def summarize(rows: list[dict], model: ScoringModel, reference: ScoringModel | None, settings: AuditSettings,
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
        if reference is not None:
            mem_u = np.array([r["mem_u_bits"] for r in group], dtype=np.float64)
            block.update(
                reference_tokens=sum(r["reference_tokens"] for r in group),
                reference_bits=float(np.sum([r["reference_bits"] for r in group], dtype=np.float64)),
                unintended_memorization_bits=float(mem_u.sum()),
                mean_unintended_memorization_bits=float(mem_u.mean()),
                samples_with_unintended_memorization=int((mem_u > 0).sum()),
                generalization_bits=uniform - model_bits - float(mem_u.sum()),
            )
        sets[name] = block
    attacks = {}
    for name, label in ATTACKS.items():
        if name not in rows[0]["attacks"]:
            continue
        scores = [[r["attacks"][name] for r in by_set[s]] for s in SETS]
        attacks[name] = {"label": label, **attack_metrics(*scores, resamples=settings.bootstrap, seed=settings.seed)}
    ranked_by = "mem_u_bits" if reference is not None else "loss"
    ranked = sorted(rows, key=lambda r: -(r["mem_u_bits"] if reference is not None else r["attacks"]["loss"]))
    return {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.describe(),
        "reference": None if reference is None else reference.describe(),
        "coding": CODING,
        "settings": {**asdict(settings), **numbers},
        "sets": sets,
        "attacks": attacks,
        "top_ranked_by": ranked_by,
        "top": [{k: r[k] for k in ("set", "index", "model_bits", "reference_bits", "mem_u_bits", "model_tokens",
                                    "text")} for r in ranked[:settings.top]],
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
    lines.append("")
    lines.append(f"{'attack':<48} {'AUC':>20} {'TPR@1%FPR':>20} {'TPR@0.1%FPR':>20}")
    for a in summary["attacks"].values():
        cells = []
        for metric in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
            interval = a.get(f"{metric}_interval")
            cells.append(f"{a[metric]:.3f}" + (f" [{interval[0]:.2f},{interval[1]:.2f}]" if interval else ""))
        lines.append(f"{a['label']:<48} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)
