import os

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU; the variable must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sigint_raises():
    """SIGINT (Ctrl-C) raises KeyboardInterrupt during the test, as in a terminal, even where the
    test runner was started with SIGINT ignored (a shell's background job)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """memk.bench.audit_demo's models and texts, built once a session: the audit's test files share them."""
    pytest.importorskip("transformers")
    from memk.bench.audit_demo import build_demo

    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine may be busy
    folder = tmp_path_factory.getbasetemp() / "audit-demo"
    paths = {"base": folder / "base", "finetuned": folder / "finetuned", "members": folder / "members.txt",
             "non_members": folder / "non_members.txt"}
    return paths if paths["non_members"].is_file() else build_demo(folder)  # non_members.txt: written last


@pytest.fixture(scope="session")
def texts(demo):
    """The demo's members and non-members, as the audit reads them."""
    from memk.memorize.audit.texts import read_texts

    return read_texts(str(demo["members"])), read_texts(str(demo["non_members"]), what="non-members")
