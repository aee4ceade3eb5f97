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
