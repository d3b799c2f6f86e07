"""The Classifier: raw text in, label out, through a model family and its prompt spec.

Two decoding modes:

* ``score`` (rank classification, the default): every label's full token sequence (with EOS) is scored by
  its summed log-probability given the prompt; probabilities are a softmax over those sums. Sums are not
  length-normalised on purpose: the EOS term already tells a label apart from a longer label it prefixes,
  and normalising would favour long labels whose later tokens are nearly free. The answer is always a label,
  unless ``min_confidence`` is set: then a top probability below it gives ``fallback_label`` (abstain).
  Encoders have a classification head, whose log-softmax is the score.
* ``generate``: greedy decoding; the raw text is mapped to a label when it matches one (case- and
  space-insensitive), else ``invalid``. This shows what the model actually says, e.g. a base model echoing
  the input. Not applicable to encoders.

Multi-label classifiers (trained to output every label that applies, comma-separated, in label-set order):

* ``score``: each label gets its own probability, ``P(label is in the answer)``: every non-empty label set,
  written in its one canonical form, is scored as above, a softmax over the sets gives the model's
  distribution over answers, and a label's probability is the summed probability of the sets that hold it.
  A label is predicted when its probability is >= ``threshold`` (0.5 by default; ``loratune calibrate``
  tunes it); if none reaches it, the most probable label is returned unless ``allow_empty``. The cost is
  2^L - 1 sequences per text, so score mode allows at most ``MAX_SCORED_LABELS`` labels.
* ``generate``: the output is split on commas; pieces that match a label are kept (in label-set order), the
  others are listed in ``Prediction.unknown``. No matching piece at all is ``invalid``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import META_FILE, AdapterMeta, load_adapter
from .config import Config, PredictConfig
from .data import clean_label, normalize_label, spelled_as
from .errors import LoratuneError
from .families import Family, family_class
from .families.common import GENERATE_NOT_FOR_ENCODERS, MULTI_LABEL_SEQ2SEQ_ONLY, softmax
from .models import load_base, prompt_spec, resolve_model_name
from .prompt import LABEL_SEPARATOR, MAX_SCORED_LABELS, PromptSpec, format_target, label_sets
from .quantize import int8_device, reduce_precision

INVALID = "invalid"
DEFAULT_THRESHOLD = 0.5

__all__ = [
    "DEFAULT_THRESHOLD",
    "GENERATE_NOT_FOR_ENCODERS",
    "INVALID",
    "MAX_SCORED_LABELS",
    "MULTI_LABEL_SEQ2SEQ_ONLY",
    "Classifier",
    "Prediction",
    "classifier_from_config",
    "decide_labels",
    "label_sets",
]


@dataclass
class Prediction:
    label: str
    """A label from the label set; ``invalid`` (generate mode) when the output matches none; the fallback label
    when the classifier abstained. Multi-label: the predicted labels joined as the model writes them."""
    scores: dict[str, float] | None
    """Probability per label (score mode); None in generate mode. Multi-label: independent, need not sum to 1."""
    raw: str | None = None
    """The generated text (generate mode)."""
    labels: list[str] | None = None
    """Multi-label only: the predicted labels in label-set order."""
    unknown: list[str] | None = None
    """Multi-label generate mode: pieces of the output that matched no label (dropped)."""
    cut: int = 0
    """Tokens cut from the middle of the input text to fit the model's budget (0: the whole text was read)."""

    def to_dict(self) -> dict:
        out = {"label": self.label, "scores": self.scores, "raw": self.raw, "cut_tokens": self.cut}
        if self.labels is not None:
            out.update(labels=self.labels, unknown=self.unknown)
        return out


def pick_device(device: str | None = None):
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(device):
    """bf16 on CUDA GPUs that support it (T5 overflows in fp16), else the checkpoint's own dtype."""
    import torch

    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def decide_labels(probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD, allow_empty: bool = False) -> np.ndarray:
    """Multi-label decisions, an (N, L) bool array: probability >= threshold; else the top label unless allow_empty."""
    chosen = probs >= threshold
    if not allow_empty and len(probs):
        empty = ~chosen.any(axis=1)
        chosen[empty, probs[empty].argmax(axis=1)] = True
    return chosen


