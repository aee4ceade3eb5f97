"""Small Hugging Face models to try `memk audit` on, built here in a minute on a CPU, nothing downloaded.

    python -m memk.bench.audit_demo --out audit-demo

writes audit-demo/base (a GPT-2 from a config, a character tokenizer, trained briefly on random
letter strings so it knows the alphabet), audit-demo/finetuned (base fine-tuned on the members
until it memorized them), audit-demo/members.txt and audit-demo/non_members.txt (fresh strings
from the same generator), and prints the `memk audit` command to run on them. With --adapter (needs
peft), also audit-demo/adapter: a LoRA adapter on the base, trained on the members (about 15 s more).
tests/test_audit.py builds its models with the same functions.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ALPHABET = "abcdefghijklmnop "  # 16 letters and the space
START = "<s>"


def char_tokenizer(alphabet: str = ALPHABET):
    """A transformers fast tokenizer with one token per character, <s> as its BOS and EOS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {START: 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=START, eos_token=START, unk_token="<unk>")


def random_texts(count: int, length: int, seed: int, alphabet: str = ALPHABET) -> list[str]:
    """Strings of `length` characters drawn uniformly from the alphabet, never starting or ending in a space."""
    rng = random.Random(seed)
    letters = alphabet.replace(" ", "")
    return [rng.choice(letters) + "".join(rng.choice(alphabet) for _ in range(length - 2)) + rng.choice(letters)
            for _ in range(count)]


def new_gpt2(vocab_size: int, context: int, seed: int, d_model: int = 64, layers: int = 2, heads: int = 2):
    """A GPT-2 from a config, random weights (seeded)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=d_model, n_layer=layers, n_head=heads,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def train_lm(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int, batch_size: int = 32) -> float:
    """Next-token training on [BOS] + text (texts of one token length), AdamW; the last loss in nats."""
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor([[tokenizer.bos_token_id, *t] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = ids[torch.randperm(len(ids))[:batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def build_demo(out: Path, members: int = 32, non_members: int = 32, length: int = 40, context: int = 64,
               base_steps: int = 150, finetune_steps: int = 300, seed: int = 0) -> dict[str, Path]:
    """The base and fine-tuned models and the member / non-member files, in out; their paths."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (20x so on a busy 2-core CPU)
    try:
        paths = _build(out, members, non_members, length, context, base_steps, finetune_steps, seed)
    finally:
        torch.set_num_threads(threads)
    return paths


def _build(out, members, non_members, length, context, base_steps, finetune_steps, seed):
    import copy

    tokenizer = char_tokenizer()
    base = new_gpt2(len(tokenizer), context, seed)
    train_lm(base, tokenizer, random_texts(512, length, seed + 1), base_steps, 3e-3, seed, batch_size=64)
    member_texts = random_texts(members, length, seed + 2)
    fine = copy.deepcopy(base)
    train_lm(fine, tokenizer, member_texts, finetune_steps, 3e-3, seed)
    paths = {"base": out / "base", "finetuned": out / "finetuned",
             "members": out / "members.txt", "non_members": out / "non_members.txt"}
    for name, model in (("base", base), ("finetuned", fine)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["members"].write_text("\n".join(member_texts) + "\n")
    paths["non_members"].write_text("\n".join(random_texts(non_members, length, seed + 3)) + "\n")
    return paths


def build_adapter(base: Path, texts: list[str], out: Path, steps: int = 400, lr: float = 1e-2, rank: int = 16,
                  modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"), seed: int = 0) -> Path:
    """A LoRA adapter (peft) on the GPT-2 in `base`, trained on `texts`, saved by peft in `out`: an
    adapter_config.json naming base as its base_model_name_or_path, beside the adapter's weights."""
    import warnings

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar for a model of 28 tensors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft's and transformers' deprecation notes to each other
            model = AutoModelForCausalLM.from_pretrained(str(base))
            tokenizer = AutoTokenizer.from_pretrained(str(base))
            torch.manual_seed(seed)  # LoRA's A matrices are drawn at random
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(modules),
                                                     fan_in_fan_out=True, lora_dropout=0.0))  # GPT-2's Conv1D layers
            train_lm(model, tokenizer, texts, steps, lr, seed, batch_size=min(32, len(texts)))
            model.save_pretrained(str(out))
    finally:
        torch.set_num_threads(threads)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="audit-demo", help="folder to write the models and texts to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", action="store_true", help="also a LoRA adapter on the base (needs peft)")
    args = parser.parse_args(argv)
    paths = build_demo(Path(args.out), seed=args.seed)
    audit_folder = Path(args.out) / "audit"
    print(f"built {paths['base']} and {paths['finetuned']}; now run:\n"
          f"  memk audit --model {paths['finetuned']} --reference {paths['base']} "
          f"--members {paths['members']} --non-members {paths['non_members']} --out {audit_folder}")
    if args.adapter:
        members = paths["members"].read_text().splitlines()
        adapter = build_adapter(paths["base"], members, Path(args.out) / "adapter", seed=args.seed)
        print(f"built {adapter}, a LoRA adapter on {paths['base']}; audit it (its base is the reference) with:\n"
              f"  memk audit --model {adapter} --members {paths['members']} --non-members {paths['non_members']} "
              f"--out {Path(args.out) / 'audit-adapter'}")


if __name__ == "__main__":
    main()
