"""Building memk's native library (memk.kernels.native_build): what a build needs, where it
builds, how a failed build is said, and what an interrupted build leaves behind.

torch.utils.cpp_extension marks a build in progress with a plain file, `lock`, in the build
folder, and every later build waits for it to disappear, forever. A build killed hard
(SIGKILL, the OOM killer, a closed terminal) leaves it behind. These tests reproduce that and
check that memk recovers, and that one process waiting for another says so and gives up in
the end with an error naming the lock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memk.kernels import BackendUnavailable
from memk.kernels import native_build as nb

needs_a_compiler = pytest.mark.skipif(
    nb.missing_build_requirements("cpu") is not None,
    reason=f"cannot build the fused kernels here: {nb.missing_build_requirements('cpu')}",
)

# Generous: a build takes 20-40 s on 2 cores. Only a hang comes near it.
BUILD_TIMEOUT_S = 600

# Build, then check the op against torch's log_softmax in float64 on the same logits.
USE_THE_OP = """
import torch
from memk.kernels import fused_logprob as ce
ce.load_extension()
x = torch.randn(5, 300, dtype=torch.float64).float()
t = torch.randint(0, 300, (5,))
want = torch.log_softmax(x.double(), -1).gather(-1, t[:, None])[:, 0]
torch.testing.assert_close(ce.token_logprobs(x, t).double(), want, rtol=1e-5, atol=2e-5)
print("op ok")
"""


def _env(extensions_dir: Path) -> dict[str, str]:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)}


def _wait_for(condition, what: str, proc: subprocess.Popen, limit_s: float = BUILD_TIMEOUT_S):
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the first build exited (code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@needs_a_compiler
@pytest.mark.slow
def test_next_run_completes_after_a_first_build_is_killed(tmp_path):
    root = tmp_path / "extensions"
    first = subprocess.Popen(
        [sys.executable, "-c", "from memk.kernels import fused_logprob as ce; ce.load_extension()"],
        env=_env(root),
        start_new_session=True,  # its own process group: the compilers die with it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def batons() -> list[Path]:
        # Mid-build: torch has taken its lock and written the ninja file, so the compilers run.
        return [p for p in root.rglob("lock") if (p.parent / "build.ninja").exists()]

    try:
        _wait_for(batons, "the build to start", first)
        baton = batons()[0]
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: _wait_for says why
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert baton.exists(), "the killed build should have left torch's lock behind (the case under test)"

    second = subprocess.run(
        [sys.executable, "-c", USE_THE_OP], env=_env(root), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert second.returncode == 0, second.stderr
    assert "op ok" in second.stdout
    assert str(baton) in second.stderr, f"the removed stale lock should be named: {second.stderr}"
    assert not baton.exists()


def _tools(monkeypatch, *present):
    """Only these programs are on PATH, as shutil.which sees it."""
    monkeypatch.setattr(nb.shutil, "which", lambda name: f"/usr/bin/{name}" if name in present else None)


def test_missing_build_requirements_name_what_is_missing(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    _tools(monkeypatch, "c++", "ninja")
    assert nb.missing_build_requirements("cpu") is None and nb.can_build("cpu")
    assert "not mps" in nb.missing_build_requirements("mps") and not nb.can_build("mps")

    _tools(monkeypatch, "ninja")
    assert "no C++ compiler found (looked for 'c++'" in nb.missing_build_requirements("cpu")
    monkeypatch.setenv("CXX", "clang++")
    _tools(monkeypatch, "c++", "ninja")  # CXX names the compiler looked for
    assert "'clang++'" in nb.missing_build_requirements("cpu") and "set CXX" in nb.missing_build_requirements("cpu")

    monkeypatch.delenv("CXX")
    _tools(monkeypatch, "c++")
    assert "ninja is not installed" in nb.missing_build_requirements("cpu")

    _tools(monkeypatch, "c++", "ninja")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch: the CPU kernels only
    assert nb.missing_build_requirements("cpu") is None
    assert "CUDA build of torch" in nb.missing_build_requirements("cuda") and not nb.can_build("cuda")


def test_load_library_says_why_it_cannot_and_names_the_reference_backend(monkeypatch):
    builds = []
    monkeypatch.setattr(nb, "_build", lambda with_cuda: builds.append(with_cuda))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(BackendUnavailable, match=r"cannot be built: no C\+\+ compiler found.*'reference'"):
        nb.load_library()
    assert builds == []  # nothing was tried

    monkeypatch.delenv("CXX")
    _tools(monkeypatch, "c++", "ninja")

    def compiler_error(with_cuda):
        raise RuntimeError("Error building extension 'memk_logprob_cpu'")

    monkeypatch.setattr(nb, "_build", compiler_error)
    with pytest.raises(BackendUnavailable, match=r"failed \(RuntimeError: Error building extension.*'reference'") as err:
        nb.load_library()
    assert isinstance(err.value.__cause__, RuntimeError)


def test_load_library_builds_the_cpu_kernels_where_there_is_no_gpu(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    _tools(monkeypatch, "c++", "ninja")
    builds = []
    monkeypatch.setattr(nb, "_build", lambda with_cuda: builds.append(with_cuda))
    monkeypatch.setattr(nb, "cuda_toolkit_found", lambda: True)  # CUDA torch and nvcc, but no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nb.load_library() is False and builds == [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nb.load_library() is True and builds == [False, True]


def test_build_folder_is_per_environment_torch_version_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    here = nb.build_directory(with_cuda=False)
    assert here.parent == tmp_path / "extensions" / "memk" and torch.__version__ in here.name
    assert nb.build_directory(with_cuda=False) == here  # stable
    assert nb.build_directory(with_cuda=True) != here

    def folder_with(obj, name, value):
        with monkeypatch.context() as m:
            m.setattr(obj, name, value)
            return nb.build_directory(with_cuda=False)

    assert folder_with(sys, "prefix", str(tmp_path / "another-venv")) != here
    assert folder_with(torch, "__version__", "0.0.1") != here
    # A copy of the sources builds in the same folder, until one header changes.
    sources = tmp_path / "csrc"
    sources.mkdir()
    for f in nb.csrc_dir().iterdir():
        if f.is_file():
            (sources / f.name).write_bytes(f.read_bytes())
    assert folder_with(nb, "csrc_dir", lambda: sources) == here
    (sources / "logprob_math.h").write_text((sources / "logprob_math.h").read_text() + "\n// changed\n")
    assert folder_with(nb, "csrc_dir", lambda: sources) != here


LOCK_HOLDER = """
import sys
from pathlib import Path
from memk.kernels import native_build as nb
with nb.build_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_waiting_for_another_build_says_so_and_gives_up_naming_the_lock(monkeypatch, tmp_path, capfd):
    build_dir = tmp_path / "build"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(build_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        monkeypatch.setattr(nb, "BUILD_WAIT_NOTICE_S", 0.0)
        monkeypatch.setattr(nb, "BUILD_WAIT_LIMIT_S", 0.5)
        with pytest.raises(BackendUnavailable) as err:
            with nb.build_lock(build_dir):
                pass
        message = str(err.value)
        lock = str(nb.lock_path(build_dir))
        assert lock in message and str(holder.pid) in message and "reference" in message
        notice = capfd.readouterr().err
        assert "waiting" in notice and lock in notice and str(holder.pid) in notice
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Once the holder has gone (its lock went with it), the lock is free at once.
    with nb.build_lock(build_dir):
        pass


def test_a_dead_builders_lock_never_blocks(tmp_path):
    build_dir = tmp_path / "build"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(build_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()
    assert nb.lock_path(build_dir).exists()  # the file stays; the lock on it died with its process
    with nb.build_lock(build_dir):
        pass


def test_stale_torch_lock_is_removed_with_a_warning(tmp_path, capfd):
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    baton = build_dir / "lock"
    baton.touch()  # what a build killed hard leaves behind
    with nb.build_lock(build_dir):
        nb.remove_stale_baton(build_dir)
    assert not baton.exists()
    err = capfd.readouterr().err
    assert str(baton) in err and err.count("\n") == 1


def test_stale_torch_lock_waits_for_the_dead_builders_compilers(monkeypatch, tmp_path, capfd):
    # A builder killed alone leaves ninja and the compilers running in the build folder; a
    # stand-in that works there until its stdin closes.
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    baton = build_dir / "lock"
    baton.touch()
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('working', flush=True); sys.stdin.read()"],
        cwd=build_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert orphan.stdout.readline().strip() == "working"
        monkeypatch.setattr(nb, "BUILD_WAIT_NOTICE_S", 0.0)
        monkeypatch.setattr(nb, "BUILD_WAIT_LIMIT_S", 0.5)
        with nb.build_lock(build_dir):
            with pytest.raises(BackendUnavailable, match=rf"{orphan.pid}.*{build_dir}.*kill"):
                nb.remove_stale_baton(build_dir)
        assert baton.exists()  # not removed while something may still write there
        assert "waiting" in capfd.readouterr().err
    finally:
        orphan.stdin.close()
        orphan.wait(timeout=60)
    with nb.build_lock(build_dir):
        nb.remove_stale_baton(build_dir)
    assert not baton.exists()