class Classifier:
    """Classify text with a base model or base + LoRA adapter.

    >>> clf = Classifier.from_pretrained("outputs/lora/final")
    >>> clf.predict("I was charged twice")[0].label
    """

    def __init__(
        self, family: Family, settings: PredictConfig | None = None, *, meta: AdapterMeta | None = None, name: str = "", **overrides
    ):
        """``settings`` (mode, batch_size, threshold, ...; ``overrides`` replace single fields); ``meta``: the
        adapter's metadata, whose calibrated threshold / abstain settings apply unless ``settings`` set them."""
        settings = dataclasses.replace(settings or PredictConfig(), **overrides)
        if meta is not None:
            settings = dataclasses.replace(
                settings,
                threshold=settings.threshold if settings.threshold is not None else meta.threshold,
                min_confidence=settings.min_confidence if settings.min_confidence is not None else meta.min_confidence,
                fallback_label=settings.fallback_label or meta.fallback_label,
            )
        if settings.mode not in ("score", "generate"):
            raise LoratuneError(f"--mode must be score or generate, got {settings.mode!r}")
        family.check(settings.mode)
        self.family, self.meta, self.name = family, meta, name
        self._normalized = spelled_as(self.labels)
        if settings.fallback_label is not None:  # "OOS" is the label set's "oos", as labels compare
            fallback = self._normalized.get(normalize_label(settings.fallback_label))
            if fallback is None:
                raise LoratuneError(
                    f"--fallback-label {settings.fallback_label!r} is not one of the labels "
                    f"({', '.join(self.labels[:8])}{', ...' if len(self.labels) > 8 else ''})"
                )
            settings = dataclasses.replace(settings, fallback_label=fallback)
        self.settings = settings

    # -- what it is --------------------------------------------------------------------------------------
    @property
    def spec(self) -> PromptSpec:
        return self.family.spec

    @property
    def quantize(self) -> str:
        """none, int8 or bf16: what the model runs in (``serve.worker.ClassifierInfo`` carries the same)."""
        return self.settings.quantize

    @property
    def labels(self) -> list[str]:
        return list(self.family.spec.labels)

    @property
    def multi_label(self) -> bool:
        return self.family.spec.multi_label

    @property
    def model(self):
        return self.family.model

    @property
    def tokenizer(self):
        return self.family.tokenizer

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def threshold(self) -> float:
        return DEFAULT_THRESHOLD if self.settings.threshold is None else self.settings.threshold

    @property
    def device(self):
        return self.family.device

    def format(self, text: str) -> str:
        """The canonical prompt for ``text`` (before a chat template or answer cue)."""
        return self.spec.format(text)

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None, **options) -> Classifier:
        """An adapter directory (with ``loratune.json``), or a base model by hub id, path or ``tiny``.

        ``options``: any ``predict`` setting (mode, batch_size, threshold, allow_empty, merge, quantize, min_confidence,
        fallback_label, max_new_tokens); for a base model also labels, task, input_name, multi_label,
        chat_template, max_length, input_only and revision; ``base_model`` loads an adapter onto another copy of
        its base. For an adapter the prompt comes from its metadata and must not disagree with it.
        """
        where = {
            "labels": "data",
            "multi_label": "data",
            "max_length": "data",
            "input_only": "data",
            "task": "prompt",
            "input_name": "prompt",
            "chat_template": "prompt",
            "revision": "model",
        }
        cfg, base_model = Config(), options.pop("base_model", None)
        for key, value in options.items():
            section = where.get(key, "predict")
            if not hasattr(getattr(cfg, section), key):
                raise TypeError(f"from_pretrained() got an unexpected option {key!r}")
            setattr(getattr(cfg, section), key, list(value) if key == "labels" and value is not None else value)
        if (Path(path) / META_FILE).is_file():
            return classifier_from_config(cfg, adapter=path, base_override=base_model, device=device)
        cfg.model.name = str(path)
        return classifier_from_config(cfg, device=device)

    # -- prediction ----------------------------------------------------------------------------------------
    def predict(self, texts: str | Iterable[str], mode: str | None = None, progress=None) -> list[Prediction]:
        """Classify raw text(s)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        mode = mode or self.mode
        self.family.check(mode)
        if not texts:
            return []
        cut = self.family.prompt_ids(texts).cut
        if self.multi_label:
            predictions = self._predict_multi_label(texts, mode, progress)
        elif mode == "score":
            predictions = self._predict_scores(texts, progress)
        else:
            raws = self.family.generate(texts, self.batch_size, self.settings.max_new_tokens, progress)
            predictions = [Prediction(self._to_label(raw), None, raw) for raw in raws]
        for p, c in zip(predictions, cut):
            p.cut = c
        return predictions

    def _predict_scores(self, texts, progress) -> list[Prediction]:
        probs = self.predict_proba(texts, progress=progress)
        floor, fallback = self.settings.min_confidence, self.settings.fallback_label
        out = []
        for row in probs:
            label = self.labels[int(row.argmax())]
            if floor is not None and fallback is not None and row.max() < floor:
                label = fallback
            out.append(Prediction(label, {name: float(p) for name, p in zip(self.labels, row)}))
        return out

    def _predict_multi_label(self, texts, mode: str, progress) -> list[Prediction]:
        if mode == "score":
            probs = self.predict_proba(texts, progress=progress)
            chosen = decide_labels(probs, self.threshold, self.settings.allow_empty)
            out = []
            for row, picks in zip(probs, chosen):
                labels = [label for label, pick in zip(self.labels, picks) if pick]
                out.append(
                    Prediction(format_target(labels, self.labels), {label: float(p) for label, p in zip(self.labels, row)}, labels=labels)
                )
            return out
        out = []
        for raw in self.family.generate(texts, self.batch_size, self.settings.max_new_tokens, progress):
            labels, unknown = self.parse_labels(raw)
            out.append(Prediction(format_target(labels, self.labels) if labels else INVALID, None, raw, labels=labels, unknown=unknown))
        return out

    def _to_label(self, raw: str) -> str:
        return self._normalized.get(normalize_label(raw), INVALID)

    def parse_labels(self, raw: str) -> tuple[list[str], list[str]]:
        """A generated comma list as (known labels in label-set order, unknown pieces in output order)."""
        known, unknown = set(), []
        for piece in raw.split(LABEL_SEPARATOR.strip()):
            if not piece.strip():
                continue
            label = self._normalized.get(normalize_label(piece))
            if label is None:
                unknown.append(piece.strip())
            else:
                known.add(label)
        return [label for label in self.labels if label in known], unknown

    def predict_proba(self, texts: str | Iterable[str], progress=None) -> np.ndarray:
        """Probability of each label (columns in ``labels`` order): rows sum to 1 (multi-label: need not)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.zeros((0, len(self.labels)))
        if self.multi_label:
            return self.family.label_marginals(texts, self.batch_size, progress)
        return softmax(self.score(texts, progress=progress))

    def score(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """Summed label log-likelihoods, an (N, L) array."""
        if not texts:
            return np.zeros((0, len(self.labels)))
        return self.family.label_logprobs(list(texts), self.batch_size, progress)


# --------------------------------------------------------------------------------------------------
# The one way from a configuration to a classifier (CLI, server, compare, demo).


def classifier_from_config(
    cfg: Config, adapter: str | Path | None = None, *, base_override: str | None = None, device: str | None = None, base_only: bool = False
) -> Classifier:
    """A Classifier for ``adapter`` (its base from its metadata unless ``base_override``), or for ``cfg.model.name``.

    ``base_only``: the adapter's base model prompted alone, reading exactly the adapter's prompt spec (what
    ``compare`` measures the adapter against). ``cfg.predict`` settings apply in every case.
    """
    quantize = cfg.predict.quantize
    dev = pick_device(int8_device(quantize, device))
    dtype = inference_dtype(dev)
    if adapter is None:
        return _quantized(_base_classifier(cfg, dev, dtype), quantize)
    meta = AdapterMeta.read(adapter)
    _check_flags_match(cfg, meta, adapter)
    if base_only:
        base = load_base(base_override or meta.base_model, revision=meta.base_revision, family=meta.family, dtype=dtype, labels=meta.labels)
        family = family_class(meta.family)(base.model.to(dev).eval(), base.tokenizer, meta.spec)
        return _quantized(Classifier(family, cfg.predict, name=f"{base_override or meta.base_model}"), quantize)
    loaded, meta = load_adapter(adapter, base_model=base_override, dtype=dtype)
    model = loaded.model
    if cfg.predict.merge:
        with warnings.catch_warnings():
            # PEFT warns that embeddings are "no longer tied" even for untied models like T5.
            warnings.filterwarnings("ignore", message=".*no longer tied.*")
            model = model.merge_and_unload()
    family = family_class(meta.family)(model.to(dev).eval(), loaded.tokenizer, meta.spec)
    return _quantized(Classifier(family, cfg.predict, meta=meta, name=str(adapter)), quantize)


def _quantized(clf: Classifier, quantize: str) -> Classifier:
    """The classifier with its (merged) model quantized in place when ``predict.quantize`` asks for it."""
    if quantize != "none":
        reduce_precision(clf.model, quantize)
        clf.family.invalidate()
    return clf


def _check_flags_match(cfg: Config, meta: AdapterMeta, adapter) -> None:
    if cfg.data.labels and [normalize_label(x) for x in cfg.data.labels] != [normalize_label(x) for x in meta.labels]:
        raise LoratuneError(
            f"adapter {adapter} was trained on labels {', '.join(meta.labels[:10])}"
            f"{', ...' if len(meta.labels) > 10 else ''}; --labels {', '.join(cfg.data.labels[:10])} "
            f"does not match (drop --labels: an adapter knows its labels)"
        )
    if cfg.data.multi_label is not None and cfg.data.multi_label != meta.multi_label:
        kind = "multi-label" if meta.multi_label else "single-label"
        raise LoratuneError(f"adapter {adapter} is {kind}; --multi-label does not match")


def _base_classifier(cfg: Config, dev, dtype) -> Classifier:
    labels = [clean_label(x) for x in cfg.data.labels or ()]
    name = resolve_model_name(cfg.model.name, labels=labels or None)  # a missing model is the first thing to say
    if not labels:
        raise LoratuneError(
            "a base model prompted alone needs the label set: pass --labels a,b,c (or --adapter DIR, which knows its labels)"
        )
    base = load_base(name, revision=cfg.model.revision, family=cfg.model.family, dtype=dtype, labels=labels)
    family_cls = family_class(base.family)
    spec = prompt_spec(cfg, family_cls, base.tokenizer, labels, cfg.data.multi_label, base.model.config)
    return Classifier(family_cls(base.model.to(dev).eval(), base.tokenizer, spec), cfg.predict, name=cfg.model.name)
