"""README and docs/: the commands they give, the links they hold, and one source per figure.

README is the front door and docs/ the rest; a figure stated in both places, or in a page and in
`--help`, comes from one place and is checked here: the presets' run times from the preset
descriptions that `memk run-capacity --help` and `memk run-generalization --help` print
(cli/main.py), the capacity table from the committed default run (docs/default-run/).
The site itself is built by `mkdocs build --strict` in CI (.ci/run); where MkDocs is installed
(the `docs` extra) the last tests build it here too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memk.bench.cli import QUICK_DURATION
from memk.cli.main import CAPACITY_PRESETS, GENERALIZATION_PRESETS

ROOT = Path(__file__).resolve().parent.parent  # the checkout's files, not the installed package's
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TEST_COMMAND = 'python -m pip install torch==2.13.0 ".[test,ray]" && pytest'
MAIN_COMMAND = "python -m pip install torch==2.13.0 . && memk run-capacity"


def _text(path: Path) -> str:
    """A page with its line breaks and runs of spaces made single spaces: sentences wrap anywhere."""
    return " ".join(path.read_text().split())


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block of a page."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks



# ---- the two commands ------------------------------------------------------------------------


def test_readme_gives_the_two_commands_and_ci_runs_the_test_command_last():
    blocks = [body for language, body in _code_blocks(README.read_text()) if language == "bash"]
    assert MAIN_COMMAND in blocks and TEST_COMMAND in blocks
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == TEST_COMMAND


def test_ci_builds_the_documentation_strictly():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict --site-dir build/site" in ci
    assert re.search(r"^build/$", (ROOT / ".gitignore").read_text(), re.M)


# ---- links ---------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """The anchor MkDocs (and GitHub) give a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower())


def _anchors(page: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        heading = re.match(r"#+\s+(.+?)\s*$", line)
        if heading and not fenced:
            anchors.add(_slug(heading.group(1)))
    return anchors


def test_readmes_links_lead_to_files_and_headings_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert relative, "README links to its docs pages"
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor:
            assert anchor in _anchors(target), f"README links to {link}: {path} has no heading #{anchor}"


def test_every_docs_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)\s*$", config, re.M))
    assert nav == {p.name for p in DOCS.glob("*.md")}


# ---- one source per figure: the presets' run times -----------------------------------------------

# A run time stated approximately: "about 7 minutes on a 2-core CPU", "a little over two minutes",
# "about half a minute", "a quarter of an hour", "about 20–40 s", with the machine it is for where
# the sentence names one. Exact measurements ("407 s", "15 min 45 s") are dated and cite their
# result file; approximations are what drift apart.
_COUNT = (r"(?:a|an|one|two|three|four|five|six|seven|eight|nine|ten|twelve|fifteen|twenty|thirty|forty|fifty|"
          r"half|quarter|of|and|few|couple|\d[\d,.]*(?:[–-]\d[\d,.]*)?)")
_MACHINE = r"(?:\s+on\s+(?:an?\s+)?(?:idle\s+)?(?:2-core CPU|2 cores|two cores|2 CPU cores))?"
_APPROX = re.compile(
    r"\b(?:about|around|roughly|nearly|almost|under|over|within|just over|a little over|a little under)\s+"
    r"(?:" + _COUNT + r"\s+){0,5}(?:seconds?|minutes?|hours?|days?|(?<=\d )(?:s|min)\b|(?<=\d)(?:s|min)\b)" + _MACHINE +
    r"|\b(?:a|one) quarter of an hour\b|\bhalf an hour\b",
    re.I,
)

# Approximate times that are not a preset's, each with where its figure comes from. A new one
# goes here with its source; a preset's run time never does: it is quoted from cli/main.py.
OTHER_FIGURES = {
    f"{QUICK_DURATION} on a 2-core CPU": "`memk bench --quick` (memk.bench.cli.QUICK_DURATION; tests/test_bench.py)",
    "about 20 seconds": "building the audit's worked example on a CPU (tests/test_install.py runs it)",
    "about 20–40 s on 2 cores": "the first compile of the fused kernels (bench/cli.py)",
    "about a second": "the ensemble probe, per group (memorize/runs/ensemble_probe.py)",
    "about ten minutes": "the GPU acceptance run's stage limits, 605 s in all (bench/gpu_acceptance.sh)",
    "about two minutes on 2 cores": "the GPU acceptance script's CPU mode in CI (.ci/run)",
    "within an hour": "the capacity study: no preset saturates the paper's regime on 2 cores",
}


def _run_time(description: str) -> str | None:
    """The run time a preset's --help description ends with ("...: about 7 minutes on a 2-core CPU")."""
    tail = description.rsplit(": ", 1)[-1]
    return tail if _APPROX.match(tail) else None


PRESET_TIMES = {(command, name): _run_time(what)
                for command, presets in (("run-capacity", CAPACITY_PRESETS), ("run-generalization", GENERALIZATION_PRESETS))
                for name, what in presets.items() if _run_time(what)}


def test_the_presets_run_times_are_read_from_their_descriptions():
    assert PRESET_TIMES[("run-capacity", "default")].endswith("on an idle 2-core CPU")
    assert {("run-capacity", "paper-1x32"), ("run-generalization", "default"), ("run-generalization", "markov")} \
        <= set(PRESET_TIMES)


@pytest.mark.parametrize("page, command, presets", [
    ("README.md", "run-capacity", ["default"]),
    ("README.md", "run-generalization", ["default"]),
    ("docs/capacity.md", "run-capacity", ["default", "paper-1x32"]),
    ("docs/generalization.md", "run-generalization", ["default", "markov"]),
])
def test_pages_quote_the_presets_run_times_from_the_help(page, command, presets):
    text = _text(ROOT / page)
    for name in presets:
        assert PRESET_TIMES[(command, name)] in text, (
            f"{page} should give the {command} {name} preset's run time as --help does: "
            f"{PRESET_TIMES[(command, name)]!r} (cli/main.py)")


