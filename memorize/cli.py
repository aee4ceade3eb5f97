"""The `memk` command line: parses options, calls memk.memorize, prints. No logic of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from memk.bench.cli import bench
from memk.kernels import BackendUnavailable

from . import capacity


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """memk: how much do language models memorize, in bits."""


@cli.command("run-capacity")
@click.option("--preset", "preset_name", default="default", show_default=True, help=f"one of: {', '.join(capacity.PRESETS)}")
@click.option("--models", help="models to train, e.g. '1x32,2x64x4' (LAYERSxD_MODEL[xHEADS])")
@click.option("--vocab-size", type=int, help="vocabulary size V of the random data")
@click.option("--seq-len", type=int, help="sequence length S (tokens 1..S-1 are coded)")
@click.option("--sizes", help="dataset sizes in sequences for every model, e.g. '50,100,200'")
@click.option("--size-factors", help="dataset sizes as multiples of the capacity expected at 3.6 bits/param")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "both"]), help="training precision")
@click.option("--device", help="auto, cpu, cuda or cuda:N")
@click.option("--max-steps", type=int, help="step cap per run, cool-down included")
@click.option("--cooldown-steps", type=int, help="steps of linear learning-rate decay that end each run")
@click.option("--lr", type=float, help="peak learning rate")
@click.option("--batch-size", type=int, help="sequences per step")
@click.option("--seed", type=int, help="seed of the data stream and the model init")
@click.option("--attention-backend", help="memk.kernels attention backend (auto picks the best for the device)")
@click.option("--logprob-backend", help="memk.kernels log-prob backend (auto picks the best for the device)")
@click.option("--out", type=click.Path(path_type=Path), help="output folder [default: runs/capacity-PRESET]")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def run_capacity(preset_name, out, no_progress, **options):
    """Train GPT-2 models on random data and measure capacity in bits per parameter.

    Re-running with the same options and --out resumes: finished runs are kept and the
    run in progress continues from its last checkpoint.
    """
    exp = capacity.experiment_from_options(preset_name, **options)
    out = out or Path("runs") / f"capacity-{preset_name}"
    summary = capacity.run_capacity(exp, out, progress=not no_progress)
    click.echo(capacity.format_table(summary))
    click.echo(f"results in {out}/: runs.jsonl, summary.json, capacity_curves.png, capacity_vs_params.png")


cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors the user can fix are one line on stderr and exit status 2."""
    try:
        code = cli.main(args=argv, prog_name="memk", standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"memk: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (capacity.ConfigError, BackendUnavailable) as e:
        click.echo(f"memk: error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("memk: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
