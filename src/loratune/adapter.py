"""An adapter directory: PEFT's files plus ``loratune.json`` (:class:`AdapterMeta`), and loading it onto a base.

``loratune.json`` is versioned. Format 2 stores the whole :class:`~loratune.prompt.PromptSpec`; format 1
(loratune 0.1) is read and converted. Newer or unknown formats, missing keys and wrong types are refused with
one sentence naming the file, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_text
from .errors import LoratuneError
from .families import FAMILIES, family_class
from .prompt import PromptSpec

META_FILE = "loratune.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", META_FILE)
FORMAT = 2
OMITTED_WHEN_UNSET = ("base_gguf", "threshold", "min_confidence", "fallback_label", "calibration")


@dataclass
class AdapterMeta:
    """What loratune needs to use an adapter the way it was trained (written beside PEFT's files)."""

    base_model: str
    family: str
    spec: PromptSpec
    base_model_requested: str = ""
    base_revision: str | None = None
    base_config_fingerprint: str | None = None
    base_gguf: dict | None = None
    """When the base came from a GGUF file: its sha256 and source (a different file is refused)."""
    lora_target_modules: list = field(default_factory=list)
    lora_modules_to_save: list = field(default_factory=list)
    threshold: float | None = None
    """Multi-label: the calibrated decision threshold."""
    min_confidence: float | None = None
    """Single-label: below this top probability the prediction becomes ``fallback_label`` (abstain)."""
    fallback_label: str | None = None
    calibration: dict | None = None
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created_at: str = ""
    command: str = ""
    """The command line that trained it (empty: the Python API)."""

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    @property
    def multi_label(self) -> bool:
        return self.spec.multi_label

    def to_dict(self) -> dict:
        out = {"format": FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in OMITTED_WHEN_UNSET:
                continue
            out["prompt" if f.name == "spec" else f.name] = value.to_dict() if f.name == "spec" else value
        # Also at the top level, for readers of the plain JSON (checked on read like the rest).
        out["labels"], out["multi_label"], out["max_length"] = self.labels, self.multi_label, self.spec.max_length
        head = head_config(self.family, self.labels)
        if head:  # for transformers + PEFT users: AutoPeftModelForSequenceClassification.from_pretrained(dir, **head)
            out["head"] = head
        return out

    def write(self, adapter_dir: str | Path) -> Path:
        path = Path(adapter_dir) / META_FILE
        write_text(path, json.dumps(self.to_dict(), indent=2, default=str))
        return path

    @classmethod
    def from_dict(cls, data, source: str | Path = META_FILE) -> AdapterMeta:
        """Validate and convert a parsed ``loratune.json``; LoratuneError (one sentence) if anything is off."""

        def bad(problem: str) -> LoratuneError:
            return LoratuneError(f"{source}: {problem}; the adapter metadata is damaged (retrain, or restore the file)")

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        version = data.get("format", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise bad(f"unknown format {version!r}")
        if version > FORMAT:
            raise LoratuneError(
                f"{source}: written by a newer loratune (format {version}, this one reads up to {FORMAT}); upgrade loratune"
            )
        for key, kind in (("base_model", str), ("family", str), ("labels", list), ("prompt", dict)):
            if key not in data:
                raise bad(f"missing key {key!r}")
            if not isinstance(data[key], kind):
                raise bad(f"{key!r} must be a {kind.__name__}, got {type(data[key]).__name__}")
        labels = data["labels"]
        if len(labels) < 2 or not all(_text(x) for x in labels) or len(set(labels)) != len(labels):
            raise bad("'labels' must be a non-empty list of at least two distinct label names")
        if not _text(data["base_model"]):
            raise bad("'base_model' must be a model id or path")
        targets = data.get("lora_target_modules", [])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise bad("'lora_target_modules' must be a list of module names")
        family = data["family"]
        if family not in FAMILIES:
            raise bad(f"unknown family {family!r}")
        spec = _spec(data, labels, family, bad)
        kwargs = {
            f.name: data[f.name] for f in dataclasses.fields(cls) if f.name not in ("base_model", "family", "spec") and f.name in data
        }
        for key in ("threshold", "min_confidence"):
            value = kwargs.get(key)
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value <= 1 or math.isnan(value)):
                raise bad(f"{key!r} must be a number in [0, 1], got {value!r}")
        for key in ("config", "metrics", "data", "versions"):
            if not isinstance(kwargs.get(key, {}), dict):
                kwargs[key] = {}  # informational only: a damaged one is dropped, not fatal
        if not isinstance(kwargs.get("command", ""), str):
            kwargs["command"] = ""
        return cls(base_model=data["base_model"], family=family, spec=spec, **kwargs)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> AdapterMeta:
        """Read and check an adapter directory's metadata and files."""
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise LoratuneError(f"adapter directory {adapter_dir} does not exist")
        missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
        if missing:
            raise LoratuneError(
                f"{adapter_dir} is not a complete loratune adapter (missing {', '.join(missing)}); "
                f"point --adapter at OUTPUT_DIR/final of a finished run"
            )
        data, peft_config = (_read_json(adapter_dir / name) for name in (META_FILE, "adapter_config.json"))
        if not isinstance(peft_config, dict):
            raise LoratuneError(f"{adapter_dir / 'adapter_config.json'}: not a JSON object; the adapter is damaged")
        return cls.from_dict(data, adapter_dir / META_FILE)


def head_config(family: str, labels) -> dict:
    """A classification head's label maps as transformers' config keeps them (num_labels, id2label, label2id), for
    families PEFT loads as SEQ_CLS; {} for the others (their labels are text). PEFT's AutoPeftModel reads only
    adapter_config.json, so these must be passed to it: ``from_pretrained(dir, **head)``."""
    if family_class(family).peft_task_type != "SEQ_CLS":
        return {}
    labels = list(labels)
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}}


