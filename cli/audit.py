"""`memk audit`: how much a causal language model memorized of your data, per sample, in bits.

A click command that memk's CLI group loads on first use (cli/main.py's LAZY_COMMANDS), so
`memk --help` imports none of it; torch and transformers are imported once the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

SHORT_HELP = "How much a causal LM memorized of your data, per sample, in bits; membership attacks."


@click.command("audit", short_help=SHORT_HELP)
@click.option("--model", required=True, help="the model M: a Hugging Face name or save_pretrained folder, or a memk checkpoint folder")
@click.option("--reference", help="the reference R (e.g. the model before fine-tuning); without it, no mem_U and no reference attack")
@click.option("--members", required=True, help="texts M was trained on: a text file (one sample a line), JSON lines, or a dataset")
@click.option("--non-members", "non_members", required=True, help="texts M never saw, in the same forms")
@click.option("--column", help="the text field of JSON lines or the column of a dataset [default: text]")
@click.option("--split", default="train", show_default=True, help="the split of a Hugging Face dataset")
@click.option("--out", help="output folder [default: runs/audit]; re-running into it resumes")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="model weights (auto: bfloat16 on a GPU, float32 on the CPU); log-probs are float32 always")
@click.option("--window", type=int, help="tokens a window holds [default: the model's context]")
@click.option("--stride", type=int, help="tokens the window moves by on long texts [default: half the window]")
@click.option("--batch-tokens", type=int, default=8192, show_default=True, help="padded tokens per forward pass")
@click.option("--min-k", type=float, default=0.2, show_default=True, help="Min-K%/Min-K%++ fraction of tokens")
@click.option("--no-min-k-pp", is_flag=True,
              help="leave the Min-K%++ attack out: it needs the next-token distribution's moments at every token, "
                   "about half the scoring time at V 50257")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="bootstrap resamples of the intervals (0: none)")
@click.option("--top", type=int, default=20, show_default=True, help="most-memorized samples in the report")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the bootstrap")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def audit(model, reference, members, non_members, column, split, out, device, dtype, window, stride, batch_tokens,
          min_k, no_min_k_pp, bootstrap, top, seed, no_progress):
    """Code every member and non-member text with the model M and the reference R, each with its own
    tokenizer from the first token on (after the start token: BOS, else EOS), and report per sample
    H(x|M), H(x|R) and mem_U(x) = max(0, H(x|R) - H(x|M)) in bits, the membership attacks (loss,
    reference-calibrated loss, zlib ratio, Min-K%, Min-K%++) with ROC AUC and TPR at 1% and 0.1% FPR.

    Writes audit.json, samples.jsonl (one row per sample, as computed: an interrupted audit
    resumes), roc.png, memorization.png and report.html to --out.
    """
    from memk.memorize.audit import AuditSettings, audit as run_audit, format_table, read_texts
    from memk.memorize.options import output_folder

    settings = AuditSettings(window=window, stride=stride, batch_tokens=batch_tokens, min_k=min_k,
                             min_k_pp=not no_min_k_pp, bootstrap=bootstrap, seed=seed, top=top)
    settings.check()
    folder = output_folder(out, Path("runs") / "audit")
    member_texts = read_texts(members, column, split, what="members")
    nonmember_texts = read_texts(non_members, column, split, what="non-members")
    result = run_audit(model, member_texts, nonmember_texts, reference=reference, out=folder, device=device,
                       dtype=dtype, settings=settings, progress=not no_progress)
    click.echo(format_table(result.summary))
    click.echo(f"results in {folder}/: audit.json, samples.jsonl, roc.png, memorization.png, report.html")
