"""`memk audit` on Hugging Face GPT-2s built here (nothing downloaded): a base trained briefly on random
letter strings, and a copy fine-tuned on the members until it memorized them (memk.bench.audit_demo)."""

import datetime
import errno
import html.parser
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from memk.bench.audit_demo import build_demo, new_gpt2, random_texts
from memk.cli.main import main as memk_main
from memk.memorize.audit import audit as audit_module
from memk.memorize.audit.audit import AuditSettings, audit, read_texts
from memk.memorize.errors import ConfigError

transformers = pytest.importorskip("transformers")
SCRIPT = "<script>alert('memorized')</script> & co"
FAST = AuditSettings(bootstrap=200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine may be busy
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def texts(demo):
    return read_texts(str(demo["members"])), read_texts(str(demo["non_members"]), what="non-members")


@pytest.fixture(scope="module")
def finetuned_audit(demo, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    members, nonmembers = texts
    result = audit(str(demo["finetuned"]), members, nonmembers + [SCRIPT], reference=str(demo["base"]), out=out,
                   settings=AuditSettings(bootstrap=200, top=100), progress=False)
    return result, out


def by_set(rows, name, field):
    return np.array([r[field] for r in rows if r["set"] == name], dtype=float)


def test_finetuned_against_base_memorized_the_members_only(finetuned_audit):
    result, out = finetuned_audit
    rows, summary = result.samples, result.summary
    members_mem_u = by_set(rows, "member", "mem_u_bits")
    nonmembers_mem_u = by_set(rows, "non-member", "mem_u_bits")
    # A member is ~40 characters of 17 equally likely ones: ~164 bits under the base.
    assert members_mem_u.min() > 100
    assert nonmembers_mem_u.mean() < 1.0
    for name, attack in summary["attacks"].items():
        assert attack["auc"] > 0.95, name
    assert set(summary["attacks"]) == {"loss", "reference", "zlib", "min_k", "min_k_pp", "dc_pdd"}
    sets = summary["sets"]
    assert sets["member"]["unintended_memorization_bits"] == pytest.approx(members_mem_u.sum())
    assert sets["member"]["generalization_bits"] == pytest.approx(
        8 * sets["member"]["bytes"] - sets["member"]["model_bits"] - members_mem_u.sum())
    assert summary["top"][0]["set"] == "member"
    for name in ("audit.json", "samples.jsonl", "roc.png", "memorization.png", "report.html"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "audit.json").read_text())["sets"] == json.loads(json.dumps(sets))
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(rows)


def test_base_against_itself_memorized_nothing(demo, texts):
    members, nonmembers = texts
    result = audit(str(demo["base"]), members, nonmembers, reference=str(demo["base"]), settings=FAST, progress=False)
    assert all(r["mem_u_bits"] == 0.0 for r in result.samples)  # exactly: the same model codes the same tokens
    for name, attack in result.summary["attacks"].items():
        lo, hi = attack["auc_interval"]
        assert lo <= 0.5 <= hi, (name, attack["auc"], lo, hi)
    assert result.summary["attacks"]["reference"]["auc"] == 0.5  # every score is 0


# --------------------------------------------------------------------------- bits, independently


def float64_bits(folder, text, width=None, stride=None):
    """-log2 p(text) in float64: BOS, then every token of the text, each given the context the documented
    window rule gives it (windows end at W, W + stride, ...; a token is coded in the first that reaches it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = [tokenizer.bos_token_id, *ids]
    width = width or model.config.n_positions
    stride = stride or width // 2
    ends, end = [], min(len(ids), width)
    while True:
        ends.append(end)
        if end == len(ids):
            break
        end = min(len(ids), end + stride)
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids) + 1):
            end = next(e for e in ends if e >= t)
            context = seq[max(0, end - width):t]
            logits = model(input_ids=torch.tensor([context])).logits[0, -1]
            total -= torch.log_softmax(logits, -1)[seq[t]].item() / math.log(2)
    return total, len(ids)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A second GPT-2 (random weights, context 32) with a byte-level BPE tokenizer: tokens unlike the letters'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(random_texts(300, 40, 9), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("bpe")
    new_gpt2(len(fast), 32, seed=5).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_bits_equal_a_float64_computation_across_tokenizers_and_windows(demo, texts, bpe_model):
    members, nonmembers = texts
    long_text = random_texts(1, 150, 11)[0]  # 150 letters: windows of 64 (letters) and of 32 (BPE)
    assert len(transformers.AutoTokenizer.from_pretrained(bpe_model)(long_text)["input_ids"]) > 32
    chosen_members, chosen_nonmembers = members[:3], nonmembers[:3] + [long_text]
    for stride in (None, 13):
        result = audit(str(demo["finetuned"]), chosen_members, chosen_nonmembers, reference=str(bpe_model),
                       settings=AuditSettings(stride=stride, bootstrap=0, batch_tokens=100), progress=False)
        for row, text in zip(result.samples, chosen_members + chosen_nonmembers):
            want, tokens = float64_bits(demo["finetuned"], text, stride=stride)
            assert row["model_tokens"] == tokens == len(text)  # one token a letter
            assert row["model_bits"] == pytest.approx(want, rel=1e-5, abs=1e-3)
            want, tokens = float64_bits(bpe_model, text, stride=stride)
            assert row["reference_tokens"] == tokens < len(text)
            assert row["reference_bits"] == pytest.approx(want, rel=1e-5, abs=1e-3)
            assert row["mem_u_bits"] == max(0.0, row["reference_bits"] - row["model_bits"])


def test_a_memk_checkpoint_is_audited_like_a_hugging_face_model(tmp_path):
    from memk.memorize.corpus import EOT_ID, train_tokenizer
    from memk.memorize.model import GPT, GPTConfig

    docs = random_texts(50, 40, 3)
    tokenizer = train_tokenizer(docs, 300)
    config = GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=tokenizer.get_vocab_size(), seq_len=16)
    torch.manual_seed(0)
    model = GPT(config).eval()
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "reference.json").write_text(json.dumps({"model": config.to_dict()}))
    torch.save(model.state_dict(), tmp_path / "reference" / "model.pt")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    texts = random_texts(4, 60, 4)  # longer than 16 tokens: windowed
    result = audit(str(tmp_path), texts[:2], texts[2:], reference=str(tmp_path / "reference"),
                   settings=AuditSettings(bootstrap=0), progress=False)
    model = model.double()
    for row, text in zip(result.samples, texts):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        seq = [EOT_ID, *ids]
        ends, end = [], min(len(ids), 16)
        while True:
            ends.append(end)
            if end == len(ids):
                break
            end = min(len(ids), end + 8)
        want = 0.0
        with torch.no_grad():
            for t in range(1, len(ids) + 1):
                e = next(e for e in ends if e >= t)
                logits = model(torch.tensor([seq[max(0, e - 16):t]]))[0, -1]
                want -= torch.log_softmax(logits, -1)[seq[t]].item() / math.log(2)
        assert row["model_bits"] == pytest.approx(want, rel=1e-5, abs=1e-3)
        assert row["mem_u_bits"] == 0.0


def test_a_model_held_in_memory_without_reference_gives_the_reference_free_results(demo, texts, finetuned_audit, tmp_path):
    from memk.memorize.audit.models import scoring_model_from

    members, nonmembers = texts
    module = transformers.AutoModelForCausalLM.from_pretrained(demo["finetuned"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo["finetuned"])
    result = audit(scoring_model_from(module, tokenizer, "held"), members, nonmembers, out=tmp_path, settings=FAST,
                   progress=False)
    from_folder = finetuned_audit[0].samples
    # Other batches (the fixture's audit has one more text): equal up to float32 rounding of the matmuls.
    assert [r["model_bits"] for r in result.samples] == pytest.approx(
        [r["model_bits"] for r in from_folder[:len(result.samples)]], rel=1e-6)
    assert all(r["mem_u_bits"] is None and "reference" not in r["attacks"] for r in result.samples)
    assert set(result.summary["attacks"]) == {"loss", "zlib", "min_k", "min_k_pp", "dc_pdd"}
    assert result.summary["reference"] is None and result.summary["top_ranked_by"] == "loss"
    assert "unintended_memorization_bits" not in result.summary["sets"]["member"]
    assert (tmp_path / "report.html").stat().st_size > 0


# --------------------------------------------------------------------------- resume


def test_an_interrupted_audit_resumes_without_redoing_finished_samples_and_never_mixes_settings(demo, texts, tmp_path):
    members, nonmembers = texts[0][:6], texts[1][:6]
    args = dict(reference=str(demo["base"]), out=tmp_path, settings=FAST, progress=False)
    first = audit(str(demo["finetuned"]), members, nonmembers, **args)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines[:5]]
    kept[0]["model_bits"] = 12345.0  # a mark: a row coded again would lose it
    # As a kill leaves it: five whole rows and a cut-off sixth.
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[5][:40])

    resumed = audit(str(demo["finetuned"]), members, nonmembers, **args)
    marked = next(r for r in resumed.samples if (r["set"], r["index"]) == (kept[0]["set"], kept[0]["index"]))
    assert marked["model_bits"] == 12345.0
    assert [r for r in resumed.samples if r is not marked] == [r for r in first.samples
                                                                if (r["set"], r["index"]) != (marked["set"], marked["index"])]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12

    other = audit(str(demo["finetuned"]), members, nonmembers, **{**args, "settings": AuditSettings(bootstrap=200, min_k=0.5)})
    assert all(r["model_bits"] != 12345.0 for r in other.samples)  # the other settings' rows were not reused
    assert list(tmp_path.glob("samples.jsonl.other-*"))


def small_sets(texts):
    return texts[0][:3], texts[1][:3]


def no_scoring(*args, **kwargs):
    raise AssertionError("a text was coded again")


def sample_lines(out):
    return (out / "samples.jsonl").read_bytes().split(b"\n")[:-1]


def in_order(rows):
    return sorted(rows, key=lambda r: (r["set"], r["index"]))


def test_the_same_command_again_on_a_finished_audit_rewrites_the_summary_and_codes_nothing(demo, texts, tmp_path,
                                                                                            capsys, monkeypatch):
    members, nonmembers = small_sets(texts)
    (tmp_path / "m.txt").write_text("\n".join(members) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(nonmembers) + "\n")
    command = ["--model", str(demo["finetuned"]), "--reference", str(demo["base"]), "--members", str(tmp_path / "m.txt"),
               "--non-members", str(tmp_path / "n.txt"), "--out", str(tmp_path / "out"), "--bootstrap", "0", "--top", "2"]
    code, err = run_memk(capsys, *command)
    assert code in (0, None), err
    rows = sample_lines(tmp_path / "out")
    monkeypatch.setattr(audit_module, "score_texts", no_scoring)  # every row is there: nothing to code
    code, err = run_memk(capsys, *command)
    assert code in (0, None), err
    assert len(json.loads((tmp_path / "out" / "audit.json").read_text())["top"]) == 2
    # As a kill after the last row and before the summary leaves it, then other summary settings.
    for name in ("audit.json", "report.html", "roc.png"):
        (tmp_path / "out" / name).unlink()
    code, err = run_memk(capsys, *command[:-4], "--bootstrap", "20", "--top", "5")
    assert code in (0, None), err
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert len(summary["top"]) == 5 and summary["settings"]["bootstrap"] == 20
    assert all(len(a["auc_interval"]) == 2 for a in summary["attacks"].values())
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    assert sample_lines(tmp_path / "out") == rows


def test_a_second_audit_into_the_folder_an_audit_is_writing_is_refused(demo, texts, tmp_path, monkeypatch):
    members, nonmembers = small_sets(texts)
    score, calls, refusals = audit_module.score_texts, [], []

    def score_while_another_starts(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first chunk's rows are in samples.jsonl: another audit starts into the folder
            with pytest.raises(ConfigError, match="another memk run is writing to") as refused:
                audit(str(demo["base"]), members, nonmembers, out=tmp_path, settings=AuditSettings(bootstrap=0),
                      progress=False)
            refusals.append(refused)
        return score(*args, **kwargs)

    monkeypatch.setattr(audit_module, "score_texts", score_while_another_starts)
    result = audit(str(demo["finetuned"]), members, nonmembers, out=tmp_path,
                   settings=AuditSettings(bootstrap=0, chunk=2), progress=False)
    assert len(refusals) == 1
    assert not list(tmp_path.glob("samples.jsonl.*"))  # nothing of the first audit was set aside
    written = in_order(json.loads(line) for line in sample_lines(tmp_path))
    assert len(written) == 6 and written == in_order(result.samples)


def test_audits_of_other_keys_set_aside_within_one_second_are_all_kept(demo, texts, tmp_path, monkeypatch):
    class SameSecond(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 11, 27, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(audit_module, "datetime", type("clock", (), {"datetime": SameSecond,
                                                                     "timezone": datetime.timezone}))
    members, nonmembers = texts[0][:2], texts[1][:2]
    keys = []
    for min_k in (0.1, 0.2, 0.3, 0.4):  # four keys
        audit(str(demo["finetuned"]), members, nonmembers, out=tmp_path, settings=AuditSettings(bootstrap=0, min_k=min_k),
              progress=False)
        keys.append(json.loads(sample_lines(tmp_path)[0])["key"])
    aside = sorted(tmp_path.glob("samples.jsonl.other-*"))
    assert len(set(keys)) == 4 and len(aside) == 3
    assert sorted(json.loads(p.read_text().splitlines()[0])["key"] for p in aside) == sorted(keys[:3])


def test_weights_changed_in_place_with_the_same_size_and_date_are_coded_again(demo, texts, tmp_path):
    members, nonmembers = small_sets(texts)
    model = tmp_path / "model"
    shutil.copytree(demo["finetuned"], model)
    weights, base_weights = model / "model.safetensors", (demo["base"] / "model.safetensors").read_bytes()
    before = weights.stat()
    assert len(base_weights) == before.st_size
    settings = AuditSettings(bootstrap=0)
    first = audit(str(model), members, nonmembers, out=tmp_path / "out", settings=settings, progress=False)
    weights.write_bytes(base_weights)  # the base's weights, under the fine-tuned one's size and date
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = audit(str(model), members, nonmembers, out=tmp_path / "out", settings=settings, progress=False)
    base = audit(str(demo["base"]), members, nonmembers, settings=settings, progress=False)
    assert [r["model_bits"] for r in again.samples] == pytest.approx([r["model_bits"] for r in base.samples], rel=1e-6)
    assert all(a["model_bits"] < b["model_bits"] - 50 for a, b in zip(first.samples[:3], again.samples[:3]))


def _list_line(rows):
    return rows[:1] + [b"[1, 2]"] + rows[2:], 2, b"[1, 2]"


def _row_missing_a_field(rows):
    row = json.loads(rows[1])
    del row["model_bits"]
    line = json.dumps(row).encode()
    return rows[:1] + [line] + rows[2:], 2, line


def _non_utf8_tail(rows):
    return rows + [b'\xff\xfe{"key": "cut'], len(rows) + 1, b'\xff\xfe{"key": "cut'


@pytest.mark.parametrize("damage", [_list_line, _row_missing_a_field, _non_utf8_tail])
def test_a_damaged_sample_row_is_set_aside_with_a_warning_and_coded_again(demo, texts, tmp_path, capsys, damage):
    members, nonmembers = small_sets(texts)
    args = dict(reference=str(demo["base"]), out=tmp_path, settings=AuditSettings(bootstrap=0), progress=False)
    first = audit(str(demo["finetuned"]), members, nonmembers, **args)
    lines, number, bad = damage(sample_lines(tmp_path))
    (tmp_path / "samples.jsonl").write_bytes(b"".join(line + b"\n" for line in lines[:-1]) + lines[-1])
    capsys.readouterr()
    again = audit(str(demo["finetuned"]), members, nonmembers, **args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"samples.jsonl line {number} is damaged" in err[0] and "coded again" in err[0], err
    assert (tmp_path / "samples.jsonl.damaged").read_bytes() == bad + b"\n"
    assert [(r["set"], r["index"], r["sha1"]) for r in again.samples] == [(r["set"], r["index"], r["sha1"])
                                                                          for r in first.samples]
    assert [r["model_bits"] for r in again.samples] == pytest.approx([r["model_bits"] for r in first.samples], rel=1e-6)
    assert in_order(json.loads(line) for line in sample_lines(tmp_path)) == in_order(again.samples)


def test_without_min_k_pp_the_other_attacks_and_bits_are_unchanged(demo, finetuned_audit, tmp_path, capsys):
    code, err = run_memk(capsys, "--model", str(demo["finetuned"]), "--reference", str(demo["base"]),
                         "--members", str(demo["members"]), "--non-members", str(demo["non_members"]),
                         "--out", str(tmp_path), "--no-min-k-pp", "--bootstrap", "200")
    assert code in (0, None), err
    lean = json.loads((tmp_path / "audit.json").read_text())
    full = finetuned_audit[0].summary
    assert "min_k_pp" not in lean["attacks"] and set(lean["attacks"]) == set(full["attacks"]) - {"min_k_pp"}
    for name in lean["attacks"]:
        assert lean["attacks"][name]["auc"] == pytest.approx(full["attacks"][name]["auc"], abs=0.02)  # one text fewer
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    full_rows = {(r["set"], r["index"]): r for r in finetuned_audit[0].samples}
    for r in rows:
        f = full_rows[(r["set"], r["index"])]
        assert r["model_bits"] == f["model_bits"] and r["reference_bits"] == f["reference_bits"]
        # DC-PDD is calibrated by the non-members' token counts, which differ here by the fixture's SCRIPT text.
        assert {k: v for k, v in r["attacks"].items() if k != "dc_pdd"} == {
            k: v for k, v in f["attacks"].items() if k not in ("min_k_pp", "dc_pdd")}


def test_recall_and_dc_pdd_tell_the_memorized_members_from_non_members(demo, texts):
    members, nonmembers = texts
    result = audit(str(demo["finetuned"]), members, nonmembers, settings=AuditSettings(bootstrap=0, recall_shots=2,
                                                                                        extract_prefixes=()),
                   progress=False)
    for name in ("recall", "dc_pdd"):
        assert result.summary["attacks"][name]["auc"] > 0.9, name
    recall = [r["attacks"].get("recall") for r in result.samples]
    assert recall.count(None) == 2  # the prefix's two non-members


@pytest.mark.cuda
def test_on_cuda_the_audit_codes_as_on_the_cpu_in_float32_and_close_in_bfloat16(tmp_path):
    """A GPT-2 from a config (random weights: no training needed to compare devices), saved, and its
    texts coded on the CPU in float32, then on CUDA in float32 and in bfloat16 weights."""
    from memk.bench.audit_demo import char_tokenizer

    tokenizer = char_tokenizer()
    new_gpt2(len(tokenizer), context=64, seed=0).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    texts = random_texts(12, 100, seed=1)  # longer than the context: the window runs on the GPU too
    settings = AuditSettings(bootstrap=0, window=64, stride=32)
    bits, runs = {}, {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        result = audit(str(tmp_path / "gpt2"), texts[:6], texts[6:], device=device, dtype=dtype, settings=settings,
                       progress=False)
        assert result.summary["model"]["dtype"] == dtype
        bits[device, dtype] = np.array([r["model_bits"] for r in result.samples])
        runs[device, dtype] = [c["run"] for r in result.samples for c in r["extraction"].values()]
    np.testing.assert_allclose(bits["cuda", "float32"], bits["cpu", "float32"], rtol=1e-4)
    # Greedy decoding on the GPU (KV cache, batched) says what it says on the CPU, but for a rare near-tie
    # of two tokens' logits that float32 rounding on another device can flip.
    same = np.mean(np.array(runs["cuda", "float32"]) == np.array(runs["cpu", "float32"]))
    assert len(runs["cpu", "float32"]) == 36 and same >= 0.9, same
    # bfloat16 weights round each logit to ~3 digits; over 100 tokens the code length moves by well under 2%.
    np.testing.assert_allclose(bits["cuda", "bfloat16"], bits["cpu", "float32"], rtol=2e-2)
    assert not np.array_equal(bits["cuda", "bfloat16"], bits["cpu", "float32"])  # bfloat16 really was used


def test_a_model_held_in_memory_is_scored_as_it_is_or_the_mismatch_named(demo, texts):
    from memk.memorize.audit.models import scoring_model_from
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = scoring_model_from(AutoModelForCausalLM.from_pretrained(str(demo["base"])),
                              AutoTokenizer.from_pretrained(str(demo["base"])), "held base")
    with pytest.raises(ConfigError, match="holds float32 weights, but dtype 'bfloat16' was asked for"):
        audit(held, texts[0][:2], texts[1][:2], dtype="bfloat16", settings=FAST, progress=False)
    assert audit(held, texts[0][:2], texts[1][:2], dtype="float32", settings=FAST, progress=False).samples


# --------------------------------------------------------------------------- report


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_one_page_with_tables_inline_images_and_escaped_text(finetuned_audit):
    _, out = finetuned_audit
    page_html = (out / "report.html").read_text()
    page = Page()
    page.feed(page_html)
    page.close()
    assert page.tags.count("table") >= 4  # models, sets, attacks, top samples
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "script" not in page.tags  # the sample's <script> is text, not a tag
    assert SCRIPT in "".join(page.text)
    assert "&lt;script&gt;" in page_html and "<script>" not in page_html


# --------------------------------------------------------------------------- inputs and errors


def test_inputs_from_jsonl_and_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.jsonl").write_text('{"body": "first", "n": 1}\n\n{"body": "second"}\n')
    assert read_texts(str(tmp_path / "a.jsonl"), column="body") == ["first", "second"]
    datasets.Dataset.from_dict({"text": ["x y", "", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_texts(str(tmp_path / "ds")) == ["x y", "z"]
    with pytest.raises(ConfigError, match="no column 'body'"):
        read_texts(str(tmp_path / "ds"), column="body")


def test_text_files_are_split_at_newlines_only_and_json_strings_may_hold_line_separators(tmp_path):
    (tmp_path / "a.txt").write_bytes("one\x0cpage\u2028two\x85three\r\nsecond\rline\n\n  \r\nlast".encode())
    assert read_texts(str(tmp_path / "a.txt")) == ["one\x0cpage\u2028two\x85three", "second\rline", "last"]
    (tmp_path / "b.jsonl").write_bytes('{"text": "a\u2028b"}\r\n{"text": "c\x85d\u2029e"}\n'.encode())  # valid JSON
    assert read_texts(str(tmp_path / "b.jsonl")) == ["a\u2028b", "c\x85d\u2029e"]


def test_audit_help_imports_neither_torch_nor_transformers():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from memk.cli.main import cli\n"
            "result = CliRunner().invoke(cli, ['audit', '--help'])\n"
            "assert result.exit_code == 0 and '--non-members' in result.output, result.output\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_transformers_the_error_names_the_extra(demo, monkeypatch):
    from memk.memorize.audit.models import load_scoring_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "memk\[audit\]"'):
        load_scoring_model(str(demo["base"]), torch.device("cpu"), torch.float32)


def run_memk(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        memk_main(["audit", *args, "--no-progress"])
    return exit_.value.code, capsys.readouterr().err


@pytest.fixture
def bad_inputs(demo, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "rows.jsonl").write_text('{"body": "a text"}\n')
    (tmp_path / "no_lm").mkdir()
    (tmp_path / "a_file").write_text("")
    transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=50).save_pretrained(tmp_path / "t5")
    shutil.copytree(demo["finetuned"], tmp_path / "truncated")
    with open(tmp_path / "truncated" / "model.safetensors", "r+b") as f:  # as a copy cut short leaves it
        f.truncate(os.path.getsize(tmp_path / "truncated" / "model.safetensors") // 2)
    return tmp_path


@pytest.mark.parametrize("case,fault", [
    ("missing model folder", "does not exist"),
    ("folder without a model", "not a causal language model"),
    ("not a causal LM", "not a causal language model"),
    ("truncated weights", "cannot load folder"),
    ("empty members", "holds no texts"),
    ("empty non-members", "holds no texts"),
    ("missing column", "no column 'text'"),
    ("unwritable output", "not writable"),
    ("cuda without a GPU", "no CUDA device"),
])
def test_bad_input_is_one_line_and_exit_status_2(capsys, demo, bad_inputs, case, fault):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = {"--model": str(demo["finetuned"]), "--members": str(demo["members"]),
            "--non-members": str(demo["non_members"]), "--out": str(bad_inputs / "out")}
    args.update({
        "missing model folder": {"--model": str(bad_inputs / "nowhere")},
        "folder without a model": {"--model": str(bad_inputs / "no_lm")},
        "not a causal LM": {"--model": str(bad_inputs / "t5")},
        "truncated weights": {"--model": str(bad_inputs / "truncated")},
        "empty members": {"--members": str(bad_inputs / "empty.txt")},
        "empty non-members": {"--non-members": str(bad_inputs / "empty.txt")},
        "missing column": {"--members": str(bad_inputs / "rows.jsonl")},
        "unwritable output": {"--out": str(bad_inputs / "a_file" / "out")},
        "cuda without a GPU": {"--device": "cuda"},
    }[case])
    code, err = run_memk(capsys, *[x for pair in args.items() for x in pair])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("memk: error: ") and fault in err, err


def test_a_full_disk_during_the_audit_is_one_line_and_exit_status_2(capsys, demo, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(audit_module, "_append_rows", full)
    code, err = run_memk(capsys, "--model", str(demo["finetuned"]), "--members", str(demo["members"]),
                         "--non-members", str(demo["non_members"]), "--out", str(tmp_path), "--bootstrap", "0")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("memk: error: no space left") and "run the same command" in err, err


@pytest.mark.slow
def test_the_command_end_to_end_in_a_fresh_process(demo, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "memk.cli", "audit", "--model", str(demo["finetuned"]), "--reference", str(demo["base"]),
         "--members", str(demo["members"]), "--non-members", str(demo["non_members"]), "--out", str(tmp_path / "a"),
         "--bootstrap", "100", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    assert "Min-K%++" in result.stdout and "mem_U" in result.stdout
    summary = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert summary["sets"]["member"]["unintended_memorization_bits"] > 100 * summary["sets"]["member"]["samples"]
    shutil.rmtree(tmp_path / "a")


# --------------------------------------------------------------------------- extraction


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


# --------------------------------------------------------------------------- several references


def test_several_references_code_each_sample_with_the_best_and_report_each(demo, texts, tmp_path):
    from memk.memorize.membership import roc_auc

    members, nonmembers = texts[0][:4], texts[1][:4]
    settings = AuditSettings(bootstrap=0, extract_prefixes=())
    refs = [str(demo["base"]), str(demo["finetuned"])]  # the base codes non-members best, the fine-tune members
    both = audit(str(demo["finetuned"]), members, nonmembers, reference=refs, out=tmp_path, settings=settings,
                 progress=False)
    alone = [audit(str(demo["finetuned"]), members, nonmembers, reference=r, settings=settings, progress=False)
             for r in refs]
    for n, row in enumerate(both.samples):
        each = [a.samples[n] for a in alone]
        assert [r["bits"] for r in row["references"]] == pytest.approx([e["reference_bits"] for e in each], rel=1e-12)
        best = int(np.argmin([e["reference_bits"] for e in each]))  # -log2 max_R p_R(x): the shortest code
        assert row["best_reference"] == best and row["reference_tokens"] == each[best]["reference_tokens"]
        assert row["reference_bits"] == pytest.approx(min(e["reference_bits"] for e in each), rel=1e-12)
        assert row["mem_u_bits"] == pytest.approx(max(0.0, row["reference_bits"] - row["model_bits"]), abs=1e-9)
        for i, e in enumerate(each):
            assert row["references"][i]["mem_u_bits"] == pytest.approx(e["mem_u_bits"], abs=1e-9)
            assert row["attacks"][f"reference_{i + 1}"] == pytest.approx(e["attacks"]["reference"], abs=1e-9)
    assert {r["best_reference"] for r in both.samples} == {0, 1}
    assert [r["best_reference"] for r in both.samples if r["set"] == "member"] == [1] * 4
    summary = both.summary
    for name in ("member", "non-member"):
        group = [r for r in both.samples if r["set"] == name]
        assert summary["sets"][name]["unintended_memorization_bits"] == pytest.approx(
            sum(r["mem_u_bits"] for r in group))
        for i in range(2):
            assert summary["sets"][name]["references"][i]["unintended_memorization_bits"] == pytest.approx(
                alone[i].summary["sets"][name]["unintended_memorization_bits"])
    scores = [[r["reference_bits"] - r["model_bits"] for r in both.samples if r["set"] == s]
              for s in ("member", "non-member")]
    assert summary["attacks"]["reference"]["auc"] == pytest.approx(roc_auc(*scores))
    for i in range(2):
        assert summary["attacks"][f"reference_{i + 1}"]["auc"] == pytest.approx(
            alone[i].summary["attacks"]["reference"]["auc"])
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["reference"]["best_of"] == refs and [r["spec"] for r in written["references"]] == refs
    assert "Each reference alone" in (tmp_path / "report.html").read_text()
    # One reference: its rows and summary keep the format they had.
    assert not {"references", "best_reference"} & set(alone[0].samples[0])
    assert alone[0].summary["reference"]["spec"] == refs[0] and "reference_1" not in alone[0].summary["attacks"]


# --------------------------------------------------------------------------- PEFT adapters


@pytest.fixture(scope="module")
def adapter(demo, texts, tmp_path_factory):
    """A LoRA adapter trained here on the demo base, a few steps on 8 members, saved by peft."""
    pytest.importorskip("peft")
    from memk.bench.audit_demo import build_adapter

    folder = build_adapter(demo["base"], texts[0][:8], tmp_path_factory.mktemp("lora") / "adapter", steps=40, lr=2e-2,
                           rank=4, modules=("c_attn",))
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(demo["base"])
    return folder


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's and transformers' notes to each other
def test_a_lora_adapter_is_audited_as_its_merged_model_against_its_base(demo, texts, adapter, tmp_path):
    peft = pytest.importorskip("peft")
    members, nonmembers = texts[0][:4], texts[1][:4]
    settings = AuditSettings(bootstrap=0, extract_prefixes=(8,), extract_length=8)
    got = audit(str(adapter), members, nonmembers, out=tmp_path / "a", settings=settings, progress=False)
    # Independently: the adapter merged here by peft, saved as a plain model, audited against the base.
    base = transformers.AutoModelForCausalLM.from_pretrained(str(demo["base"]))
    peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(tmp_path / "merged")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(demo["base"]))
    tokenizer.save_pretrained(tmp_path / "merged")
    want = audit(str(tmp_path / "merged"), members, nonmembers, reference=str(demo["base"]), settings=settings,
                 progress=False)
    for a, b in zip(got.samples, want.samples):
        assert a["model_bits"] == pytest.approx(b["model_bits"], rel=1e-6)
        assert a["reference_bits"] == pytest.approx(b["reference_bits"], rel=1e-9)
        assert a["mem_u_bits"] == pytest.approx(b["mem_u_bits"], abs=1e-3)
        assert a["extraction"] == b["extraction"]
    assert sum(r["mem_u_bits"] for r in got.samples if r["set"] == "member") > 1.0  # the adapter changed the model
    reference = got.summary["reference"]
    assert reference["spec"] == str(demo["base"]) and "base of adapter" in reference["default_reference"]
    assert got.summary["model"]["kind"] == "peft-adapter"
    assert got.summary["model"]["adapter"]["base"] == str(demo["base"])
    # And peft's own unmerged forward (base + scaled B A x), in float64, codes a member in the same bits.
    unmerged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(demo["base"]), dtype=torch.float64), str(adapter)).eval()
    seq = [tokenizer.bos_token_id, *tokenizer(members[0], add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logp = torch.log_softmax(unmerged(input_ids=torch.tensor([seq])).logits[0, :-1], -1)
    bits = -logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].sum().item() / math.log(2)
    assert got.samples[0]["model_bits"] == pytest.approx(bits, rel=1e-5)
    assert "adapter" in (tmp_path / "a" / "report.html").read_text()


def test_the_resume_key_covers_the_adapter_and_its_base(demo, adapter, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from memk.memorize.audit.models import load_scoring_model

    def fingerprint(folder, base_model=None):
        return load_scoring_model(str(folder), torch.device("cpu"), torch.float32, base_model).fingerprint

    shutil.copytree(adapter, tmp_path / "lora" / "adapter")
    shutil.copytree(demo["base"], tmp_path / "lora" / "base")
    config_file = tmp_path / "lora" / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))  # beside the adapter
    monkeypatch.chdir(tmp_path)  # where no ../base is
    first = fingerprint(tmp_path / "lora" / "adapter")
    weights = tmp_path / "lora" / "adapter" / "adapter_model.safetensors"
    save_file({name: 2 * w if "lora_B" in name else w for name, w in load_file(weights).items()}, weights)
    second = fingerprint(tmp_path / "lora" / "adapter")
    assert second["adapter"] != first["adapter"] and second["base"] == first["base"]
    shutil.copy(demo["finetuned"] / "model.safetensors", tmp_path / "lora" / "base" / "model.safetensors")
    third = fingerprint(tmp_path / "lora" / "adapter")
    assert third["base"] != second["base"] and third["adapter"] == second["adapter"]
    given = load_scoring_model(str(tmp_path / "lora" / "adapter"), torch.device("cpu"), torch.float32,
                               str(demo["base"]))
    assert given.fingerprint["base"]["files"] == first["base"]["files"]  # the same weights, in another folder
    assert given.details["adapter"]["base_given_by"] == "--base-model"
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="is no folder here; give the base model's folder with --base-model"):
        fingerprint(tmp_path / "lora" / "adapter")
    with pytest.raises(ConfigError, match="--base-model is for a PEFT adapter"):
        fingerprint(demo["finetuned"], str(demo["base"]))


def test_without_peft_an_adapter_names_the_extra(adapter, monkeypatch):
    from memk.memorize.audit.models import load_scoring_model

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ConfigError, match=r'is a PEFT adapter; .* needs the peft package: pip install "memk\[peft\]"'):
        load_scoring_model(str(adapter), torch.device("cpu"), torch.float32)


# --------------------------------------------------------------------------- names, folders, report (issue 22)


def no_hub(*args, **kwargs):
    raise AssertionError("the Hugging Face Hub was asked")


@pytest.mark.parametrize("name", ["audit-demo/finetund", "./finetund", "~/memk-no-such-folder-8d2f", "a/b/c",
                                  "audit-demo/finetund/"])
def test_a_missing_local_model_folder_is_named_at_once_without_asking_the_hub(capsys, demo, tmp_path, monkeypatch,
                                                                              name):
    from memk.memorize.audit import models as audit_models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "audit-demo").mkdir()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    monkeypatch.setattr(audit_models, "_reachable", no_hub)
    code, err = run_memk(capsys, "--model", name, "--members", str(demo["members"]), "--non-members",
                         str(demo["non_members"]), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and f"model folder {name} does not exist" in err, err
    assert not (tmp_path / "out").exists()  # nor did the refused start leave its output folder


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_a_hub_name_is_looked_up_in_the_cache_alone(capsys, demo, tmp_path, monkeypatch, offline):
    from memk.memorize.audit import models as audit_models

    asked = []

    def cache_only(source, **kwargs):
        asked.append((kwargs.get("local_files_only"), kwargs.get("adapter_kwargs")))  # peft's adapter look-up too
        raise OSError(f"{source} is not in the cached files")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", cache_only)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(audit_models, "_reachable", no_hub)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(audit_models, "_reachable", lambda endpoint, seconds: False)
    code, err = run_memk(capsys, "--model", "nobody/no-such-model", "--members", str(demo["members"]),
                         "--non-members", str(demo["non_members"]), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "not in the local cache" in err, err
    assert asked == [(True, {"local_files_only": True})]


def test_a_refused_start_leaves_no_folder_it_created(capsys, demo, bad_inputs, tmp_path):
    args = ["--members", str(demo["members"]), "--non-members", str(demo["non_members"])]
    code, err = run_memk(capsys, "--model", str(bad_inputs / "t5"), *args, "--out", str(tmp_path / "new" / "deeper"))
    assert code == 2 and "not a causal language model" in err, err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    code, err = run_memk(capsys, "--model", str(bad_inputs / "t5"), *args, "--out", str(tmp_path / "kept"))
    assert code == 2 and (tmp_path / "kept").is_dir()  # a folder it did not make stays


def test_the_report_has_a_page_margin_and_headings_in_words(finetuned_audit):
    import re

    result, out = finetuned_audit
    page = (out / "report.html").read_text()
    headings = re.findall(r"<h[23]>(.*?)</h[23]>", page)
    count = len(result.summary["top"])
    assert f"Top {count} most-memorized samples (unintended memorization, bits)" in headings
    assert not [h for h in headings if "_" in h]  # no field names
    assert re.search(r"body \{[^}]*padding: 0 2em", page)
