"""`memk audit`: how much a causal language model memorized of your data, per sample, in bits.

A click command that memk's CLI group loads on first use (cli/main.py's LAZY_COMMANDS), so
`memk --help` imports none of it; torch and transformers are imported once the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

SHORT_HELP = "How much a causal LM memorized of your data, per sample, in bits; membership attacks."


@click.command("audit", short_help=SHORT_HELP)
@click.option("--model", required=True,
              help="the model M: a Hugging Face name or save_pretrained folder, a memk checkpoint folder, or a PEFT "
                   "adapter folder (adapter_config.json beside the adapter: loaded onto its base and merged)")
@click.option("--reference", multiple=True,
              help="the reference R (e.g. the model before fine-tuning); repeat it for several: per sample the one "
                   "that codes it shortest is R, and each is also reported alone. Without it, no mem_U and no "
                   "reference attack, except for an adapter, whose base is then R")
@click.option("--base-model", "base_model",
              help="an adapter's base model (folder or Hugging Face name) where it is not the one its "
                   "adapter_config.json names")
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
@click.option("--recall-shots", type=int, default=0, show_default=True,
              help="ReCaLL: put this many non-members (the first ones) before every text as its prefix; each text "
                   "is coded again with it, about (N + 1) times the model's pass; 0: no ReCaLL")
@click.option("--frequency-text",
              help="DC-PDD's token frequencies: a text file, JSON lines or a dataset [default: the non-members, each "
                   "calibrated by the others]")
@click.option("--dc-pdd-cap", type=float, default=0.01, show_default=True, help="DC-PDD's cap a on each token's term")
@click.option("--capacity-summary",
              help="α (bits per parameter) for the model's capacity from a run-capacity summary.json "
                   "[default: memk's measured 2.33, its CPU default run's]")
@click.option("--f1-law", help="the F1 law of a run-generalization summary.json [default: memk's committed fit, "
                               "docs/generalization-default]")
@click.option("--fail-if", "fail_if", multiple=True,
              help="exit with status 1 (after writing the results) when a limit is passed: METRIC OP NUMBER, e.g. "
                   "'auc>0.6' (the highest AUC of the attacks; auc[loss] for one), 'mem_u_bits>100' (members' total), "
                   "mem_u_bits_max, mem_u_bits_mean, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr, f1, predicted_f1, extracted, "
                   "extracted_rate; repeat it or separate limits with commas")
@click.option("--extract-prefix", "extract_prefix", default="8,16,32", show_default=True,
              help="extraction: the prefix lengths k (tokens of the model's tokenizer) after which the model decodes "
                   "greedily; a text counts as extracted at k when it reproduces the next tokens exactly")
@click.option("--extract-length", "extract_length", type=int, default=32, show_default=True,
              help="extraction: tokens decoded after the prefix, at most (fewer where the text ends sooner)")
@click.option("--no-extract", "no_extract", is_flag=True, help="no extraction test")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def audit(model, reference, members, non_members, column, split, out, device, dtype, window, stride, batch_tokens,
          min_k, no_min_k_pp, bootstrap, top, seed, recall_shots, frequency_text, dc_pdd_cap, capacity_summary, f1_law,
          fail_if, no_progress, base_model, extract_prefix, extract_length, no_extract):
    """Code every member and non-member text with the model M and the reference R, each with its own
    tokenizer from the first token on (after the start token: BOS, else EOS), and report per sample
    H(x|M), H(x|R) and mem_U(x) = max(0, H(x|R) - H(x|M)) in bits, the membership attacks (loss,
    reference-calibrated loss, zlib ratio, Min-K%, Min-K%++, DC-PDD, and ReCaLL with --recall-shots) with
    ROC AUC and TPR at 1% and 0.1% FPR; the model's capacity beside the member set's bits, and the
    membership F1 memk's fitted law predicts from their ratio beside the F1 the loss attack measures.

    Extraction: given each text's first k tokens (--extract-prefix), the model decodes greedily; the
    share of members and of non-members whose next tokens it reproduces exactly, and the longest run it
    reproduces per text. Several --reference: mem_U against the best of them per sample, and each's.

    Writes audit.json, samples.jsonl (one row per sample, as computed: an interrupted audit
    resumes), samples.csv, roc.png, memorization.png and report.html to --out.
    """
    from memk.memorize.audit import gate as audit_gate
    from memk.memorize.audit.audit import AuditSettings, audit as run_audit
    from memk.memorize.audit.extraction import parse_prefixes
    from memk.memorize.audit.summary import format_table
    from memk.memorize.audit.texts import read_texts
    from memk.memorize.experiments.options import output_folder

    limits = audit_gate.parse_limits(fail_if)  # a malformed limit is refused before any work
    settings = AuditSettings(window=window, stride=stride, batch_tokens=batch_tokens, min_k=min_k,
                             min_k_pp=not no_min_k_pp, bootstrap=bootstrap, seed=seed, top=top,
                             recall_shots=recall_shots, dc_pdd_cap=dc_pdd_cap, capacity_summary=capacity_summary,
                             f1_law=f1_law, extract_prefixes=() if no_extract else parse_prefixes(extract_prefix),
                             extract_length=extract_length, fail_if=tuple(fail_if))
    settings.check()
    # An adapter without --reference is audited against its base.
    adapter = (Path(model).expanduser() / "adapter_config.json").is_file()
    references = len(reference) or int(adapter)
    audit_gate.check_available(limits, reference=references > 0, extraction=bool(settings.extract_prefixes),
                               attacks=audit_gate.attacks_in_table(references, not no_min_k_pp, bool(recall_shots)))
    folder = output_folder(out, Path("runs") / "audit")
    member_texts = read_texts(members, column, split, what="members")
    nonmember_texts = read_texts(non_members, column, split, what="non-members")
    frequency_texts = None
    if frequency_text is not None:
        jsonl_or_dataset = Path(frequency_text).suffix in (".jsonl", ".json") or not Path(frequency_text).is_file()
        frequency_texts = read_texts(frequency_text, column if jsonl_or_dataset else None, split, what="frequency-text")
    result = run_audit(model, member_texts, nonmember_texts, reference=list(reference) or None, out=folder,
                       device=device, base_model=base_model,
                       dtype=dtype, settings=settings, progress=not no_progress, frequency_texts=frequency_texts,
                       sources={"members": members, "non_members": non_members, "frequency_text": frequency_text})
    click.echo(format_table(result.summary))
    click.echo(f"results in {folder}/: audit.json, samples.jsonl, samples.csv, roc.png, memorization.png, report.html")
    failed = audit_gate.failures(result.summary["fail_if"])  # the outcome audit.json records
    if failed:
        click.echo(audit_gate.failure_line(failed), err=True)
        return 1
