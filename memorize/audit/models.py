"""The models `memk audit` codes text with, loaded as ScoringModels (scoring_model.py): any Hugging Face
causal LM (a Hub name, a save_pretrained folder, or one you hold: scoring_model_from), a PEFT adapter
merged into its base, or a memk checkpoint; a model that cannot be loaded is a ConfigError naming the fix.

A memk checkpoint is the reference model run-generalization keeps: a folder holding
reference.json and model.pt (OUT/reference/), or the run's output folder OUT itself; the
tokenizer is OUT/tokenizer.json.

A PEFT adapter (LoRA and the other kinds `peft` saves: a folder holding adapter_config.json beside
the adapter's weights) is loaded onto its base model (adapter_config.json's
base_model_name_or_path, as given or relative to the adapter's folder, or --base-model) and merged
into it (merge_and_unload): the audit codes with the merged weights, which compute what base plus
adapter compute. Its tokenizer is the adapter folder's if it holds one, else the base's. Its resume
key covers the content of the adapter's files and the base's (a Hub base: its commit). The base is
the audit's reference unless --reference names others (memorize/audit/audit.py).

Names: a name that exists is a folder; one that does not is a Hugging Face model name only if it
looks like one (a valid repo id, not starting with "/", "." or "~", whose first part is no local
folder): "audit-demo/finetund", with audit-demo/ here, is a missing folder, said at once. A Hub name
is looked up in the local cache alone, never waiting for the Hub, when HF_HUB_OFFLINE (or
TRANSFORMERS_OFFLINE) is set or the Hub's host cannot be reached within a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import warnings
from pathlib import Path

import torch

from .scoring_model import ScoringModel
from ..errors import ConfigError
from ..outputs import content_digest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INSTALL_HINT = 'pip install "memk[audit]"'
PEFT_HINT = 'pip install "memk[peft]"'
ADAPTER_CONFIG = "adapter_config.json"
HUB_PROBE_SECONDS = 3.0  # how long the Hub's host may take to answer before a name is looked up offline


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 weights on a GPU that has it (float16 on one that has not), float32 on the CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_scoring_model(spec: str, device: torch.device, dtype: torch.dtype,
                       base_model: str | None = None) -> ScoringModel:
    """A Hugging Face name or save_pretrained folder, a memk checkpoint folder, or a PEFT adapter folder
    (on base_model if given, else on the base its adapter_config.json names); ConfigError naming the fix."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model {spec}: is a file, not a folder; give the folder save_pretrained wrote")
        if (path / ADAPTER_CONFIG).is_file():
            return _load_adapter(spec, path, device, dtype, base_model)
        if base_model is not None:
            raise ConfigError(f"--base-model is for a PEFT adapter, but {spec} has no {ADAPTER_CONFIG}; leave it out")
        memk_folder = _memk_checkpoint_folder(path)
        if memk_folder is not None:
            return _load_memk(spec, memk_folder, device, dtype)
        return _load_huggingface(spec, str(path), device, dtype, local=True)
    if looks_like_path(spec):
        raise ConfigError(
            f"model folder {spec} does not exist; give a folder written by save_pretrained, a memk checkpoint "
            "folder, a PEFT adapter folder, or a Hugging Face model name"
        )
    if base_model is not None:
        raise ConfigError(f"--base-model is for a PEFT adapter folder, but {spec} is a Hugging Face model name")
    return _load_huggingface(spec, spec, device, dtype, local=False)


def looks_like_path(spec: str) -> bool:
    """A name that can only mean a local folder (module docstring): it starts with "/", "." or "~", holds
    the system's own separator where that is not "/", has a first part that is a folder here, or is no
    valid Hugging Face repo id."""
    if spec.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in spec) or (os.altsep and os.altsep != "/"
                                                                                   and os.altsep in spec):
        return True
    if "/" in spec and Path(spec.split("/")[0]).is_dir():
        return True
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # no huggingface_hub (it comes with transformers): the loader says what to install
        return spec.count("/") > 1
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return True
    return False


def hub_offline() -> bool:
    """Whether Hub names are looked up in the local cache alone (module docstring)."""
    if any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return True
    return not _reachable(constants.ENDPOINT, HUB_PROBE_SECONDS)


def _reachable(endpoint: str, seconds: float) -> bool:
    """Whether endpoint's host takes a TCP connection within `seconds` (name lookup included: in a thread,
    since getaddrinfo takes no timeout)."""
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    answer = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            answer.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(answer)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"auditing Hugging Face models needs the transformers package; {INSTALL_HINT}") from None
    transformers.utils.logging.set_verbosity_error()  # no "sequence longer than the model" notes: memk windows them
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar: the audit has its own
    return transformers


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _load_huggingface(spec: str, source: str, device: torch.device, dtype: torch.dtype, local: bool) -> ScoringModel:
    module, tokenizer = _huggingface_parts(spec, source, dtype, local)
    module.to(device)
    return scoring_model_from(module, tokenizer, spec, _source_fingerprint(source, local, module.config))


