"""Loading the models `memk audit` codes with (memorize/audit/models.py): memk checkpoints, PEFT adapters, missing
folders and Hub names offline, against direct computations and the errors' one line; the demo's GPT-2s
(memk.bench.audit_demo) built here, nothing downloaded."""

import json
import math
import shutil
import sys

import pytest
import torch

from memk.bench.audit_demo import random_texts
from memk.cli.main import main as memk_main
from memk.memorize.audit.audit import AuditSettings, audit
from memk.memorize.errors import ConfigError

transformers = pytest.importorskip("transformers")


def run_memk(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        memk_main(["audit", *args, "--no-progress"])
    return exit_.value.code, capsys.readouterr().err


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


def test_without_transformers_the_error_names_the_extra(demo, monkeypatch):
    from memk.memorize.audit.models import load_scoring_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "memk\[audit\]"'):
        load_scoring_model(str(demo["base"]), torch.device("cpu"), torch.float32)


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


# --------------------------------------------------------------------------- names, folders, the Hub


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


# --------------------------------------------------------------------------- dtypes and names, known answers


def test_auto_dtype_is_float32_on_the_cpu_and_other_names_are_refused():
    from memk.memorize.audit.models import resolve_dtype

    cpu = torch.device("cpu")
    assert [resolve_dtype(name, cpu) for name in ("auto", "float32", "bfloat16", "float16")] == [
        torch.float32, torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ConfigError, match="unknown dtype 'float8'; choose auto, float32, bfloat16, float16"):
        resolve_dtype("float8", cpu)


@pytest.mark.parametrize("name, local", [
    ("gpt2", False), ("openai-community/gpt2", False), ("./gpt2", True), ("/models/gpt2", True), ("~/gpt2", True),
    ("a/b/c", True), ("no spaces/in ids", True), ("here/gpt2", True)])
def test_a_name_is_a_local_folder_where_it_can_be_nothing_else(tmp_path, monkeypatch, name, local):
    from memk.memorize.audit.models import looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()  # "here/gpt2": its first part is a folder here
    assert looks_like_path(name) is local
