"""The train and bits suites: the GPT-2 model of memk.memorize with memk's backends against the
reference model (torch SDPA attention, plain PyTorch log-probs).

train: one AdamW step per call, per model size, in float32, TF32 (CUDA) and autocast 16-bit,
against the reference model eager and under torch.compile; checked at the initial weights against
the reference model's loss and gradients in float64.
bits: GPT.sequence_bits over a dataset of random sequences (what memorization is measured
with), checked against the float64 reference model's bits.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch

from memk import kernels

from .case import (
    TORCH_DTYPES,
    Cycle,
    Group,
    Runner,
    Skip,
    Variant,
    candidate_attention_backends,
    candidate_logprob_backends,
    logprob_ops_or_skip,
    max_rel_err,
    norm_rel_err,
    packed_attention_or_skip,
    skip_compile_when_quick,
)


def default_model_configs(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(n_layer, d_model, n_head) from the paper's grid (V 2048, S 64); head_dim 16-64."""
    if quick:
        return [(1, 32, 2)]
    if device.type == "cuda":
        return [(1, 64, 2), (2, 128, 4), (4, 256, 8), (8, 512, 8)]
    return [(1, 32, 2), (2, 64, 2), (4, 128, 4)]


class ModelBackends(NamedTuple):
    """The backends one model variant is built with."""

    attention: str
    logprob: str

    def label(self, dtype: str) -> str:
        """The variant's name, e.g. "sdpa+fused bfloat16"."""
        return f"{self.attention}+{self.logprob} {dtype}"


REFERENCE_MODEL = ModelBackends("sdpa", "reference")


def _model_backends(device: torch.device, logprob: list[str] | None, attention: list[str] | None,
                    interpreter: bool = False) -> list[ModelBackends]:
    """The reference model first, then memk's fused paths (memk attention on CUDA, or on CPU under
    the Triton interpreter)."""
    combos = [REFERENCE_MODEL]
    for lp in candidate_logprob_backends(logprob):
        combos.append(ModelBackends("sdpa", lp))
        if device.type == "cuda" or interpreter:
            combos += [ModelBackends(att, lp) for att in candidate_attention_backends(attention)]
    return combos


def _build_model(config, backends: ModelBackends, device: torch.device, state: dict, interpreter: bool = False,
                 dtype: str | None = None):
    """The GPT with these backends and the given weights; Skip where a backend cannot run here."""
    from memk.memorize.model import GPT

    if backends.logprob != "reference":
        logprob_ops_or_skip(backends.logprob)  # a missing or unbuildable backend says why
    if backends.attention not in ("sdpa", "reference"):
        packed_attention_or_skip(backends.attention, device, interpreter, dtype)
    try:
        model = GPT(config, attention_backend=backends.attention, logprob_backend=backends.logprob)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"backend unavailable: {exc}") from exc
    except ValueError as exc:
        raise Skip(str(exc)) from exc
    model.load_state_dict(state)
    return model.to(device)


def _model_inputs(config, batch: int, n_batches: int, seed: int):
    def make(device: torch.device) -> dict:
        from memk.memorize.model import GPT

        torch.manual_seed(seed)
        state = GPT(config, "reference", "reference").state_dict()
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        batches = [torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=gen).to(device) for _ in range(n_batches)]
        return {"config": config, "state": state, "batches": batches, "check_batch": batches[0][:256]}

    return make


def autocast_for(device: torch.device, dtype: str):
    """Autocast to dtype for the 16-bit dtypes; for float32 and tf32, autocast explicitly off."""
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype])
    return torch.autocast(device.type, enabled=False)


@contextmanager
def _tf32(enabled: bool):
    """TF32 matmuls and convolutions on or off until the context exits, then as they were."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def float64_reference_model(config, state: dict, device: torch.device):
    """The reference model (explicit attention, plain log-probs) with these weights, in float64:
    what the train, bits and ensemble checks compare with."""
    return _build_model(config, ModelBackends("reference", "reference"), device, state).double()


def loss_and_grads(model, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's loss on batch and the gradient it leaves on each parameter."""
    loss = model.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _float64_reference(inputs: dict, device: torch.device):
    """Loss, gradients and bits of the float64 reference model on the check batch; computed once
    per group and kept in its inputs."""
    if "float64" not in inputs:
        model = float64_reference_model(inputs["config"], inputs["state"], device)
        x = inputs["check_batch"]
        loss, grads = loss_and_grads(model, x)
        with torch.no_grad():
            bits = model.sequence_bits(x)
        inputs["float64"] = {"loss": loss, "grads": grads, "bits": bits}
        del model
    return inputs["float64"]


