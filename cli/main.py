"""The `memk` command line: parses options, calls memk.memorize and memk.bench, prints. No logic of its own.

It sits above the packages it drives, so none of them imports it (or each other back). The
experiments' options are generated from their torch-free knob dataclasses (memorize/experiments/
knobs.py); torch and the experiments are imported only when a command runs: `memk --help` is instant.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from memk.memorize.errors import ConfigError
from memk.memorize.experiments.knobs import (
    CapacityKnobs, ExecutionKnobs, GeneralizationKnobs, declared, from_values,
)

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


def knob_options(*groups):
    """The click options of these knob dataclasses (memorize/experiments/knobs.py), in their order."""

    def option(d):
        kind = {} if d.kind is None else {"is_flag": True} if d.kind is bool else {"type": d.kind}
        if d.flag.choices is not None:
            kind = {"type": click.Choice(list(d.flag.choices))}
        return click.option(d.flag.name, d.name, default=d.default, show_default=d.flag.show_default,
                            help=d.flag.help, **kind)

    def apply(command):
        for d in reversed([d for group in groups for d in declared(group)]):
            command = option(d)(command)
        return command

    return apply


def execution_from(values: dict) -> ExecutionKnobs:
    """How the runs execute, --ensemble and --workers read here once (runs' read_ensemble, parse_workers)."""
    from memk.memorize.runs.packing import read_ensemble
    from memk.memorize.runs.workers import parse_workers

    given = from_values(ExecutionKnobs, values)
    return replace(given, ensemble=read_ensemble(given.ensemble), workers=parse_workers(given.workers))


def report_failures(summary: dict, out) -> int:
    """The exit status of a sweep: 1, with a warning, where runs failed (they are retried by a rerun)."""
    failed = summary.get("failed_runs") or []
    if failed:
        click.echo(f"memk: warning: {len(failed)} run(s) failed after retries, errors under failed_runs in "
                   f"{out}/summary.json; run the same command again to retry them", err=True)
    return 1 if failed else 0


@cli.command("run-capacity")
@click.option("--preset", "preset_name", type=click.Choice(list(CAPACITY_PRESETS)), default="default", show_default=True,
              help=preset_help(CAPACITY_PRESETS))
@knob_options(CapacityKnobs, ExecutionKnobs)
def run_capacity(preset_name, **values):
    """Train GPT-2 models on random data and measure capacity in bits per parameter.

    Re-running with the same options and --out resumes: finished runs are kept and the
    run in progress continues from its last checkpoint.
    """
    execution, knobs = execution_from(values), from_values(CapacityKnobs, values)
    if execution.dry_run:  # what remains to train into --out, read without locking or creating it
        from memk.memorize.experiments import dry_run

        click.echo(dry_run.capacity_command(preset_name, knobs, execution))
        return
    from memk.memorize.experiments import capacity

    result = capacity.run_command(preset_name, knobs, execution)
    click.echo(result.text)
    return report_failures(result.summary, result.out)


@cli.command("run-generalization")
@click.option("--preset", "preset_name", type=click.Choice(list(GENERALIZATION_PRESETS)), default="default",
              show_default=True, help=preset_help(GENERALIZATION_PRESETS))
@knob_options(GeneralizationKnobs, ExecutionKnobs)
def run_generalization(preset_name, **values):
    """Train GPT-2 models on real text (or a Markov chain): unintended memorization,
    double descent and membership inference against dataset size / capacity.

    Re-running with the same options and --out resumes: the corpus, the reference model
    and finished runs are kept, and the run in progress continues from its checkpoint.
    """
    execution, knobs = execution_from(values), from_values(GeneralizationKnobs, values)
    if execution.dry_run:
        from memk.memorize.experiments import dry_run

        click.echo(dry_run.generalization_command(preset_name, knobs, execution))
        return
    from memk.memorize.experiments import generalization

    result = generalization.run_command(preset_name, knobs, execution)
    click.echo(result.text)
    return report_failures(result.summary, result.out)


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