def _huggingface_parts(spec: str, source: str, dtype: torch.dtype, local: bool, tokenizer_source: str | None = None):
    """The causal LM (on the CPU) and the tokenizer (from tokenizer_source if given) of a folder or Hub name."""
    transformers = _transformers()
    from safetensors import SafetensorError  # what transformers raises on cut-short .safetensors (it depends on it)
    where = "folder" if local else "Hugging Face model"
    if local and not (Path(source) / "config.json").exists():
        raise ConfigError(
            f"{spec} is not a causal language model: the folder has no config.json; give a folder written by "
            "save_pretrained of a *ForCausalLM model, or a memk checkpoint folder"
        )
    offline = not local and hub_offline()
    hub = {"local_files_only": True} if offline else {}
    # With peft installed, transformers also looks for an adapter under the name: in the cache alone too.
    adapter_hub = {"adapter_kwargs": {"local_files_only": True}} if offline else {}
    try:
        module = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **hub, **adapter_hub)
    except (ValueError, KeyError) as e:  # transformers' word for "this config is not a causal LM"
        raise ConfigError(
            f"{where} {spec} is not a causal language model transformers can load ({_one_line(e)}); "
            "give a *ForCausalLM model"
        ) from None
    except (OSError, RuntimeError, SafetensorError) as e:  # not found on the Hub, offline, damaged or cut-short weights
        if offline:
            raise ConfigError(
                f"no folder {spec} here, and Hugging Face model {spec} is not in the local cache (the Hub is not "
                "asked: HF_HUB_OFFLINE is set or huggingface.co cannot be reached); check the name, or give a "
                "folder written by save_pretrained"
            ) from None
        raise ConfigError(
            f"cannot load {where} {spec} ({_one_line(e)}); check the name, or give a folder written by save_pretrained"
        ) from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source or source, **hub)
    except Exception as e:  # noqa: BLE001 - any failure: one line naming the cause
        raise ConfigError(
            f"{where} {spec} has no tokenizer transformers can load ({_one_line(e)}); save the tokenizer beside "
            "the model with tokenizer.save_pretrained(FOLDER)"
        ) from None
    return module, tokenizer