class ModelTolerance(NamedTuple):
    """Relative error allowed against the float64 reference model."""

    value: float  # the loss (train) or the bits (bits)
    grads: float  # each parameter's gradient, as a norm (train)


MODEL_TOLERANCE = {  # by compute dtype
    "float32": ModelTolerance(1e-5, 1e-4),
    "tf32": ModelTolerance(5e-3, 5e-2),
    "bfloat16": ModelTolerance(3e-2, 5e-2),
    "float16": ModelTolerance(5e-3, 5e-2),
}


def _train_check(device: torch.device):
    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        ref = _float64_reference(inputs, device)
        tol = MODEL_TOLERANCE[outputs["dtype"]]
        loss_err = abs(outputs["loss"].double().item() - ref["loss"].item()) / abs(ref["loss"].item())
        grad_err = max(norm_rel_err(outputs["grads"][n], g) for n, g in ref["grads"].items())
        return {"loss": (loss_err, tol.value), "grads (worst parameter)": (grad_err, tol.grads)}

    return check


def compiled_label(backends: ModelBackends, dtype: str) -> str:
    """The name of the variant that runs the model under torch.compile, e.g. "sdpa+reference bfloat16 (compile)"."""
    return backends.label(dtype) + " (compile)"


def _train_variant(backends: ModelBackends, dtype: str, compare_to: tuple[str, ...], role: str,
                   compiled: bool = False, quick: bool = False, interpreter: bool = False) -> Variant:
    """compiled: the model's loss (forward; backward through AOTAutograd) under torch.compile; the
    optimizer step stays eager (fused AdamW on CUDA) as in every other variant."""

    def build(inputs: dict, device: torch.device) -> Runner:
        if dtype == "tf32" and device.type != "cuda":
            raise Skip("TF32 is a CUDA tensor-core mode")
        if compiled:
            skip_compile_when_quick(quick)
        model = _build_model(inputs["config"], backends, device, inputs["state"], interpreter, dtype)
        if compiled:
            torch._dynamo.reset()  # a fresh dynamo state per variant, as the logprob suite's compiled baselines
            loss_of = torch.compile(model.loss, dynamic=False)
        else:
            loss_of = model.loss
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        cycle = Cycle(inputs["batches"])
        stack = ExitStack()
        stack.enter_context(_tf32(dtype == "tf32"))

        def call():
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device, dtype):
                loss = loss_of(cycle.next())
            loss.backward()
            optimizer.step()
            return loss

        def outputs():
            # at the initial weights, before any step: compare with the float64 reference
            model.zero_grad(set_to_none=True)
            with autocast_for(device, dtype):
                loss = loss_of(inputs["check_batch"])
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            return {"loss": loss.detach(), "grads": grads, "dtype": dtype}

        return Runner(call, outputs, stack.close, reset=lambda: optimizer.zero_grad(set_to_none=True))

    name = compiled_label(backends, dtype) if compiled else backends.label(dtype)
    return Variant(name, role, build,
                   ("torch.compile(model.loss) of " if compiled else "")
                   + f"GPT(attention_backend={backends.attention!r}, logprob_backend={backends.logprob!r}), "
                   + (f"{dtype} autocast" if dtype in ("bfloat16", "float16") else dtype) + ", AdamW step",
                   compare_to, dtype=dtype)


def default_train_batch(device: torch.device, quick: bool) -> int:
    return 16 if quick else (2048 if device.type == "cuda" else 32)


