"""`memk audit` (memorize/audit/audit.py) on Hugging Face GPT-2s built here (nothing downloaded): a base trained
briefly on random letter strings, and a copy fine-tuned on the members until it memorized them
(memk.bench.audit_demo): what it finds, its bits against a float64 computation, held models, bad input, the
command end to end. Each other module's tests are in tests/test_audit_<module>.py."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from memk.bench.audit_demo import new_gpt2, random_texts
from memk.cli.main import main as memk_main
from memk.memorize.audit import audit as audit_module
from memk.memorize.audit.audit import AuditSettings, audit
from memk.memorize.errors import ConfigError

transformers = pytest.importorskip("transformers")
SCRIPT = "<script>alert('memorized')</script> & co"
FAST = AuditSettings(bootstrap=200)


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


# --------------------------------------------------------------------------- models held, settings, devices


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


def test_a_model_held_in_memory_is_scored_as_it_is_or_the_mismatch_named(demo, texts):
    from memk.memorize.audit.models import scoring_model_from
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = scoring_model_from(AutoModelForCausalLM.from_pretrained(str(demo["base"])),
                              AutoTokenizer.from_pretrained(str(demo["base"])), "held base")
    with pytest.raises(ConfigError, match="holds float32 weights, but dtype 'bfloat16' was asked for"):
        audit(held, texts[0][:2], texts[1][:2], dtype="bfloat16", settings=FAST, progress=False)
    assert audit(held, texts[0][:2], texts[1][:2], dtype="float32", settings=FAST, progress=False).samples


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


# --------------------------------------------------------------------------- the command and its errors


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

    monkeypatch.setattr(audit_module, "append_rows", full)
    code, err = run_memk(capsys, "--model", str(demo["finetuned"]), "--members", str(demo["members"]),
                         "--non-members", str(demo["non_members"]), "--out", str(tmp_path), "--bootstrap", "0")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("memk: error: no space left") and "run the same command" in err, err


def test_a_refused_start_leaves_no_folder_it_created(capsys, demo, bad_inputs, tmp_path):
    args = ["--members", str(demo["members"]), "--non-members", str(demo["non_members"])]
    code, err = run_memk(capsys, "--model", str(bad_inputs / "t5"), *args, "--out", str(tmp_path / "new" / "deeper"))
    assert code == 2 and "not a causal language model" in err, err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    code, err = run_memk(capsys, "--model", str(bad_inputs / "t5"), *args, "--out", str(tmp_path / "kept"))
    assert code == 2 and (tmp_path / "kept").is_dir()  # a folder it did not make stays


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
