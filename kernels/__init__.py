"""memk.kernels: attention and log-prob ops for GPT-style models.

Knows nothing of experiments. Models pick an implementation by backend name
through `packed_attention(name)` and `logprob_ops(name)`; `reference` is plain
PyTorch and always available.
"""

if __name__ == "kernels":
    # This folder imported under the bare name `kernels`: the repository root is on sys.path
    # (`python -c`, `python -m`, `python -`, an interactive `python` started in it), and whoever
    # imports `kernels` (transformers does, at load) asks for Hugging Face's package of that name,
    # never for memk, which is only ever `memk.kernels`. Hand over to that package, or say it is
    # not installed; nothing of memk's is loaded under the bare name.
    def _hand_over_to_hugging_faces_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.realpath(__file__))

        def ours(entry) -> bool:
            return isinstance(entry, str) and os.path.realpath(os.path.join(entry or os.curdir, "kernels")) == here

        # Where the import system would have found `kernels` had this folder not answered first.
        spec = None
        for finder in sys.meta_path:
            if finder is importlib.machinery.PathFinder:
                found = finder.find_spec("kernels", [entry for entry in sys.path if not ours(entry)])
            elif hasattr(finder, "find_spec"):
                found = finder.find_spec("kernels", None)
            else:
                continue
            if found is not None and not (found.origin and os.path.dirname(os.path.realpath(found.origin)) == here):
                spec = found
                break
        if spec is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = module  # what `import kernels` returns once this file has run
            spec._initializing = True  # as the import system marks a module while it runs
            try:
                spec.loader.exec_module(module)
            finally:
                spec._initializing = False
            return
        machinery = {"kernels", "importlib", "importlib._bootstrap", "importlib._bootstrap_external",
                     "_frozen_importlib", "_frozen_importlib_external"}
        importer = sys._getframe(1)  # this file's frame, then the import system's, then the importer's
        while importer is not None and importer.f_globals.get("__name__") in machinery:
            importer = importer.f_back
        if importer is not None and str(importer.f_globals.get("__name__")).split(".")[0] == "transformers":
            # transformers' availability check (utils/import_utils.py, _is_package_available) finds this
            # folder with importlib.util.find_spec, finds no `kernels` distribution in importlib.metadata
            # and, as a last resort, imports the name and reads a module without __file__ as "not
            # installed"; raising would end `import transformers`. None in sys.modules gives it None
            # (not installed), and from then on find_spec("kernels") is None and `import kernels` a
            # ModuleNotFoundError, so its check and every later import agree.
            sys.modules["kernels"] = None
            return
        raise ModuleNotFoundError(
            "No module named 'kernels' (Hugging Face's `kernels` package is not installed; the folder "
            f"{here} is memk's own code, importable only as memk.kernels)",
            name="kernels",
        )

    _hand_over_to_hugging_faces_kernels()
else:
    from .backends import (
        attention_backends,
        default_attention_backend,
        default_logprob_backend,
        logprob_backends,
        logprob_ops,
        packed_attention,
        register_attention_backend,
        register_logprob_backend,
    )
    from .interfaces import BackendUnavailable, LogprobOps

    # The fused log-prob ops; importing them compiles nothing (the kernels build on first call).
    from .fused_logprob import cross_entropy, sequence_bits, token_logprobs
    from .head_logprob import head_token_logprobs, logprob_moments

__all__ = [
    "BackendUnavailable",
    "LogprobOps",
    "attention",
    "attention_packed",
    "attention_backends",
    "cross_entropy",
    "default_attention_backend",
    "default_logprob_backend",
    "head_token_logprobs",
    "logprob_backends",
    "logprob_moments",
    "logprob_ops",
    "packed_attention",
    "register_attention_backend",
    "register_logprob_backend",
    "sequence_bits",
    "token_logprobs",
]


def __getattr__(name: str):
    # The Triton ops load on first use, so importing memk.kernels does not import triton.
    if name in ("attention", "attention_packed"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.flash_attention"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