def train_groups(device: torch.device, dtypes: list[str], quick: bool, logprob: list[str] | None = None,
                 attention: list[str] | None = None, interpreter: bool = False,
                 configs: list[tuple[int, int, int]] | None = None, batch: int | None = None) -> list[Group]:
    """The train suite's groups: one per model size, every backend combination and dtype its variants.

    Per dtype: the reference model (SDPA attention, plain PyTorch cross-entropy), memk's backend
    combinations, then the reference model under torch.compile. A memk combination is compared
    with the reference in the first dtype, and eager and compiled in its own.

    logprob, attention: the memk backends to compare (default: every registered candidate).
    interpreter: memk's Triton attention on CPU, under Triton's interpreter (case.py).
    configs ((n_layer, d_model, n_head)), batch: a selection (cases.py's presets); default the
    sizes for the device.
    """
    from memk.memorize.model import GPTConfig, count_parameters, training_flops_per_token

    batch = batch or default_train_batch(device, quick)
    configs = default_model_configs(device, quick) if configs is None else configs
    dtypes = [d for d in dtypes if d in ("float32", "tf32", "bfloat16", "float16")]
    combos = _model_backends(device, logprob, attention, interpreter)
    groups = []
    for n_layer, d_model, n_head in configs:
        config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=2048, seq_len=64)
        variants = []
        for dtype in dtypes:
            for backends in combos:
                compare = []
                if backends != REFERENCE_MODEL or dtype != dtypes[0]:
                    # the reference model in the first dtype (float32 by default)
                    compare.append(REFERENCE_MODEL.label(dtypes[0]))
                    if backends != REFERENCE_MODEL:
                        compare.append(REFERENCE_MODEL.label(dtype))  # the reference at this dtype
                        compare.append(compiled_label(REFERENCE_MODEL, dtype))  # and compiled
                compare = tuple(dict.fromkeys(compare))
                variants.append(_train_variant(backends, dtype, compare, "baseline" if not compare else "candidate",
                                               interpreter=interpreter))
            variants.append(_train_variant(REFERENCE_MODEL, dtype, (), "baseline", compiled=True, quick=quick))
        tokens = batch * (config.seq_len - 1)
        groups.append(Group(
            suite="train",
            family=f"train step B{batch}",
            sweep_axis="params",
            sweep_value=count_parameters(config),
            dtype=",".join(dtypes),
            params={"config": config.to_dict(), "name": config.name, "batch": batch, "tokens_per_step": tokens,
                    "optimizer": "AdamW", "params": count_parameters(config)},
            make_inputs=_model_inputs(config, batch, n_batches=4, seed=n_layer * 1000 + d_model),
            check=_train_check(device),
            work=tokens,
            work_unit="tokens",
            flops=training_flops_per_token(config) * tokens,
            variants=variants,
        ))
    return groups


def _bits_check(device: torch.device):
    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        ref = _float64_reference(inputs, device)
        return {"bits": (max_rel_err(outputs["bits"], ref["bits"]), MODEL_TOLERANCE[outputs["dtype"]].value)}

    return check


def _bits_variant(backends: ModelBackends, dtype: str, compare_to: tuple[str, ...], interpreter: bool = False) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        model = _build_model(inputs["config"], backends, device, inputs["state"], interpreter, dtype).eval()

        def bits_of(batches):
            with torch.inference_mode(), autocast_for(device, dtype):
                return torch.cat([model.sequence_bits(x) for x in batches])

        return Runner(lambda: bits_of(inputs["batches"]),
                      lambda: {"bits": bits_of([inputs["check_batch"]]), "dtype": dtype})

    description = (f"GPT.sequence_bits over the dataset, {backends.attention} attention, "
                   f"{backends.logprob} log-probs, {dtype}")
    return Variant(backends.label(dtype), "baseline" if not compare_to else "candidate", build, description, compare_to)


def bits_groups(device: torch.device, dtypes: list[str], quick: bool, logprob: list[str] | None = None,
                attention: list[str] | None = None, interpreter: bool = False) -> list[Group]:
    """The bits suite's groups: one per model size and dtype, every backend combination its variants."""
    from memk.memorize.model import GPTConfig, count_parameters

    if quick:
        n_seqs, batch = 256, 128
    elif device.type == "cuda":
        n_seqs, batch = 16384, 2048
    else:
        n_seqs, batch = 1024, 256
    combos = _model_backends(device, logprob, attention, interpreter)
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16")]:
        for n_layer, d_model, n_head in default_model_configs(device, quick):
            config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=2048, seq_len=64)
            base = REFERENCE_MODEL.label(dtype)
            variants = [_bits_variant(b, dtype, () if b == REFERENCE_MODEL else (base,), interpreter) for b in combos]
            groups.append(Group(
                suite="bits",
                family=f"sequence_bits {n_seqs} seqs {dtype}",
                sweep_axis="params",
                sweep_value=count_parameters(config),
                dtype=dtype,
                params={"config": config.to_dict(), "name": config.name, "sequences": n_seqs, "batch": batch,
                        "dtype": dtype, "params": count_parameters(config),
                        "weights": "random init (throughput does not depend on training)"},
                make_inputs=_model_inputs(config, batch, n_batches=n_seqs // batch, seed=n_layer * 1000 + d_model + 7),
                check=_bits_check(device),
                work=n_seqs,
                work_unit="sequences",
                variants=variants,
            ))
    return groups
