"""The train suite's ensemble cases: K runs of one model shape trained as one stacked model
(memk.memorize.ensemble) against the same K runs stepped one after another.

One call is one training step of every run: K forward + backward passes, gradient clips and
AdamW steps, each run on its own batch (the loop's step; memorize/train.py and the ensemble
executor). Work is counted in model-steps, so model-steps/s compares directly across K. Both
variants use memk's default backends for the device and, on the CPU, the threads memk trains
each with (memorize/runtime.py: one for a small model's step, every core for a large one).

Checked at the initial weights: the first and last member's loss and the first member's
gradients against the reference model in float64 (tests/test_ensemble.py checks whole runs).
"""

from __future__ import annotations

import torch

from memk import kernels

from .case import Cycle, Group, Runner, Skip, Variant, rotations, skip_compile_when_quick
from .suite_model import MODEL_TOLERANCE, autocast_for, float64_reference_model, loss_and_grads

ONE_AT_A_TIME = "one at a time"
ENSEMBLE = "ensemble"
ENSEMBLE_COMPILED = "ensemble (compile)"
ENSEMBLE_GRAPHED = "ensemble (CUDA graphs)"  # torch.compile(mode="reduce-overhead"): the kernels replayed as graphs
CHECK_ROWS = 256  # rows of each member's first batch the float64 check codes