def _load_adapter(spec: str, folder: Path, device: torch.device, dtype: torch.dtype,
                  base_model: str | None) -> ScoringModel:
    """A PEFT adapter merged into its base (module docstring)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"adapter {spec}: cannot read its {ADAPTER_CONFIG} ({_one_line(e)})") from None
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    base_spec = base_model or named
    if not base_spec:
        raise ConfigError(f"adapter {spec}: its {ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
                          "give the base with --base-model")
    base_source, base_local = _adapter_base(spec, folder, base_spec, base_model is not None)
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{spec} is a PEFT adapter; loading it needs the peft package: {PEFT_HINT}") from None
    own_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    module, tokenizer = _huggingface_parts(base_spec, base_source, dtype, base_local,
                                           tokenizer_source=str(folder) if own_tokenizer else None)
    base_fingerprint = _source_fingerprint(base_source, base_local, module.config)
    try:
        with warnings.catch_warnings():  # peft's and transformers' deprecation notes to each other: not the user's
            warnings.simplefilter("ignore", FutureWarning)
            module = peft.PeftModel.from_pretrained(module, str(folder)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - shapes that do not fit, damaged weights: one line naming the fix
        raise ConfigError(
            f"adapter {spec} cannot be loaded onto its base {base_spec} ({_one_line(e)}); give the base it was "
            "trained on with --base-model"
        ) from None
    module.to(device)
    fingerprint = {"adapter": _source_fingerprint(str(folder), True, None), "base": base_fingerprint}
    model = scoring_model_from(module, tokenizer, spec, fingerprint)
    model.kind = model.fingerprint["kind"] = "peft-adapter"  # as audit.json's provenance says too
    model.base_source = base_source
    model.details = {"adapter": {"base": base_spec, "base_given_by": "--base-model" if base_model else ADAPTER_CONFIG,
                                 "peft_type": config.get("peft_type"), "r": config.get("r"),
                                 "merged": "merge_and_unload"}}
    return model


def _adapter_base(spec: str, folder: Path, base: str, given: bool) -> tuple[str, bool]:
    """(where to load the base from, whether it is a local folder): base as given, or relative to the adapter."""
    path = Path(base).expanduser()
    if path.is_dir():
        return str(path), True
    if not path.is_absolute() and (folder / path).is_dir():
        return str(folder / path), True
    if path.exists() or looks_like_path(base):
        where = (f"--base-model {base}" if given
                 else f"its base model {base} (base_model_name_or_path in {ADAPTER_CONFIG})")
        raise ConfigError(f"adapter {spec}: {where} is no folder here; give the base model's folder with --base-model")
    return base, False


def scoring_model_from(module, tokenizer, name: str = "in-memory model", fingerprint: dict | None = None) -> ScoringModel:
    """A ScoringModel of a transformers causal LM and its tokenizer already loaded (on the device
    you want). The resume key identifies it by `fingerprint`, by default by name and weight checksums."""
    _transformers()
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise ConfigError(
            f"the tokenizer of {name} has neither a BOS nor an EOS token, so the first token of a text has no "
            "context to be coded from; set tokenizer.bos_token and save it again"
        )
    config = module.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not context:
        raise ConfigError(f"{name}: its config names no context length (max_position_embeddings); pass --window N")
    module.eval()
    backbone = module.base_model

    def hidden(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0]

    head = module.get_output_embeddings()
    weight = head.weight if isinstance(head, torch.nn.Linear) else None
    bias = head.bias if isinstance(head, torch.nn.Linear) else None
    model = ScoringModel(
        spec=name, kind="huggingface", module=module,
        # transformers' tokenizers fail on an empty batch (IndexError); a resumed audit may have no text left.
        encode=lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else [],
        start_id=int(start_id), start_token=str(tokenizer.convert_ids_to_tokens(int(start_id))),
        context=int(context), hidden=hidden, head_weight=weight, head_bias=bias,
        fingerprint={"spec": name, "kind": "huggingface", **(fingerprint or _weights_checksum(module))},
    )
    if weight is not None and not _head_reproduces_logits(model):
        # Soft-capped or scaled logits (Gemma 2, Cohere, ...): the head alone is not the model's output.
        model.head_weight = model.head_bias = None
    return model


@torch.no_grad()
def _weights_checksum(module: torch.nn.Module) -> dict:
    """Sums of every weight tensor, digested: changes whenever training changed a weight."""
    sums = [(name, float(p.double().sum()), float(p.double().abs().sum())) for name, p in module.named_parameters()]
    return {"weights": content_digest(sums)}


@torch.no_grad()
def _head_reproduces_logits(model: ScoringModel) -> bool:
    """Whether output head(final hidden states) equals the model's own logits, on a short probe."""
    ids = torch.tensor([[model.start_id] + [i % model.vocab_size for i in range(1, 8)]], device=model.device)
    mask = torch.ones_like(ids)
    logits = model.module(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    mine = torch.nn.functional.linear(model.hidden(ids, mask), model.head_weight, model.head_bias).float()
    return bool(torch.allclose(mine, logits, rtol=1e-2, atol=1e-2 * (1.0 + float(logits.abs().max()))))


def _source_fingerprint(source: str, local: bool, config) -> dict:
    """A Hub model by its commit; a folder by the content of its files (weights, config, tokenizer): names,
    sizes and dates would let weights rewritten in place, at the same size and date, reuse old rows."""
    if not local:
        return {"commit": getattr(config, "_commit_hash", None)}
    folder = Path(source).resolve()
    files = sorted((p.name, _file_digest(p)) for p in folder.iterdir() if p.is_file())
    # blake2b: each file's digest, which audit.json's provenance names the weights by
    return {"path": str(folder), "files": content_digest(files), "blake2b": dict(files)}


def _file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes, read in 1 MiB blocks (weights can be larger than memory)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _memk_checkpoint_folder(path: Path) -> Path | None:
    """The folder holding reference.json and model.pt: path itself, or path/reference."""
    for folder in (path, path / "reference"):
        if (folder / "reference.json").is_file() and (folder / "model.pt").is_file():
            return folder
    return None


def _load_memk(spec: str, folder: Path, device: torch.device, dtype: torch.dtype) -> ScoringModel:
    from ..corpus import EOT, EOT_ID, load_tokenizer
    from ..model import GPT, GPTConfig

    tokenizer_folder = next((f for f in (folder, folder.parent) if (f / "tokenizer.json").is_file()), None)
    if tokenizer_folder is None:
        raise ConfigError(
            f"memk checkpoint {spec}: no tokenizer.json in {folder} or {folder.parent}; audit the output folder of "
            "run-generalization, which holds both"
        )
    try:
        meta = json.loads((folder / "reference.json").read_text())
        module = GPT(GPTConfig(**meta["model"]))
        module.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - missing or damaged: one message naming the folder
        raise ConfigError(f"memk checkpoint {spec}: cannot be read ({_one_line(e)}); run run-generalization again") from None
    tokenizer = load_tokenizer(tokenizer_folder)
    module.to(device=device, dtype=dtype).eval()
    return ScoringModel(
        spec=spec, kind="memk", module=module,
        encode=lambda texts: [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)],
        start_id=EOT_ID, start_token=EOT, context=module.config.seq_len,
        hidden=lambda ids, mask: module.hidden_states(ids),  # causal: right padding never reaches a real token
        head_weight=module.wte.weight, head_bias=None,
        fingerprint={"spec": spec, "kind": "memk", **_source_fingerprint(str(folder), True, None),
                     "tokenizer": _file_digest(tokenizer_folder / "tokenizer.json")},
    )
