"""Load a base model by hub id or local path, detect its family, attach or load a LoRA adapter.

Hub access: a local directory is used as is; a hub id is first looked up in the local cache, and only then
fetched. When the hub cannot be reached we fail in seconds with one sentence naming the model, instead of
waiting through the hub client's retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import LoratuneError
from .fixtures import TINY_NAMES, TINY_WARNING, tiny_model

log = logging.getLogger(__name__)

META_FILE = "loratune.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)
SUPPORTED_FAMILIES = ("seq2seq", "causal", "encoder")
HEAD_SEED = 0


def _offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unreachable(name: str, reason: str) -> LoratuneError:
    return LoratuneError(
        f"cannot load model {name!r}: {reason} and it is not in the local cache; pass --model with a local "
        f"directory saved by save_pretrained (or --model tiny for an offline smoke test)"
    )


def resolve_model_name(name: str, texts=(), labels=None) -> str:
    """Turn ``tiny`` (``tiny-causal``, ``tiny-encoder``) into the cached tiny model's directory (built on first
    use); other names pass through."""
    if name not in TINY_NAMES:
        return name
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per torchrun process
        print(f"WARNING: {TINY_WARNING}", file=sys.stderr)
    kwargs = {"labels": labels} if labels else {}
    return str(tiny_model(texts, family=TINY_NAMES[name], **kwargs))


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """Load a model config, deciding once whether the hub is needed. Returns (config, local_files_only)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.exists():
            raise LoratuneError(f"{name} does not exist: pass a model directory saved by save_pretrained, "
                                f"an adapter directory, or a hub id")
        if not (path / "config.json").is_file():
            hint = f"; did you mean {path / 'model'}?" if (path / "model" / "config.json").is_file() else ""
            raise LoratuneError(f"model directory {name} has no config.json (save it with save_pretrained){hint}")
        try:
            return AutoConfig.from_pretrained(str(path), **kwargs), True
        except (OSError, ValueError) as exc:
            raise LoratuneError(f"cannot read model config in {name}: {str(exc).splitlines()[0]}") from None
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs), True
    except (OSError, ValueError):
        pass
    if _offline():
        raise _unreachable(name, "HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise _unreachable(name, "the Hugging Face Hub cannot be reached")
    try:
        return AutoConfig.from_pretrained(name, **kwargs), False
    except (OSError, ValueError) as exc:
        raise LoratuneError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None


def detect_family(config, override: str = "auto") -> str:
    """seq2seq for encoder-decoders, causal for decoder-only LMs, encoder otherwise (unless overridden)."""
    if override and override != "auto":
        return override
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    if architectures:
        return "encoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    return "encoder"


def config_fingerprint(config) -> str:
    """A hash of the architecture-defining config values, to tell whether an adapter fits a base model."""
    keep = {k: v for k, v in config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                         "use_cache", "task_specific_params", "id2label", "label2id", "_commit_hash")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    family: str
    name: str
    config_fingerprint: str


def load_base(name: str, *, revision: str | None = None, family: str = "auto",
              trust_remote_code: bool = False, dtype=None, labels=None) -> LoadedModel:
    """Load the base model and tokenizer by hub id or local path.

    Encoders get a new classification head with one output per label in ``labels``, always initialised
    from HEAD_SEED: the base encoder alone is then exactly the starting point of every adapter trained on
    it, so ``compare`` shows what training changed (the base alone predicts at chance).
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    config, local_only = load_config(name, revision, trust_remote_code)
    family = detect_family(config, family)
    if family not in SUPPORTED_FAMILIES:
        raise LoratuneError(f"model.family must be one of {', '.join(SUPPORTED_FAMILIES)}, got {family!r}")
    fingerprint = config_fingerprint(config)  # before the head or pad token change the config
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only)
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if family == "seq2seq":
        model = AutoModelForSeq2SeqLM.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    elif family == "causal":
        model = _load_causal(source, name, config, tokenizer, dtype, kwargs)
    else:
        model = _load_encoder(source, name, config, tokenizer, dtype, kwargs, labels)
    use_fused_gelu(model)
    return LoadedModel(model, tokenizer, family, name, fingerprint)


def _load_causal(source, name, config, tokenizer, dtype, kwargs):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    except ValueError as exc:
        raise LoratuneError(f"cannot load {name!r} as a causal LM: {str(exc).splitlines()[0][:300]} "
                            f"(pass --family to override detection)") from None
    prepare_causal_tokenizer(tokenizer, model)
    return model


def prepare_causal_tokenizer(tokenizer, model) -> None:
    """Left padding (batched inference) and a pad token; many causal LMs (Llama, GPT-2) ship without one."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise LoratuneError("the tokenizer has neither a pad nor an EOS token; loratune needs an EOS token "
                                "to end labels")
        # Reuse EOS rather than add a token: a new token would resize the embeddings, and the adapter would
        # then no longer fit the base model. Label EOS tokens stay in the loss (the collator never masks by id).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _load_encoder(source, name, config, tokenizer, dtype, kwargs, labels):
    import torch
    from transformers import AutoModelForSequenceClassification

    if not labels:
        raise LoratuneError(f"{name!r} is an encoder: it needs the label set to size its classification head")
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    if tokenizer.pad_token_id is None:
        raise LoratuneError(f"the tokenizer of {name!r} has no pad token; encoder models need one for batching")
    config.pad_token_id = tokenizer.pad_token_id
    try:
        # The head is new (random); a private RNG makes it reproducible without touching the caller's seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            return AutoModelForSequenceClassification.from_pretrained(source, config=config, dtype=dtype, **kwargs)
    except ValueError as exc:
        raise LoratuneError(f"cannot load {name!r} as an encoder classifier "
                            f"(AutoModelForSequenceClassification): {str(exc).splitlines()[0][:300]}") from None


