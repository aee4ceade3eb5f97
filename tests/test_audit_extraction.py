"""Extraction in `memk audit` (memorize/audit/extraction.py): batched greedy decoding against a direct loop, the
cells against their definition, the demo's fine-tune saying its members back (memk.bench.audit_demo), the
options; and its small functions against known answers."""

import json
import math

import numpy as np
import pytest
import torch

from memk.bench.audit_demo import new_gpt2, random_texts
from memk.cli.main import main as memk_main
from memk.memorize.audit.audit import AuditSettings, audit

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def finetuned_audit(demo, texts, tmp_path_factory):
    """The fine-tune audited on every member and non-member, extraction at its defaults (no reference needed)."""
    out = tmp_path_factory.mktemp("audit")
    members, nonmembers = texts
    return audit(str(demo["finetuned"]), members, nonmembers, out=out, settings=AuditSettings(bootstrap=0),
                 progress=False), out


def run_memk(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        memk_main(["audit", *args, "--no-progress"])
    return exit_.value.code, capsys.readouterr().err


def sample_lines(out):
    return (out / "samples.jsonl").read_bytes().split(b"\n")[:-1]


def direct_greedy(module, prompt, steps, memk=False):
    """Greedy decoding one text at a time, the whole sequence fed again at each step: no batch, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            out = module(torch.tensor([seq])) if memk else module(input_ids=torch.tensor([seq])).logits
            seq.append(int(out[0, -1].argmax()))
    return seq[len(prompt):]


def direct_extraction(module, start, ids, k, length, context, memk=False):
    """One text's extraction cell at prefix k, straight from the definition (audit_extraction's docstring)."""
    n = min(length, len(ids) - k, context - k - 1)
    if n < 1:
        return None
    decoded = direct_greedy(module, [start, *ids[:k]], n, memk)
    run = next((i for i, (a, b) in enumerate(zip(decoded, ids[k:k + n])) if a != b), n)
    return {"continuation": n, "run": run, "extracted": run == n}


def test_batched_greedy_decoding_with_a_cache_equals_a_direct_loop():
    from memk.bench.audit_demo import char_tokenizer
    from memk.memorize.audit.extraction import extract, greedy_continuations
    from memk.memorize.audit.models import scoring_model_from

    tokenizer = char_tokenizer()
    module = new_gpt2(len(tokenizer), context=24, seed=3).double()  # float64: no near-tie flips by rounding
    model = scoring_model_from(module, tokenizer, "random GPT-2")
    rng = np.random.default_rng(0)
    prompts = [[0, *rng.integers(2, len(tokenizer), size=n).tolist()] for n in (3, 3, 3, 6, 6, 1)]
    steps = [5, 2, 0, 4, 7, 3]
    want = [direct_greedy(module, p, s) for p, s in zip(prompts, steps)]
    assert greedy_continuations(model, prompts, steps, batch_tokens=20) == want  # batches of 2 (20 // (4 + 5))

    # Texts built to follow the greedy decoding for a known number of tokens after 8, then leave it.
    texts = []
    for follow in (0, 4, 6, 6):
        ids = rng.integers(2, len(tokenizer), size=8).tolist()
        greedy = direct_greedy(module, [0, *ids], 7)
        other = next(t for t in range(2, len(tokenizer)) if t != greedy[follow])
        texts.append(ids + greedy[:follow] + [other] + rng.integers(2, len(tokenizer), size=16).tolist())
    texts[3] = texts[3][:14]  # ends right after the 6 reproduced tokens
    texts.append(rng.integers(2, len(tokenizer), size=5).tolist())  # shorter than the prefix at k = 8
    cells = extract(model, texts, (2, 8, 20), 6, batch_tokens=64)
    for ids, cell in zip(texts, cells):
        assert cell == {str(k): direct_extraction(module, 0, ids, k, 6, 24) for k in (2, 8, 20)}
    assert [c["8"] and (c["8"]["run"], c["8"]["extracted"]) for c in cells] == [(0, False), (4, False), (6, True),
                                                                                 (6, True), None]
    assert cells[0]["20"]["continuation"] == 3  # 24 positions: start, 20 of prefix, 3 decoded
    model.head_weight = model.head_bias = None  # the whole model's logits (soft-capped heads) decode the same
    assert greedy_continuations(model, prompts, steps, batch_tokens=20) == want


def test_a_memk_checkpoint_decodes_as_a_direct_loop(tmp_path):
    from memk.memorize.audit.extraction import extract
    from memk.memorize.audit.models import load_scoring_model
    from memk.memorize.corpus import EOT_ID, train_tokenizer
    from memk.memorize.model import GPT, GPTConfig

    tokenizer = train_tokenizer(random_texts(50, 40, 3), 300)
    config = GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=tokenizer.get_vocab_size(), seq_len=16)
    torch.manual_seed(0)
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "reference.json").write_text(json.dumps({"model": config.to_dict()}))
    torch.save(GPT(config).state_dict(), tmp_path / "reference" / "model.pt")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = load_scoring_model(str(tmp_path), torch.device("cpu"), torch.float64)
    texts = [tokenizer.encode(t, add_special_tokens=False).ids for t in random_texts(3, 60, 4)]
    cells = extract(model, texts, (2, 8), 5, batch_tokens=16)
    for ids, cell in zip(texts, cells):
        assert cell == {str(k): direct_extraction(model.module, EOT_ID, ids, k, 5, 16, memk=True) for k in (2, 8)}


def test_the_finetuned_model_says_its_members_back_and_not_the_non_members(finetuned_audit):
    result, out = finetuned_audit
    extraction = result.summary["extraction"]
    assert extraction["prefixes"] == [8, 16, 32] and extraction["length"] == 32
    for k, block in extraction["by_prefix"].items():
        assert block["member"]["rate"] >= 0.9, k  # the demo's fine-tune memorized its members
        assert block["non-member"]["extracted"] == 0, k
        for name in ("member", "non-member"):
            cells = [r["extraction"][k] for r in result.samples if r["set"] == name]
            assert block[name]["eligible"] == sum(c is not None for c in cells)
            assert block[name]["extracted"] == sum(c["extracted"] for c in cells if c)
            assert block[name]["mean_run"] == pytest.approx(np.mean([c["run"] for c in cells if c]))
    members = [r for r in result.samples if r["set"] == "member"]
    assert all(r["extraction"]["32"]["continuation"] == 8 for r in members)  # 40 letters: the 8 after the first 32
    assert all(r["extraction"]["8"]["continuation"] == 32 for r in members)
    assert extraction["member"]["extracted_any"] == sum(any(c["extracted"] for c in r["extraction"].values())
                                                        for r in members)
    written = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {(r["set"], r["index"]): r["extraction"] for r in written} == {
        (r["set"], r["index"]): r["extraction"] for r in result.samples}
    assert "Extraction: does the model say the text back?" in (out / "report.html").read_text()


def test_extraction_options_and_turning_it_off(capsys, demo, texts, tmp_path):
    (tmp_path / "m.txt").write_text("\n".join(texts[0][:3]) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(texts[1][:3]) + "\n")
    common = ["--model", str(demo["finetuned"]), "--members", str(tmp_path / "m.txt"), "--non-members",
              str(tmp_path / "n.txt"), "--bootstrap", "0"]
    code, err = run_memk(capsys, *common, "--out", str(tmp_path / "a"), "--extract-prefix", "4, 36",
                         "--extract-length", "5")
    assert code in (0, None), err
    summary = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert summary["extraction"]["prefixes"] == [4, 36] and summary["extraction"]["length"] == 5
    row = json.loads(sample_lines(tmp_path / "a")[0])
    assert row["extraction"]["4"]["continuation"] == 5 and row["extraction"]["36"]["continuation"] == 4  # 40 letters
    code, err = run_memk(capsys, *common, "--out", str(tmp_path / "b"), "--no-extract")
    assert code in (0, None), err
    assert json.loads((tmp_path / "b" / "audit.json").read_text())["extraction"] is None
    assert all(json.loads(line)["extraction"] is None for line in sample_lines(tmp_path / "b"))
    for bad, says in ((["--extract-prefix", "8,x"], "token counts separated by commas"),
                      (["--extract-prefix", "0"], "at least 1 token"), (["--extract-length", "0"], "at least 1 token")):
        code, err = run_memk(capsys, *common, "--out", str(tmp_path / "c"), *bad)
        assert code == 2 and err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- the pieces, against known answers


def test_prefixes_continuation_lengths_and_runs_by_hand():
    from memk.memorize.audit.extraction import continuation_length, longest_run, parse_prefixes

    assert parse_prefixes("8, 16,32") == (8, 16, 32) and parse_prefixes("4,") == (4,)
    # min(length, tokens after the prefix, context - prefix - 1)
    assert [continuation_length(40, k, 32, 64) for k in (8, 32, 36, 40)] == [32, 8, 4, 0]
    assert continuation_length(100, 50, 32, 64) == 13  # the context: start + 50 + 13 = 64 positions
    assert longest_run([1, 2, 3, 9], [1, 2, 3, 4]) == 3 and longest_run([1, 2], [1, 2]) == 2
    assert longest_run([5, 2], [1, 2]) == 0 and longest_run([], [1]) == 0


def test_wilson_intervals_at_the_ends_are_the_closed_forms():
    from memk.memorize.audit.extraction import wilson_interval

    z = 1.959963984540054
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))  # 0 of n: [0, z²/(n + z²)]
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z * z), 1.0))  # n of n: [n/(n + z²), 1]
    lo, hi = wilson_interval(5, 10)
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))  # symmetric about 1/2
    assert wilson_interval(0, 0) is None


def test_the_per_set_summary_of_hand_made_cells():
    from memk.memorize.audit.extraction import summarize_extraction, wilson_interval

    cell = lambda n, run: {"continuation": n, "run": run, "extracted": run == n}  # noqa: E731
    rows = [{"set": "member", "extraction": {"8": cell(4, 4)}}, {"set": "member", "extraction": {"8": cell(4, 1)}},
            {"set": "member", "extraction": {"8": None}}, {"set": "non-member", "extraction": {"8": cell(2, 0)}}]
    summary = summarize_extraction(rows, (8,), 4)
    assert summary["by_prefix"]["8"]["member"] == {
        "samples": 3, "eligible": 2, "extracted": 1, "rate": 0.5, "rate_interval": wilson_interval(1, 2),
        "mean_run": 2.5, "max_run": 4, "mean_continuation": 4.0}
    assert summary["by_prefix"]["8"]["non-member"]["extracted"] == 0 and summary["by_prefix"]["8"]["non-member"][
        "mean_run"] == 0.0
    assert summary["member"] == {"samples": 3, "extracted_any": 1, "rate_any": 1 / 3}
    assert summary["non-member"] == {"samples": 1, "extracted_any": 0, "rate_any": 0.0}
    assert (summary["prefixes"], summary["length"]) == ([8], 4)
    assert summarize_extraction(rows, (), 4) is None