def paper_configs(d_models: list[int]) -> list[tuple[int, int, int]]:
    """One-layer models of the paper's grid: (n_layer, d_model, n_head), heads d_model / 32 as its preset."""
    return [(1, d, max(1, d // 32)) for d in d_models]


def default_ensemble_sizes(device: torch.device, quick: bool) -> tuple[list, list[int], list[int]]:
    """(configs, batches, member counts) swept by default: the issue's grid on CUDA, a slice the
    2-core CPU times in a few minutes (the 1x32 model; K up to 64 at batch 64, and at batch
    512 as far as memory holds), and a seconds-long one for --quick."""
    if quick:
        return paper_configs([32]), [16], [1, 4]
    if device.type == "cuda":
        return paper_configs([32, 64, 128]), [64, 512, 2048], [1, 8, 32, 64]
    return paper_configs([32]), [64, 512], [1, 4, 16, 64]


def _ensemble_bytes(config, members: int, batch: int) -> int:
    """A generous estimate of an ensemble step's memory: logits, their gradient and the op's
    temporaries (4 copies of K x B x S x V in float32) dominate at V 2048."""
    return 4 * members * batch * config.seq_len * config.vocab_size * 4


def _ensemble_inputs(config, members: int, batch: int, seed: int):
    def make(device: torch.device) -> dict:
        from memk.memorize.model import GPT

        free, need = _free_bytes(device), _ensemble_bytes(config, members, batch)
        if free is not None and need > 0.6 * free:
            return {"too_big": f"K={members} x batch {batch} needs about {need / 2**30:.1f} GiB, "
                               "more than this device holds free"}
        states = []
        for k in range(members):  # each member its own initial weights, as runs with their own seeds
            torch.manual_seed(seed + k)
            states.append(GPT(config, "reference", "reference").state_dict())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        step_bytes = members * batch * config.seq_len * 8
        batches = [torch.randint(0, config.vocab_size, (members, batch, config.seq_len), generator=gen).to(device)
                   for _ in range(rotations(step_bytes, device))]
        return {"config": config, "states": states, "batches": batches,
                "check_batch": batches[0][:, :CHECK_ROWS].contiguous()}

    return make


def _free_bytes(device: torch.device) -> int | None:
    from memk.memorize.runtime import free_memory_bytes

    return free_memory_bytes(device)


def _float64_reference(inputs: dict, device: torch.device) -> dict:
    """Loss of the first and last member and the first member's gradients, each member's weights in
    the float64 reference model; computed once per group."""
    if "float64" not in inputs:
        first, last = 0, len(inputs["states"]) - 1
        models = {k: float64_reference_model(inputs["config"], inputs["states"][k], device) for k in {first, last}}
        loss, grads = loss_and_grads(models[first], inputs["check_batch"][first])
        with torch.no_grad():
            losses = [loss] + ([models[last].loss(inputs["check_batch"][last])] if last != first else [])
        inputs["float64"] = {"losses": torch.stack(losses), "grads": grads}
    return inputs["float64"]


def _ensemble_check(device: torch.device):
    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        from .case import norm_rel_err

        ref = _float64_reference(inputs, device)
        tol = MODEL_TOLERANCE[outputs["dtype"]]
        loss_err = ((outputs["losses"].double() - ref["losses"]).abs() / ref["losses"].abs()).max().item()
        grad_err = max(norm_rel_err(outputs["grads"][n], g) for n, g in ref["grads"].items())
        return {"loss (first and last member)": (loss_err, tol.value),
                "grads (first member, worst parameter)": (grad_err, tol.grads)}

    return check


def _threads_restorer():
    """What puts torch's thread count back when a case closes (its calls set memk's training threads)."""
    saved = torch.get_num_threads()
    return lambda: torch.set_num_threads(saved)


def _backends(device: torch.device) -> tuple[str, str]:
    attention, logprob = kernels.default_attention_backend(device), kernels.default_logprob_backend(device)
    try:
        kernels.packed_attention(attention), kernels.logprob_ops(logprob)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"backend unavailable: {exc}") from exc
    return attention, logprob


def _one_at_a_time_variant(dtype: str) -> Variant:
    """K GPTs, each with its own torch AdamW; one call steps each of them once on its own batch."""

    def build(inputs: dict, device: torch.device) -> Runner:
        from memk.memorize.model import GPT
        from memk.memorize.runtime import use_cpu_threads

        if "too_big" in inputs:
            raise Skip(inputs["too_big"])
        attention, logprob = _backends(device)
        config = inputs["config"]
        models = []
        for state in inputs["states"]:
            model = GPT(config, attention_backend=attention, logprob_backend=logprob)
            model.load_state_dict(state)
            models.append(model.to(device))
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.98), fused=device.type == "cuda")
                      for m in models]
        cycle = Cycle(inputs["batches"])
        restore_threads = _threads_restorer()

        def call():
            x = cycle.next()
            use_cpu_threads(device, config, x.shape[1])
            for k, (model, optimizer) in enumerate(zip(models, optimizers)):
                optimizer.zero_grad(set_to_none=True)
                with autocast_for(device, dtype):
                    loss = model.loss(x[k])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

        def outputs():
            losses = []
            for k in sorted({0, len(models) - 1}):
                models[k].zero_grad(set_to_none=True)
                with autocast_for(device, dtype):
                    losses.append(models[k].loss(inputs["check_batch"][k]))
            losses[0].backward()
            grads = {n: p.grad.detach().clone() for n, p in models[0].named_parameters()}
            for m in models:
                m.zero_grad(set_to_none=True)
            return {"losses": torch.stack(losses).detach(), "grads": grads, "dtype": dtype}

        def reset():
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)

        return Runner(call, outputs, restore_threads, reset)

    return Variant(ONE_AT_A_TIME, "baseline", build,
                   f"K GPTs stepped one after another (forward, backward, clip, torch AdamW), {dtype}", dtype=dtype)