def use_fused_gelu(model) -> None:
    """Swap transformers' Python tanh-GELU (``gelu_new``) for PyTorch's fused kernel of the same formula.

    flan-t5's gated-GELU feed-forward uses ``gelu_new``: eight elementwise passes over the widest activations.
    The fused kernel gives the same values to float rounding (~1e-6) and makes the whole forward and
    backward faster on CPU (docs/BENCHMARKS.md).
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def attach_lora(model, family: str, r: int, alpha: int, dropout: float, target_modules=None):
    """Wrap ``model`` with a fresh LoRA adapter; only the LoRA weights stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = {"seq2seq": TaskType.SEQ_2_SEQ_LM, "causal": TaskType.CAUSAL_LM, "encoder": TaskType.SEQ_CLS}[family]
    # target_modules=None lets PEFT pick its per-architecture default (T5: q, v; Llama: q_proj, v_proj;
    # GPT-2: c_attn; BERT: query, value). SEQ_CLS also puts the new head in modules_to_save, so it is
    # trained in full and saved with the adapter.
    config = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules) if target_modules else None)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise LoratuneError(f"lora.target_modules={','.join(target_modules or [])}: {str(exc).splitlines()[0][:200]}") from None


def read_metadata(adapter_dir: str | Path) -> dict:
    """Read and check ``loratune.json`` and the adapter files; raise LoratuneError if anything is off."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoratuneError(f"adapter directory {adapter_dir} does not exist")
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise LoratuneError(
            f"{adapter_dir} is not a complete loratune adapter (missing {', '.join(missing)}); "
            f"point --adapter at OUTPUT_DIR/final of a finished run"
        )
    for name in (META_FILE, "adapter_config.json"):
        try:
            value = json.loads((adapter_dir / name).read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OSError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5000-digit int
            raise LoratuneError(f"{adapter_dir / name}: corrupt adapter metadata ({str(exc).splitlines()[0][:200]})") from None
        if name == META_FILE:
            meta = value
        elif not isinstance(value, dict):
            raise LoratuneError(f"{adapter_dir / name}: expected a JSON object (a PEFT LoRA config), got "
                                f"{type(value).__name__}; the adapter is damaged")
    from .adapter_meta_checks import validate_meta

    validate_meta(meta, adapter_dir / META_FILE)
    return meta


def load_adapter(adapter_dir: str | Path, base_model: str | None = None, dtype=None, adapter_name: str = "default"):
    """Load base + adapter as described by the adapter's metadata. Returns (LoadedModel with PeftModel, meta).

    ``base_model`` overrides the recorded base (e.g. the same model at another path); it must have the same
    architecture, or this raises LoratuneError rather than loading mismatched weights. ``adapter_name`` is
    the adapter's PEFT name (see :func:`load_adapters`).
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    adapter_dir = Path(adapter_dir)
    meta = read_metadata(adapter_dir)
    base_name = base_model or meta["base_model"]
    _check_family(adapter_dir, meta, base_name)
    base = load_base(base_name, revision=meta.get("base_revision"), family=meta["family"], dtype=dtype,
                     labels=meta["labels"])
    expected = meta.get("base_config_fingerprint")
    if expected and expected != base.config_fingerprint:
        raise LoratuneError(
            f"adapter {adapter_dir} was trained on {meta['base_model']!r} but {base_name!r} has a different "
            f"architecture or vocabulary; pass --model with the adapter's base model"
        )
    try:
        model = PeftModel.from_pretrained(base.model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    except (SafetensorError, RuntimeError, ValueError, OSError, KeyError) as exc:
        raise LoratuneError(f"cannot load adapter {adapter_dir}: {str(exc).splitlines()[0][:300]}") from None
    tokenizer = _adapter_tokenizer(adapter_dir)  # the one it was trained with
    if base.family == "causal":
        prepare_causal_tokenizer(tokenizer, model)
    return LoadedModel(model, tokenizer, base.family, base_name, base.config_fingerprint), meta


def _adapter_tokenizer(adapter_dir: Path):
    """The tokenizer saved with an adapter; a damaged one (e.g. truncated tokenizer.json) is one sentence."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(adapter_dir))
    except Exception as exc:  # the Rust tokenizers library raises plain Exception on a corrupt tokenizer.json
        raise LoratuneError(f"cannot load the tokenizer saved with adapter {adapter_dir} (tokenizer.json): "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def check_shared_base(metas: Mapping[str, dict], base_model: str | None = None) -> None:
    """Raise LoratuneError unless all adapters (name -> metadata) were trained on the same base model.

    Same architecture fingerprint always; same recorded base name too, unless ``base_model`` overrides it.
    """
    (first, first_meta), *rest = metas.items()
    for name, meta in rest:
        if base_model is None and meta["base_model"] != first_meta["base_model"]:
            problem = f"different base models ({first_meta['base_model']!r} and {meta['base_model']!r})"
        elif meta.get("base_config_fingerprint") != first_meta.get("base_config_fingerprint"):
            problem = "base models of different architecture or vocabulary"
        else:
            continue
        raise LoratuneError(
            f"adapters {first!r} and {name!r} were trained on {problem}; adapters served together must share "
            f"one base model, so serve the others from another process"
        )


def load_adapters(adapter_dirs: Mapping[str, str | Path], base_model: str | None = None, dtype=None):
    """Load several adapters onto ONE copy of their shared base model, each under its own PEFT adapter name.

    Returns (PeftModel, {name: (tokenizer, meta)}); pick the adapter for a forward pass with
    ``model.set_adapter(name)``. Adapters trained on different base models raise LoratuneError.
    """
    from safetensors import SafetensorError

    metas = {name: read_metadata(path) for name, path in adapter_dirs.items()}
    check_shared_base(metas, base_model)
    (first, first_dir), *rest = adapter_dirs.items()
    loaded, _ = load_adapter(first_dir, base_model=base_model, dtype=dtype, adapter_name=first)
    model, tokenizers = loaded.model, {first: loaded.tokenizer}
    for name, adapter_dir in rest:
        try:
            model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        except (SafetensorError, RuntimeError, ValueError, OSError, KeyError) as exc:
            raise LoratuneError(f"cannot load adapter {adapter_dir}: {str(exc).splitlines()[0][:300]}") from None
        tokenizers[name] = _adapter_tokenizer(Path(adapter_dir))
    return model, {name: (tokenizers[name], metas[name]) for name in adapter_dirs}
def _check_family(adapter_dir: Path, meta: dict, base_name: str) -> None:
    """Refuse a base of another family before loading weights (the family override the run used counts)."""
    if meta["family"] not in SUPPORTED_FAMILIES:
        raise LoratuneError(f"{adapter_dir / META_FILE}: unknown family {meta['family']!r}")
    override = meta.get("config", {}).get("model", {}).get("family", "auto")
    config, _ = load_config(base_name, meta.get("base_revision"))
    family = detect_family(config, override)
    if family != meta["family"]:
        raise LoratuneError(
            f"adapter {adapter_dir} is a {meta['family']} adapter but {base_name!r} is a {family} model; "
            f"pass --model with the adapter's base model ({meta['base_model']})"
        )