def _spec(data: dict, labels: list, family: str, bad) -> PromptSpec:
    prompt = data["prompt"]
    for key in ("task", "input_name"):
        if not _text(prompt.get(key)):
            raise bad(f"prompt.{key} must be a string")
    for value in (data.get("max_length", 384), prompt.get("max_length", 384)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 8:
            raise bad(f"max_length must be an integer >= 8, got {value!r}")
    max_length = prompt.get("max_length", data.get("max_length", 384))
    multi_label = data.get("multi_label", prompt.get("multi_label", False))
    if not isinstance(multi_label, bool):
        raise bad("multi_label must be true or false")
    if data.get("format", 1) == 1:
        # Format 1 kept the chat-template flag in the prompt and added the causal answer cue in code; every
        # family read the full instruction prompt.
        chat = bool(prompt.get("chat_template", False))
        cue = family_class(family).answer_cue(chat)
        return PromptSpec(tuple(labels), prompt["task"], prompt["input_name"], multi_label, max_length, chat, cue, input_only=False)
    try:
        return PromptSpec.from_dict({**prompt, "labels": labels, "multi_label": multi_label, "max_length": max_length})
    except (TypeError, LoratuneError) as exc:
        raise bad(f"prompt is invalid ({exc})") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5000-digit int
        raise LoratuneError(f"{path}: corrupt adapter metadata ({str(exc).splitlines()[0][:200]})") from None


def _text(value) -> bool:
    """A non-empty string of valid Unicode (JSON escapes can carry lone surrogates)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Loading adapters onto a base model.


def load_adapter(adapter_dir: str | Path, base_model: str | None = None, dtype=None, adapter_name: str = "default"):
    """Load base + adapter as its metadata describes. Returns (LoadedModel with a PeftModel, AdapterMeta).

    ``base_model`` overrides the recorded base (e.g. the same model at another path); it must have the same
    architecture, or this raises LoratuneError rather than loading mismatched weights. ``adapter_name`` is
    the adapter's PEFT name (see :func:`load_adapters`).
    """
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from .models import LoadedModel, load_base
    from .quiet import peft_wrap

    adapter_dir = Path(adapter_dir)
    meta = AdapterMeta.read(adapter_dir)
    base_name = base_model or meta.base_model
    if meta.base_gguf:  # a GGUF base is identified by its file's sha256
        from .gguf import adapter_base

        base_name = adapter_base(meta, base_model)
    _check_family(adapter_dir, meta, base_name)
    base = load_base(base_name, revision=meta.base_revision, family=meta.family, dtype=dtype, labels=meta.labels)
    if meta.base_config_fingerprint and meta.base_config_fingerprint != base.config_fingerprint:
        raise LoratuneError(
            f"adapter {adapter_dir} was trained on {meta.base_model!r} but {base_name!r} has a different "
            f"architecture or vocabulary; pass --model with the adapter's base model"
        )
    try:
        with peft_wrap():
            model = PeftModel.from_pretrained(base.model, str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    except (SafetensorError, RuntimeError, ValueError, OSError, KeyError, TypeError) as exc:
        raise LoratuneError(f"cannot load adapter {adapter_dir}: {str(exc).splitlines()[0][:300]}") from None
    tokenizer = _adapter_tokenizer(AutoTokenizer, adapter_dir)  # the tokenizer it was trained with
    family_class(meta.family).prepare_tokenizer(tokenizer, model)
    return LoadedModel(model, tokenizer, base.family, base_name, base.config_fingerprint), meta


def _adapter_tokenizer(auto, adapter_dir: Path):
    try:
        return auto.from_pretrained(str(adapter_dir))
    except Exception as exc:  # tokenizers raise many types on a damaged file; all mean the same to the user
        raise LoratuneError(
            f"cannot load the tokenizer saved with adapter {adapter_dir} (tokenizer.json): "
            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        ) from None


def check_shared_base(metas: Mapping[str, AdapterMeta], base_model: str | None = None) -> None:
    """Raise LoratuneError unless all adapters (name -> metadata) were trained on the same base model.

    Same architecture fingerprint always; same recorded base name too, unless ``base_model`` overrides it.
    """
    (first, first_meta), *rest = metas.items()
    for name, meta in rest:
        if base_model is None and meta.base_model != first_meta.base_model:
            problem = f"different base models ({first_meta.base_model!r} and {meta.base_model!r})"
        elif meta.base_config_fingerprint != first_meta.base_config_fingerprint:
            problem = "base models of different architecture or vocabulary"
        else:
            continue
        raise LoratuneError(
            f"adapters {first!r} and {name!r} were trained on {problem}; adapters served together must share "
            f"one base model, so serve the others from another process"
        )


def load_adapters(adapter_dirs: Mapping[str, str | Path], base_model: str | None = None, dtype=None):
    """Load several adapters onto ONE copy of their shared base model, each under its own PEFT adapter name.

    Returns (PeftModel, {name: (tokenizer, AdapterMeta)}); pick the adapter for a forward pass with
    ``model.set_adapter(name)``. Adapters trained on different base models raise LoratuneError.
    """
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    metas = {name: AdapterMeta.read(path) for name, path in adapter_dirs.items()}
    check_shared_base(metas, base_model)
    (first, first_dir), *rest = adapter_dirs.items()
    loaded, _ = load_adapter(first_dir, base_model=base_model, dtype=dtype, adapter_name=first)
    model, tokenizers = loaded.model, {first: loaded.tokenizer}
    for name, adapter_dir in rest:
        try:
            model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        except (SafetensorError, RuntimeError, ValueError, OSError, KeyError, TypeError) as exc:
            raise LoratuneError(f"cannot load adapter {adapter_dir}: {str(exc).splitlines()[0][:300]}") from None
        tokenizers[name] = _adapter_tokenizer(AutoTokenizer, Path(adapter_dir))
        family_class(metas[name].family).prepare_tokenizer(tokenizers[name], model)
    return model, {name: (tokenizers[name], metas[name]) for name in adapter_dirs}


def _check_family(adapter_dir: Path, meta: AdapterMeta, base_name: str) -> None:
    """Refuse a base of another family before loading weights (the family override the run used counts)."""
    from .families import detect_family
    from .models import load_config

    override = meta.config.get("model", {}).get("family", "auto") if isinstance(meta.config.get("model"), dict) else "auto"
    config, _ = load_config(base_name, meta.base_revision)
    family = detect_family(config, override if isinstance(override, str) else "auto")
    if family != meta.family:
        raise LoratuneError(
            f"adapter {adapter_dir} is a {meta.family} adapter but {base_name!r} is a {family} model; "
            f"pass --model with the adapter's base model ({meta.base_model})"
        )
