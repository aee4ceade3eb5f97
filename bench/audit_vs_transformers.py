"""Samples per second and peak memory of `memk audit`'s scoring against the loops a user would write
with transformers, on the same GPT-2-shaped model (V 50257, small layers, random weights from a
config) and the same texts:

- memk_bits: memorize.audit_scoring.score_texts, what the audit runs per model (bits only);
- memk_audit: memorize.audit.audit with no reference, no bootstrap and no extraction: the bits plus
  Min-K%++'s per-token moments, the attacks and the summary;
- hf_loss_loop: model(ids, labels=ids).loss per sample, times its tokens;
- hf_padded_batch: batches of 16 texts in input order (every text fits the context), right-padded, log_softmax over the whole
  logits + gather, masked sum.

Each method runs in a fresh process (so each peak is its own): peak memory is the rise of the
process's peak RSS (CPU; reset through /proc/self/clear_refs) or of torch's peak CUDA allocation
over what the loaded model held. Every method's bits are checked against memk_bits.

    python -m memk.bench.audit_vs_transformers [--device cpu|cuda] [--out FILE]

writes bench/results/audit-vs-transformers-<device>.json (machine, date, load average, versions).
`--smoke` runs tiny sizes in seconds, for checking the script only (it writes a file only with --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("memk_bits", "memk_audit", "hf_loss_loop", "hf_padded_batch")
PADDED_BATCH = 16
SIZES = {  # texts, shortest and longest in tokens, model width and layers, context
    "full": dict(texts=64, shortest=32, longest=511, d_model=128, layers=2, context=512, vocab=50257),
    "smoke": dict(texts=12, shortest=8, longest=40, d_model=32, layers=1, context=64, vocab=50257),
}


def build(folder: Path, size: dict, seed: int = 0) -> None:
    """The model (random weights from a config), a byte-level BPE tokenizer and the texts, saved in folder."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .audit_demo import new_gpt2

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([" ".join(words[i:i + 50]) for i in range(0, 3000, 50)], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    texts = []
    for _ in range(size["texts"]):  # goal tokens or one fewer: the plain loops need BOS + text within the context
        goal = rng.randint(size["shortest"], size["longest"])
        text = rng.choice(words)
        while True:
            longer = text + " " + rng.choice(words)
            if len(fast(longer)["input_ids"]) > goal:
                break
            text = longer
        texts.append(text)
    model = new_gpt2(size["vocab"], size["context"], seed, d_model=size["d_model"], layers=size["layers"], heads=2)
    model.save_pretrained(folder / "model")
    fast.save_pretrained(folder / "model")
    (folder / "texts.json").write_text(json.dumps(texts))


def _peak_reset(device) -> int:
    """Reset the peak and return the memory in use now (bytes)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    return _status_bytes("VmRSS")


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_method(method: str, folder: Path, device_name: str, dtype_name: str) -> dict:
    """One method over all the texts, in this process: seconds, peak memory rise, bits per text."""
    import torch
    import transformers

    from memk.memorize.audit.audit import AuditSettings, audit
    from memk.memorize.audit.models import load_scoring_model, resolve_dtype
    from memk.memorize.audit.scoring import score_texts
    from memk.memorize.runtime import resolve_device

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    texts = json.loads((folder / "texts.json").read_text())
    scoring = load_scoring_model(str(folder / "model"), device, dtype)
    model, tokenizer = scoring.module, transformers.AutoTokenizer.from_pretrained(folder / "model")
    bos = tokenizer.bos_token_id
    width = scoring.context

    def memk_bits(batch):
        return [s.bits for s in score_texts(scoring, scoring.encode(batch), width, width // 2, 8192, moments=False)]

    def memk_audit(batch):
        result = audit(scoring, batch[: len(batch) // 2], batch[len(batch) // 2:],
                       settings=AuditSettings(bootstrap=0, extract_prefixes=()), progress=False)
        return [r["model_bits"] for r in result.samples]

    @torch.no_grad()
    def hf_loss_loop(batch):
        bits = []
        for text in batch:
            ids = torch.tensor([[bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]], device=device)
            loss = model(input_ids=ids, labels=ids).loss  # mean over the ids[1:] it predicts
            bits.append(float(loss) * (ids.shape[1] - 1) / math.log(2))
        return bits

    @torch.no_grad()
    def hf_padded_batch(batch):
        bits = []
        for start in range(0, len(batch), PADDED_BATCH):
            encoded = [[bos, *ids] for ids in tokenizer(batch[start:start + PADDED_BATCH], add_special_tokens=False)["input_ids"]]
            longest = max(map(len, encoded))
            ids = torch.tensor([e + [bos] * (longest - len(e)) for e in encoded], device=device)
            mask = torch.tensor([[1] * len(e) + [0] * (longest - len(e)) for e in encoded], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            bits.extend((-(logp.double() * mask[:, 1:]).sum(1) / math.log(2)).tolist())
        return bits

    run = {"memk_bits": memk_bits, "memk_audit": memk_audit, "hf_loss_loop": hf_loss_loop,
           "hf_padded_batch": hf_padded_batch}[method]
    run(texts[:4])  # warm-up: kernels built and loaded, allocator primed
    before = _peak_reset(device)
    started = time.perf_counter()
    bits = run(texts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"method": method, "seconds": seconds, "samples_per_s": len(texts) / seconds,
            "peak_memory_rise_bytes": _peak(device) - before, "bits": bits}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="model weights: float32, bfloat16 or float16")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script, measures nothing")
    parser.add_argument("--out", help="JSON file [default: bench/results/audit-vs-transformers-DEVICE.json; "
                                      "none with --smoke]")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # a child process's one method
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(run_method(args.method, Path(args.folder), args.device, args.dtype)))
        return

    import torch

    from .timing import environment

    size = SIZES["smoke" if args.smoke else "full"]
    out = Path(args.out) if args.out else None
    if out is None and not args.smoke:
        out = Path(__file__).parent / "results" / f"audit-vs-transformers-{args.device}.json"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), size)
        tokens = None
        for method in METHODS:
            child = subprocess.run(
                [sys.executable, "-m", "memk.bench.audit_vs_transformers", "--method", method, "--folder", tmp,
                 "--device", args.device, "--dtype", args.dtype],
                capture_output=True, text=True, cwd=tempfile.gettempdir(), env={**os.environ, "TQDM_DISABLE": "1"})
            if child.returncode != 0:
                sys.exit(f"{method} failed:\n{child.stderr[-3000:]}")
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{method:<16} {results[-1]['samples_per_s']:9.2f} samples/s  "
                  f"peak +{results[-1]['peak_memory_rise_bytes'] / 2**20:8.1f} MiB", flush=True)
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(Path(tmp) / "model")
        texts = json.loads((Path(tmp) / "texts.json").read_text())
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    reference_bits = results[0]["bits"]
    for r in results:
        r["max_bits_difference_from_memk_bits"] = max(abs(a - b) for a, b in zip(r.pop("bits"), reference_bits))
    record = {
        "schema": "memk-audit-vs-transformers/1",
        "smoke": args.smoke,
        "environment": environment(torch.device(args.device)),
        "transformers": transformers.__version__,
        "model": {**size, "weights": args.dtype, "texts_tokens": tokens},
        "padded_batch": PADDED_BATCH,
        "results": results,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
