"""The whole run configuration as typed dataclasses: defaults, YAML loading, ``key=value`` overrides, validation.

Precedence, lowest first: dataclass defaults < ``--config FILE`` < CLI flags / ``--set section.key=value``.
:func:`validate` reports every problem at once, then the run stops before anything is loaded or written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LoratuneError
from .report_to import report_to_problems

DEFAULT_MODEL = "google/flan-t5-small"
FAMILIES = ("auto", "seq2seq", "causal", "encoder")
MODES = ("score", "generate")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
POOLINGS = ("auto", "mean", "cls")
CHAT_TEMPLATES = ("auto", "on", "off")
CLASS_WEIGHTS = ("none", "auto")
ALL_LINEAR = "all-linear"
"""PEFT's keyword for every linear layer but the output layer (``lora.target_modules``)."""
QUANTIZE = ("none", "int8", "bf16")
# Bounds that keep absurd values from reaching torch/numpy as overflows: far beyond any real run.
MAX_BATCH_SIZE = 1 << 20
MAX_EPOCHS = 1e6
MAX_STEPS = 10**12
MAX_SEED = 2**32 - 1
"""numpy's seed range (set_seed seeds numpy too)."""


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    """Hub id, local directory saved with save_pretrained, or ``tiny`` (random weights, offline smoke tests)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); recorded in the adapter metadata."""
    family: str = "auto"
    """seq2seq | causal | encoder; ``auto`` reads it from the model config."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off by default: it executes arbitrary Python."""
    pooling: str = "auto"
    """Encoders: what the classification head reads. mean: the attention-mask mean of the last hidden states,
    L2-normalised (how sentence embedders like MiniLM were trained); cls: the model's own head ([CLS] pooler),
    loadable by plain transformers. auto: mean for BERT-style encoders, else cls."""


@dataclass
class DataConfig:
    train: str = "data/raw/train.jsonl"
    val: str | None = "data/raw/val.jsonl"
    """Validation file; when empty, a stratified seeded split of ``train`` (``val_fraction``) is used."""
    test: str | None = "data/raw/test.jsonl"
    text_field: str = "text"
    label_field: str = "label"
    id_field: str | None = None
    """Field/column with an example id that ``predict`` passes through; empty: ``id`` when the input has one."""
    labels: list[str] | None = None
    """The label set, in prompt order. Empty: taken from the training data (sorted)."""
    val_fraction: float = 0.1
    multi_label: bool | None = None
    """Examples may carry several labels. Empty: detected from the training data."""
    label_delimiter: str = ","
    """Separates labels inside one CSV cell when ``multi_label`` is on."""
    max_length: int | None = None
    """Most tokens a model reads per example. Empty: the model's own limit (its position table; 512 without
    one). Only the input text is ever cut (its middle, counted); instruction, labels and answer cue never are."""
    max_target_length: int = 32
    input_only: bool | None = None
    """The model reads the input text alone, without the instruction prompt. Empty: yes for encoders (their
    classification head carries the labels), no for language models."""


