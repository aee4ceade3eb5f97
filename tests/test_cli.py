"""The command line end to end, in a subprocess, as a user runs it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

MEMK = [sys.executable, "-m", "memk.cli"]
# Run outside the repository: `python -m` puts the working directory on sys.path.
OUTSIDE = tempfile.gettempdir()


def memk(*args):
    return subprocess.run([*MEMK, *args], capture_output=True, text=True, timeout=600, cwd=OUTSIDE)


def rows(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_console_script_is_installed():
    script = shutil.which("memk", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, cwd=OUTSIDE)
    assert result.returncode == 0 and "run-capacity" in result.stdout


@pytest.mark.slow
def test_smoke_preset_end_to_end_then_resume_after_kill(tmp_path):
    out = tmp_path / "runs"
    # One worker: its jobs run in turn, so there is time to kill between a finished run and the
    # next (two side by side can finish within one poll). The resume below takes the default.
    args = [*MEMK, "run-capacity", "--preset", "smoke", "--out", str(out), "--no-progress", "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=OUTSIDE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once a run has finished and the next is under way
        if len(rows(out)) >= 1 and any((out / "checkpoints").glob("*.pt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the smoke preset finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = rows(out)
    assert len(before) >= 1

    result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    after = rows(out)
    assert after[: len(before)] == before  # finished work kept as it was, not redone
    assert len(after) == 4 and len({r["run_id"] for r in after}) == 4
    assert not list((out / "checkpoints").glob("*.pt"))
    assert "α through origin" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    fit = summary["precisions"]["float32"]["fit"]
    assert fit["n_models"] == 2 and fit["through_origin"]["ci"] is not None
    for png in ("capacity_curves.png", "capacity_vs_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert again.returncode == 0 and rows(out) == after  # everything done: nothing rerun


def _one_line_error(result, needle):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--models", "1x30x4"], "divisible by n_head"),
        (["--sizes", "0,3"], "dataset sizes must be >= 1"),
        (["--preset", "gigantic"], "'gigantic' is not one of 'default', 'paper', 'paper-1x32', 'smoke'"),
        (["--max-steps", "lots"], "max-steps"),
        (["--max-steps", "-1"], "--max-steps must be >= 1"),
        (["--out", ""], "--out is empty"),
        (["--size-factors", "inf"], "positive finite"),
        (["--vocab-size", "1"], "vocab size must be >= 2"),
        (["--seed", "-1"], "--seed must lie in"),
        (["--seed", str(2**64)], "--seed must lie in"),
        (["--lr", "inf"], "--lr must be a positive finite number"),
        (["--lr", "1e30", "--no-progress"], "training diverged"),
        (["--sizes", "10", "--size-factors", "1"], "not both"),
        (["--models", "1x8x1,1x8x1"], "named twice"),
        (["--sizes", "1000000000"], "GiB free; train on fewer sequences"),  # refused before any memory is taken
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    _one_line_error(memk("run-capacity", "--preset", "smoke", "--out", str(tmp_path / "out"), *args), needle)
    if needle != "training diverged":  # that one trains (and checkpoints) first; the others are refused starts
        assert not (tmp_path / "out").exists()  # a refused start leaves no folder behind


def test_help_imports_no_torch_and_names_every_preset():
    code = ("import sys; from memk.cli import main; "
            "assert 'torch' not in sys.modules, 'memk --help would import torch'")
    assert subprocess.run([sys.executable, "-c", code], cwd=OUTSIDE).returncode == 0
    from memk.cli import main
    from memk.memorize.experiments import capacity, generalization

    assert list(main.CAPACITY_PRESETS) == list(capacity.PRESETS)
    assert list(main.GENERALIZATION_PRESETS) == list(generalization.PRESETS)
    result = memk("run-generalization", "--help")
    assert result.returncode == 0 and "markov: " in result.stdout


def test_one_experiment_never_writes_into_the_others_folder(tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps({"experiment": "capacity"}))
    _one_line_error(memk("run-generalization", "--preset", "smoke", "--out", str(tmp_path)), "holds a run-capacity")


def test_unwritable_output_folder_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _one_line_error(memk("run-capacity", "--preset", "smoke", "--out", str(blocker / "runs")), "cannot write to output folder")


def test_a_folder_another_run_is_writing_is_one_line_and_exit_2(tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running memk holds it
        _one_line_error(memk("run-capacity", "--preset", "smoke", "--out", str(tmp_path)), "another memk run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    _one_line_error(memk("run-capacity", "--preset", "smoke", "--device", "cuda", "--out", str(tmp_path)), "no CUDA device")


def test_version_is_the_installed_package_s():
    from importlib.metadata import version

    result = memk("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"memk {version('memk')}\n"


def test_help_lists_each_command_s_whole_first_sentence():
    result = subprocess.run([*MEMK, "--help"], capture_output=True, text=True, timeout=120, cwd=OUTSIDE,
                            env={**os.environ, "COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:")[1]
    assert "..." not in commands and "…" not in commands
    assert max(map(len, result.stdout.splitlines())) <= 80
    listing = " ".join(commands.split())  # the wrapped descriptions, joined again
    for command, sentence in [
        ("run-capacity", "Train GPT-2 models on random data and measure capacity in bits per parameter."),
        ("run-generalization", "Train GPT-2 models on real text (or a Markov chain): unintended memorization, double "
                               "descent and membership inference against dataset size / capacity."),
        ("audit", "How much a causal LM memorized of your data, per sample, in bits."),
    ]:
        assert f"{command} {sentence}" in listing, listing
    assert "--version" in result.stdout


@pytest.mark.slow
def test_progress_into_a_log_is_lines_not_redraws_and_a_finished_run_leaves_no_lock(tmp_path):
    out = tmp_path / "runs"
    result = memk("run-capacity", "--preset", "smoke", "--out", str(out))  # stderr is a pipe here, as `2> log` is
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr
    assert "sweep: 4/4 runs" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) <= 4 + 4  # a line per finished run, a few more at most
    assert len(rows(out)) == 4 and not (out / ".lock").exists()


@pytest.mark.parametrize("args, needle", [
    (["--text", "no-such-corpus.txt"], "no such file; give --text an existing UTF-8 text file"),
    (["--vocab-size", "60000"], "the corpus is too small for a 60000-token vocabulary"),  # found once it is tokenized
])
def test_a_refused_start_leaves_no_output_folder(tmp_path, args, needle):
    out = tmp_path / "made" / "gen-missing"
    _one_line_error(memk("run-generalization", "--preset", "smoke", "--out", str(out), *args), needle)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the one made above it


def test_each_command_s_options_are_its_knobs_in_their_order_with_their_help():
    from memk.cli.main import cli
    from memk.memorize.experiments.knobs import CapacityKnobs, ExecutionKnobs, GeneralizationKnobs, declared

    for command, groups in (("run-capacity", (CapacityKnobs, ExecutionKnobs)),
                            ("run-generalization", (GeneralizationKnobs, ExecutionKnobs))):
        params = cli.get_command(None, command).params
        knobs = [d for group in groups for d in declared(group)]
        assert [p.name for p in params] == ["preset_name", *[d.name for d in knobs]]
        for param, knob in zip(params[1:], knobs):
            assert (param.opts, param.help, param.default) == ([knob.flag.name], knob.flag.help, knob.default)
