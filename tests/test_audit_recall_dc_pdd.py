"""ReCaLL and DC-PDD in `memk audit` (memorize/audit/recall_dc_pdd.py) against a direct float64 computation with
the model itself, on a tiny GPT-2 built here (random weights, a character tokenizer: nothing downloaded); and
on the demo's fine-tune (memk.bench.audit_demo), telling its members from the non-members."""

import math

import numpy as np
import pytest
import torch

from memk.bench.audit_demo import char_tokenizer, new_gpt2, random_texts
from memk.memorize.audit.audit import AuditSettings, audit
from memk.memorize.errors import ConfigError

transformers = pytest.importorskip("transformers")
MEMBERS = random_texts(5, 9, seed=1)
NONMEMBERS = random_texts(7, 11, seed=2) + ["aaaa bbbb aaaa"]  # repeated tokens: DC-PDD counts the first of each
SHOTS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = char_tokenizer()
    model = new_gpt2(len(tokenizer), context=64, seed=3, d_model=16, layers=1, heads=2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def audited(tiny):
    folder, _, _ = tiny
    return audit(str(folder), MEMBERS, NONMEMBERS, settings=AuditSettings(bootstrap=50, recall_shots=SHOTS),
                 device="cpu", progress=False)


def log_likelihoods(model, context: list[int], ids: list[int]) -> list[float]:
    """ln p(ids[i] | context + ids[:i]) for each i, the model in float64, one position at a time."""
    m = model.double()
    seq = torch.tensor([context + ids])
    with torch.no_grad():
        logits = m(input_ids=seq, use_cache=False).logits[0].double()
    out = []
    for i, token in enumerate(ids):
        row = logits[len(context) + i - 1]
        out.append(float(row[token] - torch.logsumexp(row, 0)))
    model.float()
    return out


def test_recall_is_the_ratio_of_mean_log_likelihoods_with_and_without_the_prefix(tiny, audited):
    _, model, tokenizer = tiny
    start = tokenizer.bos_token_id
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = [start]
    for text in NONMEMBERS[:SHOTS]:
        prefix += encode(text) + [start]
    rows = audited.samples
    for row in rows:
        text = (MEMBERS if row["set"] == "member" else NONMEMBERS)[row["index"]]
        if row["set"] == "non-member" and row["index"] < SHOTS:
            assert "recall" not in row["attacks"]  # part of the prefix: left out of ReCaLL
            continue
        plain = np.mean(log_likelihoods(model, [start], encode(text)))
        prefixed = np.mean(log_likelihoods(model, prefix, encode(text)))
        assert row["attacks"]["recall"] == pytest.approx(prefixed / plain, rel=1e-4)
    recall = audited.summary["attacks"]["recall"]
    assert recall["scored"] == {"member": len(MEMBERS), "non-member": len(NONMEMBERS) - SHOTS,
                                "note": recall["scored"]["note"]}
    assert audited.summary["settings"]["recall"]["shots"] == SHOTS


def test_dc_pdd_calibrates_by_the_other_non_members_token_counts(tiny, audited):
    _, model, tokenizer = tiny
    start = tokenizer.bos_token_id
    vocab = model.config.vocab_size
    corpus = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in NONMEMBERS]
    for row in audited.samples:
        text = (MEMBERS if row["set"] == "member" else NONMEMBERS)[row["index"]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        others = [c for n, c in enumerate(corpus) if not (row["set"] == "non-member" and n == row["index"])]
        total = sum(len(c) for c in others)
        logp = log_likelihoods(model, [start], ids)
        terms, seen = [], set()
        for i, token in enumerate(ids):
            if token not in seen:
                seen.add(token)
                f = (sum(c.count(token) for c in others) + 1) / (total + vocab)
                terms.append(min(math.exp(logp[i]) * -math.log(f), 0.01))
        assert row["attacks"]["dc_pdd"] == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_dc_pdd_from_a_frequency_text_counts_that_text_alone(tiny):
    folder, model, tokenizer = tiny
    corpus_text = ["abc abc", "ponm lkj", "aaaaaaa"]
    result = audit(str(folder), MEMBERS[:2], NONMEMBERS[:2], frequency_texts=corpus_text,
                   settings=AuditSettings(bootstrap=0), device="cpu", progress=False)
    counts = np.zeros(model.config.vocab_size)
    for ids in tokenizer(corpus_text, add_special_tokens=False)["input_ids"]:
        np.add.at(counts, ids, 1)
    for row in result.samples:
        text = (MEMBERS if row["set"] == "member" else NONMEMBERS)[row["index"]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        logp = log_likelihoods(model, [tokenizer.bos_token_id], ids)
        first = sorted({t: i for i, t in reversed(list(enumerate(ids)))}.values())
        expected = np.mean([min(math.exp(logp[i]) * -math.log((counts[ids[i]] + 1) / (counts.sum() + len(counts))), 0.01)
                            for i in first])
        assert row["attacks"]["dc_pdd"] == pytest.approx(expected, rel=1e-4)
    assert "recall" not in result.summary["attacks"]  # off unless asked for
    assert result.summary["settings"]["dc_pdd"]["frequency"] == "--frequency-text"


def test_recall_shots_must_leave_a_non_member_to_score(tiny):
    folder, _, _ = tiny
    with pytest.raises(ConfigError, match="recall-shots 2"):
        audit(str(folder), MEMBERS, NONMEMBERS[:2], settings=AuditSettings(recall_shots=2), progress=False)
    with pytest.raises(ConfigError, match="recall-shots"):
        AuditSettings(recall_shots=-1).check()


def test_a_prefix_that_does_not_fit_the_window_beside_a_text_is_said(tiny, capsys):
    folder, _, _ = tiny
    result = audit(str(folder), MEMBERS, NONMEMBERS, settings=AuditSettings(bootstrap=0, recall_shots=SHOTS, window=20),
                   device="cpu", progress=False)
    err = capsys.readouterr().err
    assert "ReCaLL's prefix (2 non-member(s), 24 tokens)" in err and "window of 20" in err
    assert all(math.isfinite(r["attacks"]["recall"]) for r in result.samples if "recall" in r["attacks"])


@pytest.mark.cuda
def test_on_cuda_recall_and_dc_pdd_score_as_on_the_cpu(tiny, audited):
    folder, _, _ = tiny
    settings = AuditSettings(bootstrap=0, recall_shots=SHOTS)
    result = audit(str(folder), MEMBERS, NONMEMBERS, settings=settings, device="cuda", dtype="float32", progress=False)
    for gpu, cpu in zip(result.samples, audited.samples):
        assert gpu["attacks"].keys() == cpu["attacks"].keys()
        for name in ("recall", "dc_pdd"):
            if name in cpu["attacks"]:
                assert gpu["attacks"][name] == pytest.approx(cpu["attacks"][name], rel=1e-4), name


def test_recall_and_dc_pdd_tell_the_memorized_members_from_non_members(demo, texts):
    members, nonmembers = texts
    result = audit(str(demo["finetuned"]), members, nonmembers, settings=AuditSettings(bootstrap=0, recall_shots=2,
                                                                                        extract_prefixes=()),
                   progress=False)
    for name in ("recall", "dc_pdd"):
        assert result.summary["attacks"][name]["auc"] > 0.9, name
    recall = [r["attacks"].get("recall") for r in result.samples]
    assert recall.count(None) == 2  # the prefix's two non-members
