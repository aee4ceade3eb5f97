"""The `memk` command line: parses options, calls memk.memorize and memk.bench, prints. No logic of its own.

It sits above the packages it drives, so none of them imports it (or each other back).
torch and the experiments are imported only when a command runs: `memk --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memk.memorize.constants import PAPER_ALPHA, PRECISIONS, SOURCES

PRECISION_HELP = ("training precision: float32; bfloat16 (weights and Adam state in bfloat16, the paper's); "
                  "bfloat16-autocast (float32 weights, bfloat16 arithmetic)")
from memk.memorize.errors import ConfigError

# What each preset is, for --help (tests/test_cli.py checks the names against the experiments').
# The run times here are the one source of those that README and docs/ quote (tests/test_docs.py
# checks them): the default's from bench/results/default-preset-wall-2core.json (127-135 s, idle
# 2-core EPYC), run-generalization's default from generalization-default-wall-2core.json (407 s).
CAPACITY_PRESETS = {
    "default": "four 1-layer models, V 64, S 32, float32: a little over two minutes on an idle 2-core CPU",
    "paper": "the paper's grid (1-8 layers, d 32-512, V 2048, S 64, batch 2048, bfloat16): GPU days",
    "paper-1x32": "the paper's 1x32 model at V 2048, S 64 on 400 and 980 sequences, 30,000 steps: "
                  "about 40 minutes on an idle 2-core CPU",
    "smoke": "two tiny models, seconds: for tests",
}
GENERALIZATION_PRESETS = {
    "default": "the built-in text, BPE 2048, S 64, 1-layer models: about 7 minutes on a 2-core CPU",
    "markov": "the default's design on a Markov chain with exact entropy: about 4 minutes",
    "gpu": "1-4 layers, d 64-256, bfloat16, batch 512: for a GPU and a corpus of 10^5+ sequences",
    "smoke": "tiny models, seconds: for tests",
}
# The subcommands that live in other packages, imported only when asked for.
LAZY_COMMANDS = {"bench": ("memk.bench.cli", "bench", "Benchmark memk's kernels and GPT-2 training against the baselines."),
                 "audit": ("memk.cli.audit", "audit", "How much a causal LM memorized of your data, per sample, in bits.")}


SHORT_HELP_LIMIT = 10_000  # characters of a command's first sentence shown in `memk --help`: all of it


def preset_help(presets: dict[str, str]) -> str:
    return "; ".join(f"{name}: {what}" for name, what in presets.items())


class MemkGroup(click.Group):
    """A click group whose LAZY_COMMANDS load on first use, so listing commands imports nothing heavy."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            import importlib

            module, attr, _ = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            # The whole first sentence (click's default cuts it at 45 characters with "..."); write_dl wraps it.
            short = (LAZY_COMMANDS[name][2] if name in LAZY_COMMANDS
                     else super().get_command(ctx, name).get_short_help_str(limit=SHORT_HELP_LIMIT))
            rows.append((name, short))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def memk_version() -> str:
    """memk's version as installed (package metadata), or a line saying it cannot be told."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memk")
    except PackageNotFoundError:
        return "unknown (memk is not installed as a package: pip install -e . in its repository)"


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f"memk {memk_version()}")
        ctx.exit()


@click.group(cls=MemkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print memk's version and exit.")
def cli():
    """memk: how much do language models memorize, in bits."""


def training_options(command):
    """The options every experiment command shares: device, schedule, backends, progress, executor."""
    for option in reversed([
        click.option("--device", help="auto, cpu, cuda or cuda:N"),
        click.option("--max-steps", type=int, help="step cap per run, cool-down included"),
        click.option("--lr", type=float, help="peak learning rate"),
        click.option("--batch-size", type=int, help="sequences per step"),
        click.option("--attention-backend", help="memk.kernels attention backend (auto picks the best for the device)"),
        click.option("--logprob-backend", help="memk.kernels log-prob backend (auto picks the best for the device)"),
        click.option("--no-progress", is_flag=True, help="no progress bars"),
        click.option("--ensemble", default="auto", show_default=True,
                     help="train runs of one shape together: auto (as an ensemble where a short probe measures "
                          "it clearly faster here), off (one at a time), or K (as ensembles of at most K)"),
        click.option("--workers", default="auto", show_default=True,
                     help="runs (or ensembles) training at once in this process, each on one CPU thread: auto "
                          "(one per core on the CPU where runs are small enough for one thread or no run "
                          "dominates the work, else 1), or N"),
        click.option("--dry-run", is_flag=True, help="print the plan (runs, ensembles, estimated wall-clock); train nothing"),
        *ray_options(),
    ]):
        command = option(command)
    return command


def ray_options():
    """Where runs train: this process, or tasks of a Ray cluster (pip install "memk[ray]")."""
    return [
        click.option("--executor", "executor_name", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True, help="local: runs train in this process; ray: as tasks of a Ray cluster"),
        click.option("--ray-address", help="auto: join the Ray cluster this machine belongs to; HOST:PORT: "
                                           "its head node [default: start a local Ray instance]"),
        click.option("--gpus-per-task", type=float,
                     help="GPUs each Ray task takes, fractions to share one [default: 1 on CUDA, 0 on the CPU]"),
        click.option("--cpus-per-task", type=int, help="CPU cores (torch threads) each Ray task takes [default: 1]"),
    ]


def report_failures(summary: dict, out: Path) -> int:
    """The exit status of a sweep: 1, with a warning, where runs failed (they are retried by a rerun)."""
    failed = summary.get("failed_runs") or []
    if failed:
        click.echo(f"memk: warning: {len(failed)} run(s) failed after retries, errors under failed_runs in "
                   f"{out}/summary.json; run the same command again to retry them", err=True)
    return 1 if failed else 0


@cli.command("run-capacity")
@click.option("--preset", "preset_name", type=click.Choice(list(CAPACITY_PRESETS)), default="default", show_default=True,
              help=preset_help(CAPACITY_PRESETS))
@click.option("--models", help="models to train, e.g. '1x32,2x64x4' (LAYERSxD_MODEL[xHEADS])")
@click.option("--vocab-size", type=int, help="vocabulary size V of the random data")
@click.option("--seq-len", type=int, help="sequence length S (tokens 1..S-1 are coded)")
@click.option("--sizes", help="dataset sizes in sequences for every model, e.g. '50,100,200'")
@click.option("--size-factors",
              help=f"dataset sizes as multiples of the capacity expected at {PAPER_ALPHA} bits/param")
@click.option("--precision", type=click.Choice([*PRECISIONS, "both"]), help=PRECISION_HELP + "; both: float32 and bfloat16")
@click.option("--cooldown-steps", type=int, help="steps of linear learning-rate decay that end each run")
@click.option("--seed", type=int, help="seed of the data stream and the model init")
@click.option("--out", help="output folder [default: runs/capacity-PRESET]")
@training_options
def run_capacity(preset_name, out, no_progress, ensemble, workers, dry_run, executor_name, ray_address, gpus_per_task,
                 cpus_per_task, **options):
    """Train GPT-2 models on random data and measure capacity in bits per parameter.

    Re-running with the same options and --out resumes: finished runs are kept and the
    run in progress continues from its last checkpoint.
    """
    from memk.memorize.experiments import capacity
    from memk.memorize.experiments import dry_run as dry_run_plan
    from memk.memorize.runs.ensemble_executor import parse_ensemble
    from memk.memorize.experiments.options import output_folder
    from memk.memorize.runs.launchers import executor_from_options
    from memk.memorize.runs.workers import parse_workers

    choice, workers = parse_ensemble(ensemble), parse_workers(workers)
    exp = capacity.experiment_from_options(preset_name, **options)
    out = output_folder(out, Path("runs") / f"capacity-{preset_name}")
    if dry_run:  # what remains to train into --out, read without locking or creating it
        click.echo(dry_run_plan.capacity_plan(exp, choice, workers, out))
        return
    executor = executor_from_options(executor_name, capacity.validate(exp), choice, ray_address, gpus_per_task,
                                     cpus_per_task, workers)
    summary = capacity.run_capacity(exp, out, progress=not no_progress, executor=executor)
    click.echo(capacity.format_table(summary))
    click.echo(f"results in {out}/: runs.jsonl, summary.json, capacity_curves.png, capacity_vs_params.png")
    return report_failures(summary, out)


@cli.command("run-generalization")
@click.option("--preset", "preset_name", type=click.Choice(list(GENERALIZATION_PRESETS)), default="default",
              show_default=True, help=preset_help(GENERALIZATION_PRESETS))
@click.option("--source", type=click.Choice(SOURCES), help="text (a corpus) or markov (a synthetic chain with exact entropy)")
@click.option("--text", help="a UTF-8 text file to use as the corpus [default: the built-in corpus]")
@click.option("--hf-dataset", help="a Hugging Face dataset name, or a folder saved with save_to_disk")
@click.option("--hf-split", help="the dataset's split [default: train]")
@click.option("--hf-column", help="the dataset's text column [default: text]")
@click.option("--vocab-size", type=int, help="BPE vocabulary (text) or number of states (markov)")
@click.option("--seq-len", type=int, help="sequence length S in tokens (tokens 1..S-1 are coded)")
@click.option("--markov-branching", type=int, help="non-zero successors per Markov state")
@click.option("--markov-sequences", type=int, help="sequences drawn from the Markov chain (training pool + held-out)")
@click.option("--models", help="models of the sweep, e.g. '1x16x2,1x32' (LAYERSxD_MODEL[xHEADS])")
@click.option("--check-models", help="models outside the fit whose F1 the law predicts ('' for none)")
@click.option("--reference-model", help="the reference θ's shape [default: the largest model of the run]")
@click.option("--sizes", help="dataset sizes in sequences for every model, e.g. '50,100,200'")
@click.option("--size-factors", help="dataset sizes as multiples of each model's capacity, in bits")
@click.option("--check-size-factors", help="the check runs' dataset sizes, as multiples of capacity")
@click.option("--heldout", type=int, help="sequences held out, never trained on")
@click.option("--alpha", type=float, help="bits per parameter for capacity = α · parameters")
@click.option("--capacity-summary", help="take α from a run-capacity summary.json instead")
@click.option("--precision", type=click.Choice(PRECISIONS), help=PRECISION_HELP)
@click.option("--seed", type=int, help="seed of the data split, the Markov chain and the model init")
@click.option("--out", help="output folder [default: runs/generalization-PRESET]")
@training_options
def run_generalization(preset_name, out, no_progress, ensemble, workers, dry_run, executor_name, ray_address,
                       gpus_per_task, cpus_per_task, **options):
    """Train GPT-2 models on real text (or a Markov chain): unintended memorization,
    double descent and membership inference against dataset size / capacity.

    Re-running with the same options and --out resumes: the corpus, the reference model
    and finished runs are kept, and the run in progress continues from its checkpoint.
    """
    from memk.memorize.experiments import dry_run as dry_run_plan
    from memk.memorize.experiments import generalization
    from memk.memorize.runs.ensemble_executor import parse_ensemble
    from memk.memorize.experiments.generalization_summary import format_summary
    from memk.memorize.experiments.options import output_folder
    from memk.memorize.runs.launchers import executor_from_options
    from memk.memorize.runs.workers import parse_workers

    choice, workers = parse_ensemble(ensemble), parse_workers(workers)
    exp = generalization.experiment_from_options(preset_name, **options)
    out = output_folder(out, Path("runs") / f"generalization-{preset_name}")
    if dry_run:
        click.echo(dry_run_plan.generalization_plan(exp, choice, out, workers))
        return
    executor = executor_from_options(executor_name, generalization.validate(exp), choice, ray_address,
                                     gpus_per_task, cpus_per_task, workers)
    summary = generalization.run_generalization(exp, out, progress=not no_progress, executor=executor)
    click.echo(format_summary(summary))
    click.echo(f"results in {out}/: runs.jsonl, summary.json, prediction.json, reference/, *.png")
    return report_failures(summary, out)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors the user can fix are one line on stderr and exit status 2."""
    try:
        code = cli.main(args=argv, prog_name="memk", standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"memk: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except ConfigError as e:
        click.echo(f"memk: error: {e}", err=True)
        sys.exit(2)
    except FloatingPointError as e:  # training diverged: the message says to lower the learning rate
        click.echo(f"memk: error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("memk: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as e:
        if _is_backend_unavailable(e):  # a backend named on purpose cannot run here
            click.echo(f"memk: error: {e}", err=True)
            sys.exit(2)
        raise
    sys.exit(code or 0)


def _is_backend_unavailable(error: Exception) -> bool:
    if "memk.kernels" not in sys.modules:  # nothing of the kernels ran: it cannot be theirs
        return False
    from memk.kernels import BackendUnavailable

    return isinstance(error, BackendUnavailable)


if __name__ == "__main__":
    main()