def _stray(text: str) -> list[str]:
    """The approximate run times in text that are neither a preset's (as --help gives it) nor a known figure."""
    known = {figure.lower() for figure in [*PRESET_TIMES.values(), *OTHER_FIGURES]}
    return [m.group(0) for m in _APPROX.finditer(text) if m.group(0).lower() not in known]


def test_no_page_states_a_run_time_apart_from_its_one_source():
    stray = [f"{page.relative_to(ROOT)}: {phrase!r}" for page in _pages() for phrase in _stray(_text(page))]
    assert not stray, ("run times stated apart from their one source (a preset's: quote cli/main.py's "
                       "CAPACITY_PRESETS / GENERALIZATION_PRESETS word for word; another: add it to OTHER_FIGURES "
                       "with where it comes from): " + "; ".join(stray))


def test_the_scan_catches_the_old_disagreements():
    # README said two minutes, --help three; run-generalization was a quarter of an hour in one place.
    old = ("Run the main job (the built-in default, about two minutes on an idle 2-core CPU). The second "
           "experiment (about a quarter of an hour on the same CPU). default: about three minutes on an idle "
           "2-core CPU; markov about 7 minutes.")
    assert _stray(old) == ["about two minutes on an idle 2-core CPU", "about a quarter of an hour",
                           "about three minutes on an idle 2-core CPU", "about 7 minutes"]
    assert _stray(" ".join(PRESET_TIMES.values())) == []


# ---- one source per figure: the capacity table ---------------------------------------------------


def _code_block_with(text: str, first_line: str) -> str:
    return next(body for _, body in _code_blocks(text) if body.startswith(first_line))


def test_the_capacity_table_is_what_the_committed_default_run_printed():
    from memk.memorize.experiments.capacity import format_table, summarize

    run = DOCS / "default-run"
    summary = json.loads((run / "summary.json").read_text())
    printed = format_table(summary)
    # summary.json is what the run's rows give ...
    order = [m["model_name"] for m in summary["precisions"]["float32"]["models"]]
    rows = [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (order.index(r["model_name"]), r["n_sequences"]))
    assert format_table(summarize(rows)) == printed
    # ... the terminal output the run left is that table ...
    assert (run / "terminal.txt").read_text().startswith(printed + "\n")
    # ... and README and the capacity page show it as printed, for the documented command.
    for page in (README, DOCS / "capacity.md"):
        assert _code_block_with(page.read_text(), "precision float32") == printed, page.name
    record = json.loads((run / "run.json").read_text())
    assert record["command"].split(" --")[0] == "memk run-capacity"
    assert all(record[key] for key in ("date", "cpu", "load_1_5_15_before", "commit"))


def test_no_tracked_page_or_run_record_names_a_folder_of_this_machine():
    for path in [*_pages(), *(DOCS / "default-run").glob("*.json"), DOCS / "default-run" / "terminal.txt"]:
        assert not re.search(r"(?<![\w.])/(?:tmp|work|home|root)/", path.read_text()), path


# ---- the kernels' API as README shows it -------------------------------------------------------


def test_readmes_kernel_imports_exist():
    block = next(body for language, body in _code_blocks(README.read_text()) if language == "python")
    import memk.kernels as kernels

    names = [name.strip() for line in block.splitlines() if line.startswith("from memk.kernels import")
             for name in line.split("import", 1)[1].split("#", 1)[0].split(",")]
    assert names and all(hasattr(kernels, name) for name in names), names


# ---- the site --------------------------------------------------------------------------------------

needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                                  reason="MkDocs is not installed (the docs extra); CI builds the site")


def _build(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(root / "build" / "site")],
                          cwd=root, capture_output=True, text=True, timeout=300)


@pytest.fixture
def site_copy(tmp_path):
    """The files the site is built from, copied: docs/, mkdocs.yml, the hook, and the result files pages link."""
    (tmp_path / ".ci").mkdir()
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copytree(ROOT / "bench" / "results", tmp_path / "bench" / "results")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copy(ROOT / ".ci" / "mkdocs_repo_links.py", tmp_path / ".ci")
    return tmp_path


@needs_mkdocs
@pytest.mark.slow
def test_the_site_builds_strictly_and_fails_on_a_broken_link_or_a_page_left_out(site_copy):
    built = _build(site_copy)
    assert built.returncode == 0, built.stderr
    index = (site_copy / "build" / "site" / "benchmarks" / "index.html").read_text()
    assert "<code>bench/results/cpu-amd-epyc-2core.json</code>" in index  # a repository file, shown by its path

    page = site_copy / "docs" / "ray.md"
    good = page.read_text()
    for broken, says in ((good.replace("(capacity.md)", "(capacty.md)", 1), "capacty.md"),
                         (good.replace("ray-vs-local-2core.json)", "ray-vs-local-2cor.json)", 1), "ray-vs-local-2cor.json"),
                         (good.replace("(capacity.md)", "(capacity.md#no-such-heading)", 1), "no-such-heading")):
        assert broken != good
        page.write_text(broken)
        failed = _build(site_copy)
        assert failed.returncode != 0 and says in failed.stderr, failed.stderr
    page.write_text(good)
    (site_copy / "docs" / "extra.md").write_text("# not in the nav\n")
    failed = _build(site_copy)
    assert failed.returncode != 0 and "extra.md" in failed.stderr, failed.stderr