def _ensemble_variant(dtype: str, compile_mode: str | None, quick: bool) -> Variant:
    """One EnsembleGPT of K members with EnsembleAdamW; one call steps all members at once; its
    losses compiled in compile_mode (memorize/ensemble.py's COMPILE_MODES) unless it is None."""
    compiled = compile_mode is not None

    def build(inputs: dict, device: torch.device) -> Runner:
        from memk.memorize.ensemble import EnsembleAdamW, EnsembleGPT
        from memk.memorize.ensemble import compiled_losses
        from memk.memorize.runtime import use_cpu_threads

        if "too_big" in inputs:
            raise Skip(inputs["too_big"])
        if compiled:
            skip_compile_when_quick(quick)
            if device.type != "cuda":
                raise Skip("the compiled ensemble step is the CUDA path (tiny models are launch-bound there); "
                           "the CPU trains ensembles eagerly")
        attention, logprob = _backends(device)
        config, members = inputs["config"], len(inputs["states"])
        model = EnsembleGPT(config, members, attention, logprob, device, torch.float32)
        for k, state in enumerate(inputs["states"]):
            model.import_member(k, state)
        optimizer = EnsembleAdamW(model, (0.9, 0.98))
        if compiled:
            torch._dynamo.reset()
        losses_of = compiled_losses(model, compile_mode) if compiled else model.member_losses
        cycle = Cycle(inputs["batches"])
        restore_threads = _threads_restorer()
        everyone = [True] * members

        def call():
            x = cycle.next()
            use_cpu_threads(device, config, members * x.shape[1])
            rows = torch.full((members,), x.shape[1], device=device)
            with autocast_for(device, dtype):
                losses = losses_of(x, rows)
            optimizer.zero_grad()
            losses.sum().backward()
            optimizer.clip_gradients([1.0] * members)
            optimizer.step([1e-3] * members, [0.0] * members, everyone)

        def outputs():
            x = inputs["check_batch"]
            optimizer.zero_grad()
            with autocast_for(device, dtype):
                losses = losses_of(x, torch.full((members,), x.shape[1], device=device))
            losses[0].backward()  # member 0's loss reaches member 0's slice of each stacked parameter only
            grads = {name: p.grad[0].detach().clone() for name, p in model.params.items()}
            optimizer.zero_grad()
            picked = losses.detach()[sorted({0, members - 1})]
            return {"losses": picked, "grads": grads, "dtype": dtype}

        return Runner(call, outputs, restore_threads, reset=optimizer.zero_grad)

    name = {None: ENSEMBLE, "default": ENSEMBLE_COMPILED, "reduce-overhead": ENSEMBLE_GRAPHED}[compile_mode]
    how = {None: "", "default": "torch.compile of the members' losses, ",
           "reduce-overhead": "torch.compile(mode='reduce-overhead') of the members' losses (CUDA graphs), "}
    return Variant(name, "candidate", build, how[compile_mode]
                   + f"EnsembleGPT of K members with EnsembleAdamW (forward, backward, per-member clip and step), {dtype}",
                   compare_to=(ONE_AT_A_TIME,), dtype=dtype)


def ensemble_groups(device: torch.device, dtypes: list[str], quick: bool,
                    configs: list[tuple[int, int, int]] | None = None, batches: list[int] | None = None,
                    members: list[int] | None = None, compile_members: list[int] | None = None,
                    compile_dtypes: list[str] | None = None) -> list[Group]:
    """One group per model, batch, dtype and K: K runs one at a time against their ensemble (and,
    on CUDA, the ensemble compiled, then compiled as CUDA graphs; compile_members and
    compile_dtypes limit that, since each K, dtype and mode compiles anew, for tens of seconds).
    Groups too big for the memory free are kept, their variants skipped with the reason."""
    from memk.memorize.ensemble import COMPILE_MODES
    from memk.memorize.model import GPTConfig, count_parameters, training_flops_per_token

    default_configs, default_batches, default_members = default_ensemble_sizes(device, quick)
    configs, batches, members = configs or default_configs, batches or default_batches, members or default_members
    groups = []
    for n_layer, d_model, n_head in configs:
        config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=2048, seq_len=64)
        for batch in batches:
            for dtype in [d for d in dtypes if d in ("float32", "bfloat16", "float16")]:
                for k in members:
                    variants = [_one_at_a_time_variant(dtype), _ensemble_variant(dtype, None, quick)]
                    if (compile_members is None or k in compile_members) and (
                            compile_dtypes is None or dtype in compile_dtypes):
                        variants += [_ensemble_variant(dtype, mode, quick) for mode in COMPILE_MODES]
                    tokens = k * batch * (config.seq_len - 1)
                    groups.append(Group(
                        suite="train",
                        family=f"ensemble step {config.name} B{batch} {dtype}",
                        sweep_axis="members",
                        sweep_value=k,
                        dtype=dtype,
                        params={"config": config.to_dict(), "name": config.name, "batch": batch, "members": k,
                                "tokens_per_step": tokens, "optimizer": "AdamW, clip 1", "params": count_parameters(config),
                                "dtype": dtype},
                        make_inputs=_ensemble_inputs(config, k, batch, seed=d_model * 100 + batch + k),
                        check=_ensemble_check(device),
                        work=k,
                        work_unit="model-steps",
                        flops=training_flops_per_token(config) * tokens,
                        variants=variants,
                    ))
    return groups
