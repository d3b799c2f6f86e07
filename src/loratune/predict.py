"""The Classifier: raw text in, label out, through the canonical prompt. Used by the CLI, evaluation and server.

Two decoding modes:

* ``score`` (rank classification, the default): every label's full token sequence (with EOS) is scored by
  its summed log-probability given the prompt; probabilities are a softmax over those sums. Sums are not
  length-normalised on purpose: the EOS term already tells a label apart from a longer label it prefixes,
  and normalising would favour long labels whose later tokens are nearly free. The answer is always a label.
* ``generate``: greedy decoding; the raw text is mapped to a label when it matches one (case- and
  space-insensitive), else ``invalid``. This shows what the model actually says, e.g. a base model echoing
  the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import normalize_label
from .errors import LoratuneError
from .models import META_FILE, load_adapter, load_base, resolve_model_name
from .prompt import DEFAULT_INPUT_NAME, DEFAULT_LABELS, DEFAULT_TASK, format_example

INVALID = "invalid"


@dataclass
class Prediction:
    label: str
    """A label from the label set, or ``invalid`` (generate mode only) when the output matches none."""
    scores: dict[str, float] | None
    """Probability per label (score mode); None in generate mode."""
    raw: str | None = None
    """The generated text (generate mode)."""

    def to_dict(self) -> dict:
        return {"label": self.label, "scores": self.scores, "raw": self.raw}


def pick_device(device: str | None = None):
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding costs little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    ids = tokenizer(list(labels))["input_ids"]
    if len({tuple(x) for x in ids}) != len(ids):
        raise LoratuneError("two labels tokenize to the same token ids; rename one of them")
    return ids


def seq2seq_label_logprobs(model, tokenizer, prompts: Sequence[str], labels: Sequence[str],
                           batch_size: int = 32, max_length: int = 384, progress=None) -> np.ndarray:
    """Summed log-probability of each label's tokens (with EOS) given each prompt: an (N, L) array.

    T5-family models use the fast scorer (:mod:`loratune.scoring`: encoder once per prompt, label prefix tree,
    vocabulary projection only where a label token is scored); other models the reference implementation.
    """
    from .scoring import T5LabelScorer, supports_fast_scoring

    if not supports_fast_scoring(model):
        return seq2seq_label_logprobs_reference(model, tokenizer, prompts, labels, batch_size, max_length, progress)
    scorer = T5LabelScorer(model, label_token_ids(tokenizer, labels))
    return _score_batches(scorer.score, model, tokenizer, prompts, len(labels), batch_size, max_length, progress)


def seq2seq_label_logprobs_reference(model, tokenizer, prompts: Sequence[str], labels: Sequence[str],
                                     batch_size: int = 32, max_length: int = 384, progress=None) -> np.ndarray:
    """The same scores computed plainly: every (prompt, label) pair through the whole decoder, a full-vocabulary
    log-softmax at every label position. Slow; the reference the fast scorer is tested and benchmarked against.
    """
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    device = next(model.parameters()).device
    label_ids = label_token_ids(tokenizer, labels)
    n_labels, width = len(label_ids), max(len(x) for x in label_ids)
    pad = tokenizer.pad_token_id
    targets = torch.full((n_labels, width), pad, dtype=torch.long)
    for i, ids in enumerate(label_ids):
        targets[i, : len(ids)] = torch.tensor(ids)
    target_mask = torch.arange(width) < torch.tensor([len(x) for x in label_ids])[:, None]
    start = model.config.decoder_start_token_id
    decoder_inputs = torch.cat([torch.full((n_labels, 1), start, dtype=torch.long), targets[:, :-1]], dim=1)
    targets, target_mask, decoder_inputs = targets.to(device), target_mask.to(device), decoder_inputs.to(device)
    encoder = model.get_encoder()

    def score(input_ids, attention_mask):
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        b = len(input_ids)
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n_labels, 0)),
            attention_mask=attention_mask.repeat_interleave(n_labels, 0),
            decoder_input_ids=decoder_inputs.repeat(b, 1),
        ).logits
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        logp = logp.gather(-1, targets.repeat(b, 1).unsqueeze(-1)).squeeze(-1)
        return (logp * target_mask.repeat(b, 1)).sum(-1).view(b, n_labels)

    return _score_batches(score, model, tokenizer, prompts, n_labels, batch_size, max_length, progress)


def _score_batches(score, model, tokenizer, prompts: Sequence[str], n_labels: int, batch_size: int,
                   max_length: int, progress=None) -> np.ndarray:
    """Tokenize, batch by length, and call ``score(input_ids, attention_mask) -> (B, L)`` on each batch."""
    import torch

    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), truncation=True, max_length=max_length)["input_ids"]
    out = np.zeros((len(prompts), n_labels), dtype=np.float64)
    with torch.inference_mode():
        for batch in _batches_by_length([len(x) for x in encoded], batch_size):
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            out[batch] = score(inputs["input_ids"], inputs["attention_mask"]).double().cpu().numpy()
            if progress is not None:
                progress(len(batch))
    return out


def generate_texts(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, max_length: int = 384,
                   max_new_tokens: int = 32, progress=None) -> list[str]:
    """Greedy generation for each prompt, batched by length; returns the decoded text."""
    import torch

    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), truncation=True, max_length=max_length)["input_ids"]
    texts: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for batch in _batches_by_length([len(x) for x in encoded], batch_size):
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            for i, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                texts[i] = text.strip()
            if progress is not None:
                progress(len(batch))
    return texts


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Classifier:
    """Classify text with a base model or base + LoRA adapter, through the canonical prompt.

    >>> clf = Classifier.from_pretrained("outputs/lora/final")
    >>> clf.predict("I was charged twice")[0].label
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], *, family: str = "seq2seq",
                 task: str = DEFAULT_TASK, input_name: str = DEFAULT_INPUT_NAME, multi_label: bool = False,
                 mode: str = "score", batch_size: int = 32, max_length: int = 384, max_new_tokens: int = 32,
                 metadata: dict | None = None, name: str = ""):
        if mode not in ("score", "generate"):
            raise LoratuneError(f"--mode must be score or generate, got {mode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.family = family
        self.task = task
        self.input_name = input_name
        self.multi_label = multi_label
        self.mode = mode
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.metadata = metadata or {}
        self.name = name
        self.id2label = dict(enumerate(self.labels))
        self.label2id = {label: i for i, label in self.id2label.items()}
        self._normalized = {normalize_label(label): label for label in self.labels}

    @classmethod
    def from_pretrained(cls, path: str | Path, *, mode: str = "score", labels: Sequence[str] | None = None,
                        task: str | None = None, input_name: str | None = None, base_model: str | None = None,
                        device: str | None = None, merge: bool = True, batch_size: int = 32,
                        max_new_tokens: int = 32, revision: str | None = None) -> Classifier:
        """Load an adapter directory (with ``loratune.json``), or a base model by hub id, path or ``tiny``.

        For a base model, ``labels``/``task``/``input_name`` set the prompt (defaults: the support-ticket
        prompt). For an adapter they come from its metadata and must not disagree with it.
        """
        import torch

        dev = pick_device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
        path_str = str(path)
        if (Path(path_str) / META_FILE).is_file():
            loaded, meta = load_adapter(path_str, base_model=base_model, dtype=dtype)
            if labels is not None and [normalize_label(x) for x in labels] != meta["labels"]:
                raise LoratuneError(
                    f"adapter {path_str} was trained on labels {', '.join(meta['labels'])}; "
                    f"--labels {', '.join(labels)} does not match"
                )
            if merge:
                with warnings.catch_warnings():
                    # PEFT warns that embeddings are "no longer tied" even for untied models like T5.
                    warnings.filterwarnings("ignore", message=".*no longer tied.*")
                    model = loaded.model.merge_and_unload()
            else:
                model = loaded.model
            prompt = meta["prompt"]
            kwargs = dict(labels=meta["labels"], family=meta["family"], task=prompt["task"],
                          input_name=prompt["input_name"], multi_label=meta.get("multi_label", False),
                          max_length=meta.get("max_length", 384), metadata=meta, name=path_str)
        else:
            resolved = resolve_model_name(path_str, labels=labels)
            loaded = load_base(resolved, revision=revision, dtype=dtype)
            model = loaded.model
            label_list = [normalize_label(x) for x in (labels or DEFAULT_LABELS)]
            kwargs = dict(labels=label_list, family=loaded.family, task=task or DEFAULT_TASK,
                          input_name=input_name or DEFAULT_INPUT_NAME,
                          metadata={"base_model": resolved}, name=path_str)
        model.to(dev).eval()
        return cls(model, loaded.tokenizer, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   **kwargs)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def format(self, text: str) -> str:
        """The canonical prompt for ``text`` with this classifier's labels and task."""
        return format_example(text, self.labels, self.task, self.input_name, self.multi_label)

    def _to_label(self, raw: str) -> str:
        return self._normalized.get(normalize_label(raw), INVALID)

    def predict_prompts(self, prompts: Sequence[str], mode: str | None = None, progress=None) -> list[Prediction]:
        """Classify already formatted prompts (e.g. built elsewhere with :func:`format_example`)."""
        mode = mode or self.mode
        if mode == "score":
            probs = self.predict_proba_prompts(prompts, progress=progress)
            return [
                Prediction(self.labels[int(row.argmax())], {label: float(p) for label, p in zip(self.labels, row)})
                for row in probs
            ]
        if mode == "generate":
            raws = generate_texts(self.model, self.tokenizer, prompts, self.batch_size, self.max_length,
                                  self.max_new_tokens, progress=progress)
            return [Prediction(self._to_label(raw), None, raw) for raw in raws]
        raise LoratuneError(f"--mode must be score or generate, got {mode!r}")

    def predict_proba_prompts(self, prompts: Sequence[str], progress=None) -> np.ndarray:
        """Probability of each label (columns in ``self.labels`` order) for formatted prompts."""
        scores = self.score_prompts(prompts, progress=progress)
        return softmax(scores)

    def score_prompts(self, prompts: Sequence[str], progress=None) -> np.ndarray:
        """Summed label log-likelihoods (N, L) for formatted prompts."""
        if not prompts:
            return np.zeros((0, len(self.labels)))
        return seq2seq_label_logprobs(self.model, self.tokenizer, prompts, self.labels, self.batch_size,
                                      self.max_length, progress=progress)

    def predict(self, texts: str | Iterable[str], mode: str | None = None, progress=None) -> list[Prediction]:
        """Classify raw text(s); each is wrapped in the canonical prompt first."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.predict_prompts([self.format(t) for t in texts], mode=mode, progress=progress)

    def predict_proba(self, texts: str | Iterable[str]) -> np.ndarray:
        """Probability of each label for raw text(s): an (N, L) array, rows sum to 1."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.predict_proba_prompts([self.format(t) for t in texts])