@dataclass
class PromptConfig:
    task: str = "You are a text classifier."
    """First sentence of the instruction prompt."""
    input_name: str = "text"
    """What one input is called in the prompt (e.g. "customer message"); also names the unit of speed figures."""
    chat_template: str = "auto"
    """Causal LMs: wrap the prompt in the tokenizer's chat template. auto (when it has one) | on | off."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """Module names to adapt; empty picks per architecture (T5: q, v; Llama: q_proj, v_proj; GPT-2: c_attn;
    BERT: query, value); ``all-linear``: every linear layer but the output layer (PEFT's keyword)."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): a learned magnitude per output besides the low-rank
    direction; often closer to full fine-tuning at low rank, a little slower per step."""


@dataclass
class TrainConfig:
    output_dir: str = "outputs/lora"
    """Checkpoints go to OUTPUT_DIR/checkpoints, the best adapter to OUTPUT_DIR/final."""
    epochs: float = 5.0
    max_steps: int = -1
    """Stop after this many optimizer steps (overrides epochs when > 0)."""
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    seed: int = 42
    save_steps: int = 200
    """Checkpoint every N optimizer steps (and at each epoch end) so --resume loses little work."""
    eval_steps: int = 0
    """Evaluate every N steps; 0 evaluates once per epoch."""
    early_stopping_patience: int = 3
    """Stop after this many evaluations without a better validation accuracy; 0 disables."""
    group_by_length: bool = True
    """Batch examples of similar length together so little compute is spent on padding."""
    precision: str = "auto"
    """auto (bf16 on CUDA where supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16."""
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    report_to: str = "none"
    """Where the Trainer also logs: none | tensorboard (OUTPUT_DIR/runs) | wandb | mlflow | any HF Trainer
    integration that is installed; several comma-separated."""
    class_weights: str = "none"
    """auto: weight each example's loss by the inverse frequency of its label (single-label data), so rare
    labels count as much as common ones in total | none."""


@dataclass
class PredictConfig:
    mode: str = "score"
    """score: rank every label by log-likelihood (always a valid label); generate: free greedy decoding."""
    batch_size: int = 32
    max_new_tokens: int = 32
    merge: bool = True
    """Merge LoRA weights into the base for inference (same outputs, less work per token)."""
    threshold: float | None = None
    """Multi-label score mode: predict a label when its probability is >= this. Empty: the adapter's calibrated
    threshold (``loratune calibrate``), else 0.5."""
    allow_empty: bool = False
    """Multi-label score mode: allow no label at all (by default the most probable label is always returned)."""
    min_confidence: float | None = None
    """Single-label: predictions whose top probability is below this become ``fallback_label`` (abstain)."""
    fallback_label: str | None = None
    """The label an abstained prediction gets (e.g. ``oos``); needed by ``min_confidence``."""
    baseline_model: str | None = None
    """``compare``'s frozen-embedding baseline: the embedding model. Empty: the MiniLM of the dev extra."""
    quantize: str = "none"
    """none; int8: dynamic int8 quantization of the merged model's Linear layers; bf16: the merged model in
    bfloat16. CPU only (see quantize.py)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Interface to listen on; 127.0.0.1 keeps the server local, 0.0.0.0 exposes it to the network."""
    port: int = 8000
    max_chars: int = 4000
    """Longest text accepted, in characters after JSON decoding (longer: 422)."""
    max_batch: int = 64
    """Most texts accepted in one request (more: 422)."""
    max_wait_ms: float = 5.0
    """How long a request waits for others to share its forward pass (micro-batching)."""
    max_queue: int = 256
    """Most texts waiting for a forward pass; beyond it requests get a fast 503 with Retry-After."""
    read_timeout_s: float = 15.0
    """A request's headers and body must arrive within this many seconds of its first byte (else 408, closed)."""
    model_process: bool = True
    """Run the model in a child process, so forward passes never hold the server's GIL (docs/SERVING.md)."""
    model_threads: int = 0
    """Threads for forward passes in that process; 0: every core but one, which is left to the event loop."""
    model_nice: int = 0
    """Niceness added to that process (0..19): higher lets the HTTP process refuse overload sooner when cores are short."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise LoratuneError naming the key."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise LoratuneError(f"config key {key} cannot be empty")
    if optional and len(args) == 1:
        hint, origin = args[0], typing.get_origin(args[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise LoratuneError(f"config key {key} must be a list, got {value!r}")
        return [str(v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise LoratuneError(f"config key {key} must be true or false, got {value!r}")
    if hint in (int, float):
        try:
            number = hint(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (hint is int and isinstance(value, float) and not value.is_integer()):
            raise LoratuneError(f"config key {key} must be {'an integer' if hint is int else 'a number'}, got {value!r}")
        return number
    return str(value)


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` on ``cfg`` from a YAML or command-line value, converting its type."""
    section_name, _, key = dotted.partition(".")
    section = getattr(cfg, section_name, None)
    if not key or section is None or not dataclasses.is_dataclass(section):
        sections = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise LoratuneError(f"unknown config key {dotted!r}: use section.key with section one of {sections}")
    hints = _section_types(section)
    if key not in hints:
        known = ", ".join(hints)
        raise LoratuneError(f"unknown config key {dotted!r}: {section_name} has {known}")
    setattr(section, key, _coerce(value, hints[key], dotted))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``overrides`` ({"train.lr": 3e-4, ...}; None values skipped).

    The keys the file or the overrides set are remembered (:func:`explicit_keys`): a model family's own
    defaults (:func:`apply_family_defaults`) never replace a value the user gave."""
    cfg = Config()
    given: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LoratuneError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, OSError) as exc:
            reason = "not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
            raise LoratuneError(f"config file {path}: cannot read it ({reason})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise LoratuneError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise LoratuneError(f"{path}: expected a mapping of sections (model:, data:, ...) at the top level")
        for section_name, values in raw.items():
            if not isinstance(values, dict):
                raise LoratuneError(f"{path}: section {section_name!r} must be a mapping")
            for key, value in values.items():
                set_value(cfg, f"{section_name}.{key}", value)
                given.add(f"{section_name}.{key}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_value(cfg, dotted, value)
            given.add(dotted)
    cfg._given = given  # not a setting: where the settings came from
    return cfg


def explicit_keys(cfg: Config) -> set[str]:
    """The ``section.key`` settings a user chose: given in the config file or on the command line, or (for a
    Config built in Python) holding anything but the dataclass default."""
    given = set(getattr(cfg, "_given", ()))
    defaults = Config()
    for section in dataclasses.fields(cfg):
        for item in dataclasses.fields(getattr(cfg, section.name)):
            if getattr(getattr(cfg, section.name), item.name) != getattr(getattr(defaults, section.name), item.name):
                given.add(f"{section.name}.{item.name}")
    return given


def apply_family_defaults(cfg: Config, defaults: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """A copy of ``cfg`` with a model family's own defaults ({"train.lr": 1e-3, ...}) for every key the user did
    not choose, and the ones applied."""
    chosen = explicit_keys(cfg)
    applied = {key: value for key, value in defaults.items() if key not in chosen}
    if not applied:
        return cfg, {}
    cfg = copy.deepcopy(cfg)
    for key, value in applied.items():
        set_value(cfg, key, value)
    return cfg, applied


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """Parse repeated ``--set section.key=value`` options."""
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoratuneError(f"--set expects section.key=value, got {item!r}")
        result[key.strip()] = value
    return result


def validate(cfg: Config, *, training: bool = False) -> None:
    """Check every setting and raise one LoratuneError listing all problems."""
    problems: list[str] = []
    if cfg.model.family not in FAMILIES:
        problems.append(f"model.family must be one of {', '.join(FAMILIES)} (got {cfg.model.family!r})")
    if not cfg.model.name:
        problems.append("model.name is empty: pass --model HUB_ID_OR_PATH")
    if cfg.data.labels is not None:
        if len(set(cfg.data.labels)) != len(cfg.data.labels):
            problems.append("data.labels has duplicates")
        if cfg.data.labels and len(cfg.data.labels) < 2:
            problems.append("data.labels needs at least two labels")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction must be between 0 and 1 (got {cfg.data.val_fraction})")
    if cfg.data.max_length is not None and cfg.data.max_length < 8:
        problems.append(f"data.max_length must be at least 8 (got {cfg.data.max_length})")
    if cfg.data.max_target_length < 2:
        problems.append(f"data.max_target_length must be at least 2 (got {cfg.data.max_target_length})")
    if cfg.model.pooling not in POOLINGS:
        problems.append(f"model.pooling must be one of {', '.join(POOLINGS)} (got {cfg.model.pooling!r})")
    if cfg.lora.r < 1:
        problems.append(f"lora.r must be >= 1 (got {cfg.lora.r})")
    if cfg.lora.alpha <= 0:
        problems.append(f"lora.alpha must be > 0 (got {cfg.lora.alpha})")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        problems.append(f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    if cfg.prompt.chat_template not in CHAT_TEMPLATES:
        problems.append(f"prompt.chat_template must be one of {', '.join(CHAT_TEMPLATES)} (got {cfg.prompt.chat_template!r})")
    if cfg.predict.mode not in MODES:
        problems.append(f"predict.mode must be one of {', '.join(MODES)} (got {cfg.predict.mode!r})")
    if cfg.predict.quantize not in QUANTIZE:
        problems.append(f"predict.quantize (--quantize) must be one of {', '.join(QUANTIZE)} (got {cfg.predict.quantize!r})")
    elif cfg.predict.quantize != "none" and not cfg.predict.merge:
        problems.append(f"predict.quantize {cfg.predict.quantize} converts the merged model: it needs predict.merge true")
    if not 1 <= cfg.predict.batch_size <= MAX_BATCH_SIZE:
        problems.append(f"predict.batch_size (--batch-size) must be in 1..{MAX_BATCH_SIZE} (got {cfg.predict.batch_size})")
    if not 0 <= cfg.serve.port <= 65535:
        problems.append(f"serve.port must be in 0..65535 (got {cfg.serve.port})")
    if cfg.serve.max_chars < 1:
        problems.append(f"serve.max_chars must be >= 1 (got {cfg.serve.max_chars})")
    if cfg.serve.max_batch < 1:
        problems.append(f"serve.max_batch must be >= 1 (got {cfg.serve.max_batch})")
    if not 0 <= cfg.serve.max_wait_ms <= 1000:
        problems.append(f"serve.max_wait_ms must be in 0..1000 (got {cfg.serve.max_wait_ms})")
    if cfg.predict.min_confidence is not None and not 0.0 <= cfg.predict.min_confidence <= 1.0:
        problems.append(f"predict.min_confidence must be in [0, 1] (got {cfg.predict.min_confidence})")
    if cfg.predict.min_confidence is not None and not cfg.predict.fallback_label:
        problems.append("predict.min_confidence needs predict.fallback_label (the label an abstained prediction gets)")
    if cfg.serve.max_queue < 1:
        problems.append(f"serve.max_queue must be >= 1 (got {cfg.serve.max_queue})")
    if not 0 < cfg.serve.read_timeout_s <= 3600:  # also refuses nan
        problems.append(f"serve.read_timeout_s must be in (0, 3600] seconds (got {cfg.serve.read_timeout_s})")
    if not 0 <= cfg.serve.model_threads <= 1024:
        problems.append(f"serve.model_threads must be in 0..1024, 0 for every core but one (got {cfg.serve.model_threads})")
    if not 0 <= cfg.serve.model_nice <= 19:
        problems.append(f"serve.model_nice must be in 0..19 (got {cfg.serve.model_nice})")
    if cfg.predict.threshold is not None and not 0.0 <= cfg.predict.threshold <= 1.0:
        problems.append(f"predict.threshold must be in [0, 1] (got {cfg.predict.threshold})")
    if not 0 <= cfg.train.seed <= MAX_SEED:  # inspect seeds the val split too
        problems.append(f"train.seed (--seed) must be in 0..{MAX_SEED} (got {cfg.train.seed})")
    if training:
        t = cfg.train
        if not math.isfinite(t.epochs) or t.epochs > MAX_EPOCHS:
            problems.append(f"train.epochs (--epochs) must be a finite number of at most {MAX_EPOCHS:g} (got {t.epochs})")
        elif t.epochs <= 0 and t.max_steps <= 0:
            problems.append("train.epochs must be > 0 (or set train.max_steps)")
        if t.max_steps > MAX_STEPS:
            problems.append(f"train.max_steps (--max-steps) must be at most {MAX_STEPS} (got {t.max_steps})")
        if not 1 <= t.batch_size <= MAX_BATCH_SIZE:
            problems.append(f"train.batch_size (--batch-size) must be in 1..{MAX_BATCH_SIZE} (got {t.batch_size})")
        if t.logging_steps < 1:
            problems.append(f"train.logging_steps must be >= 1 (got {t.logging_steps})")
        if t.grad_accum < 1:
            problems.append(f"train.grad_accum must be >= 1 (got {t.grad_accum})")
        if not 0.0 < t.lr < 1.0:
            problems.append(f"train.lr must be in (0, 1) (got {t.lr})")
        if not 0.0 <= t.warmup_ratio < 1.0:
            problems.append(f"train.warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
        if t.save_steps < 1:
            problems.append(f"train.save_steps must be >= 1 (got {t.save_steps})")
        if t.eval_steps < 0:
            problems.append(f"train.eval_steps must be >= 0 (got {t.eval_steps})")
        if t.precision not in PRECISIONS:
            problems.append(f"train.precision must be one of {', '.join(PRECISIONS)} (got {t.precision!r})")
        if not cfg.data.train:
            problems.append("data.train is empty: pass --train FILE")
        if t.class_weights not in CLASS_WEIGHTS:
            problems.append(f"train.class_weights must be one of {', '.join(CLASS_WEIGHTS)} (got {t.class_weights!r})")
        problems += report_to_problems(t.report_to)
    targets = cfg.lora.target_modules or []
    if ALL_LINEAR in targets and len(targets) > 1:
        problems.append(f"lora.target_modules: {ALL_LINEAR} already means every linear layer; give it alone or list module names")
    if problems:
        raise LoratuneError("invalid configuration: " + "; ".join(problems))
