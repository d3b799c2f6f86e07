"""The Classifier: raw text in, label out, through the canonical prompt. Used by the CLI, evaluation and server.

Two decoding modes:

* ``score`` (rank classification, the default): every label's full token sequence (with EOS) is scored by
  its summed log-probability given the prompt; probabilities are a softmax over those sums. Sums are not
  length-normalised on purpose: the EOS term already tells a label apart from a longer label it prefixes,
  and normalising would favour long labels whose later tokens are nearly free. The answer is always a label.
* ``generate``: greedy decoding; the raw text is mapped to a label when it matches one (case- and
  space-insensitive), else ``invalid``. This shows what the model actually says, e.g. a base model echoing
  the input.

Multi-label classifiers (trained to output every label that applies, comma-separated, in label-set order):

* ``score``: each label gets its own probability, ``P(label is in the answer)``. The model's answer space is
  the 2^L - 1 non-empty label sets, each written in its one canonical form (``format_target``, exactly what
  training taught). Every set's full sequence (with EOS) is scored as in single-label mode, a softmax over the
  sets gives the model's distribution over answers, and a label's probability is the summed probability of the
  sets that contain it (its marginal). These are exact under the model, need no extra "none" reference or
  length correction, and do not sum to 1. A label is predicted when its marginal is >= ``threshold`` (0.5 by
  default, which minimises expected Hamming loss; ``loratune calibrate`` tunes it for micro-F1 on validation
  data); if none reaches it, the most probable label is returned unless ``allow_empty``. The cost is 2^L - 1
  candidate sequences per text, so score mode allows at most ``MAX_SCORED_LABELS`` labels (generate mode
  has no limit).
* ``generate``: the output is split on commas; each piece that matches a label is kept (in label-set order),
  the others are dropped and listed in ``Prediction.unknown``. No matching piece at all is ``invalid``.

For multi-label, ``Prediction.labels`` holds the predicted labels and ``Prediction.label`` the same labels
joined as the model writes them (``"billing, account"``), so code that reads ``label`` still sees the answer.

Per family (see :func:`label_logprobs`): seq2seq and causal LMs score label tokens as above (causal: after the
prompt, EOS included); encoders have a classification head, whose log-softmax is the score and whose
softmax is the probability. Generate mode is not applicable to encoders.
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
from .prompt import DEFAULT_INPUT_NAME, DEFAULT_LABELS, DEFAULT_TASK, LABEL_SEPARATOR, format_example, format_target
from .tokenize import causal_label_ids, causal_prompt_ids, resolve_chat_template

INVALID = "invalid"
GENERATE_NOT_FOR_ENCODERS = ("generate mode is not applicable to encoder models (they have a classification head, "
                             "not a text decoder); use --mode score")
MULTI_LABEL_SEQ2SEQ_ONLY = ("multi-label classification is implemented for seq2seq (encoder-decoder) models only; "
                            "use a seq2seq base model such as flan-t5, or single-label data")
DEFAULT_THRESHOLD = 0.5
MAX_SCORED_LABELS = 10
"""Multi-label score mode scores 2^L - 1 label sets per text: 1,023 at this limit."""
SET_TOKENS_PER_PASS = 8192
"""Multi-label score mode: decoder positions per pass (texts x sets x tokens); about 1 GB of fp32 logits at a
32k vocabulary."""


@dataclass
class Prediction:
    label: str
    """A label from the label set, or ``invalid`` (generate mode only) when the output matches none.

    Multi-label: the predicted labels joined as the model writes them (``"billing, account"``; ``""`` when
    ``allow_empty`` lets the set be empty)."""
    scores: dict[str, float] | None
    """Probability per label (score mode); None in generate mode. Multi-label: independent, need not sum to 1."""
    raw: str | None = None
    """The generated text (generate mode)."""
    labels: list[str] | None = None
    """Multi-label only: the predicted labels in label-set order."""
    unknown: list[str] | None = None
    """Multi-label generate mode: pieces of the output that matched no label (dropped)."""

    def to_dict(self) -> dict:
        out = {"label": self.label, "scores": self.scores, "raw": self.raw}
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


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask, position_ids) for left-padded sequences; positions count real tokens only,
    so absolute-position models (GPT-2) see the same positions as without padding."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _cache_argument(model) -> str:
    """``cache`` in recent transformers 5 releases, ``past_key_values`` before (now a deprecated alias)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def causal_label_logprobs(model, tokenizer, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 32,
                          max_length: int = 384, chat_template: bool = False, progress=None) -> np.ndarray:
    """Summed log-probability of each label's tokens (with EOS) after each prompt: an (N, L) array.

    Each prompt batch runs once (left-padded); its KV cache is then repeated per label and all label
    continuations run in one batched pass, so the prompt is never re-encoded per label.
    """
    import torch

    device = next(model.parameters()).device
    label_ids = causal_label_ids(tokenizer, labels)
    n_labels, width = len(label_ids), max(len(x) for x in label_ids)
    targets = torch.full((n_labels, width), tokenizer.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(label_ids):
        targets[i, : len(ids)] = torch.tensor(ids)
    target_mask = (torch.arange(width) < torch.tensor([len(x) for x in label_ids])[:, None]).to(device)
    targets = targets.to(device)

    prompt_ids, _ = causal_prompt_ids(tokenizer, prompts, max_length, chat_template)
    cache_name = _cache_argument(model)
    out = np.zeros((len(prompts), n_labels), dtype=np.float64)
    with torch.inference_mode():
        for batch in _batches_by_length([len(x) for x in prompt_ids], batch_size):
            b = len(batch)
            ids, mask, positions = (t.to(device) for t in _left_pad([prompt_ids[i] for i in batch],
                                                                     tokenizer.pad_token_id))
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            # The prompt's last position predicts each label's first token.
            sums = first.logits[:, -1].float().log_softmax(-1)[:, targets[:, 0]]  # (b, L)
            if width > 1:
                cache = first.cache if cache_name == "cache" else first.past_key_values
                cache.batch_repeat_interleave(n_labels)  # row i*L + j: prompt i, label j
                steps = torch.arange(width - 1, device=device)
                logits = model(
                    input_ids=targets[:, :-1].repeat(b, 1),
                    # Label padding sits after each label's real tokens, so causal attention keeps it out.
                    attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0),
                                              torch.ones(b * n_labels, width - 1, dtype=mask.dtype, device=device)], 1),
                    position_ids=(mask.sum(-1, keepdim=True) + steps).repeat_interleave(n_labels, 0),
                    use_cache=True, **{cache_name: cache},
                ).logits
                logp = logits.float().log_softmax(-1).gather(-1, targets[:, 1:].repeat(b, 1).unsqueeze(-1)).squeeze(-1)
                sums = sums + (logp * target_mask[:, 1:].repeat(b, 1)).sum(-1).view(b, n_labels)
            out[batch] = sums.double().cpu().numpy()
            if progress is not None:
                progress(b)
    return out


def encoder_label_logprobs(model, tokenizer, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 32,
                           max_length: int = 384, progress=None) -> np.ndarray:
    """Log-softmax of the classification head for each prompt: an (N, L) array, columns in ``labels`` order."""
    import torch

    n_out = model.config.num_labels
    if n_out != len(labels):
        raise LoratuneError(f"the model's classification head has {n_out} outputs but there are {len(labels)} labels")
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), truncation=True, max_length=max_length)["input_ids"]
    out = np.zeros((len(prompts), len(labels)), dtype=np.float64)
    with torch.inference_mode():
        for batch in _batches_by_length([len(x) for x in encoded], batch_size):
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            out[batch] = logits.float().log_softmax(-1).double().cpu().numpy()
            if progress is not None:
                progress(len(batch))
    return out


def label_logprobs(family: str, model, tokenizer, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 32,
                   max_length: int = 384, chat_template: bool = False, progress=None) -> np.ndarray:
    """Score every label for every canonical prompt with the scorer of ``family``: an (N, L) array."""
    if family == "causal":
        return causal_label_logprobs(model, tokenizer, prompts, labels, batch_size, max_length, chat_template, progress)
    if family == "encoder":
        return encoder_label_logprobs(model, tokenizer, prompts, labels, batch_size, max_length, progress)
    return seq2seq_label_logprobs(model, tokenizer, prompts, labels, batch_size, max_length, progress)


def causal_generate_texts(model, tokenizer, prompts: Sequence[str], batch_size: int = 32, max_length: int = 384,
                          max_new_tokens: int = 32, chat_template: bool = False, progress=None) -> list[str]:
    """Greedy generation with left padding; only the new tokens are decoded (never the echoed prompt)."""
    import torch

    device = next(model.parameters()).device
    prompt_ids, _ = causal_prompt_ids(tokenizer, prompts, max_length, chat_template)
    texts: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for batch in _batches_by_length([len(x) for x in prompt_ids], batch_size):
            ids, mask, _ = _left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id)
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = generated[:, ids.shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                texts[i] = text.strip()
            if progress is not None:
                progress(len(batch))
    return texts


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def label_sets(n_labels: int) -> list[tuple[int, ...]]:
    """Every non-empty set of label indices, each in label-set order: the answers a multi-label model can give."""
    if n_labels > MAX_SCORED_LABELS:
        raise LoratuneError(
            f"multi-label score mode scores all 2^L - 1 label sets and allows at most {MAX_SCORED_LABELS} labels "
            f"(this model has {n_labels}); use --mode generate"
        )
    return [tuple(i for i in range(n_labels) if mask >> i & 1) for mask in range(1, 2**n_labels)]


def seq2seq_label_marginals(model, tokenizer, prompts: Sequence[str], labels: Sequence[str],
                            batch_size: int = 32, max_length: int = 384, progress=None) -> np.ndarray:
    """P(label is in the answer) for each prompt and label, an (N, L) array (see the module docstring)."""
    sets = label_sets(len(labels))
    targets = [format_target([labels[i] for i in s], labels) for s in sets]
    # Each text brings len(targets) decoder rows: fewer texts per pass keep the logits to a bounded size.
    width = max(len(ids) for ids in tokenizer(targets)["input_ids"])
    per_pass = max(1, min(batch_size, SET_TOKENS_PER_PASS // (len(targets) * width)))
    scores = seq2seq_label_logprobs(model, tokenizer, prompts, targets, batch_size=per_pass,
                                    max_length=max_length, progress=progress)
    membership = np.zeros((len(sets), len(labels)))
    for row, s in enumerate(sets):
        membership[row, list(s)] = 1.0
    return softmax(scores) @ membership


def decide_labels(probs: np.ndarray, threshold: float = DEFAULT_THRESHOLD, allow_empty: bool = False) -> np.ndarray:
    """Multi-label decisions, an (N, L) bool array: probability >= threshold; else the top label unless allow_empty."""
    chosen = probs >= threshold
    if not allow_empty and len(probs):
        empty = ~chosen.any(axis=1)
        chosen[empty, probs[empty].argmax(axis=1)] = True
    return chosen


class Classifier:
    """Classify text with a base model or base + LoRA adapter, through the canonical prompt.

    >>> clf = Classifier.from_pretrained("outputs/lora/final")
    >>> clf.predict("I was charged twice")[0].label
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], *, family: str = "seq2seq",
                 task: str = DEFAULT_TASK, input_name: str = DEFAULT_INPUT_NAME, multi_label: bool = False,
                 mode: str = "score", batch_size: int = 32, max_length: int = 384, max_new_tokens: int = 32,
                 metadata: dict | None = None, name: str = "", threshold: float = DEFAULT_THRESHOLD,
                 allow_empty: bool = False, chat_template: bool = False):
        if mode not in ("score", "generate"):
            raise LoratuneError(f"--mode must be score or generate, got {mode!r}")
        if mode == "generate" and family == "encoder":
            raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)
        if multi_label and family != "seq2seq":
            raise LoratuneError(MULTI_LABEL_SEQ2SEQ_ONLY)
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
        self.chat_template = chat_template
        """Causal LMs: prompts are wrapped in the tokenizer's chat template (as in training)."""
        self.id2label = dict(enumerate(self.labels))
        self.label2id = {label: i for i, label in self.id2label.items()}
        self._normalized = {normalize_label(label): label for label in self.labels}
        self.threshold = threshold
        """Multi-label score mode: a label is predicted when its probability is >= this."""
        self.allow_empty = allow_empty
        """Multi-label score mode: allow an empty answer instead of falling back to the top label."""

    @classmethod
    def from_pretrained(cls, path: str | Path, *, mode: str = "score", labels: Sequence[str] | None = None,
                        task: str | None = None, input_name: str | None = None, base_model: str | None = None,
                        device: str | None = None, merge: bool = True, batch_size: int = 32,
                        max_new_tokens: int = 32, revision: str | None = None, multi_label: bool | None = None,
                        threshold: float | None = None, allow_empty: bool = False,
                        chat_template: str = "auto") -> Classifier:
        """Load an adapter directory (with ``loratune.json``), or a base model by hub id, path or ``tiny``.

        For a base model, ``labels``/``task``/``input_name``/``multi_label`` set the prompt (defaults: the
        support-ticket prompt) and ``chat_template`` (auto|on|off) how a causal LM reads it. For an adapter they
        come from its metadata and must not disagree with it. ``threshold`` (multi-label) defaults to the
        adapter's calibrated one, else 0.5.
        """
        dev = pick_device(device)
        dtype = inference_dtype(dev)
        path_str = str(path)
        if (Path(path_str) / META_FILE).is_file():
            loaded, meta = load_adapter(path_str, base_model=base_model, dtype=dtype)
            if labels is not None and [normalize_label(x) for x in labels] != meta["labels"]:
                raise LoratuneError(
                    f"adapter {path_str} was trained on labels {', '.join(meta['labels'])}; "
                    f"--labels {', '.join(labels)} does not match"
                )
            if multi_label is not None and multi_label != meta.get("multi_label", False):
                kind = "multi-label" if meta.get("multi_label", False) else "single-label"
                raise LoratuneError(f"adapter {path_str} is {kind}; --multi-label does not match")
            if merge:
                with warnings.catch_warnings():
                    # PEFT warns that embeddings are "no longer tied" even for untied models like T5.
                    warnings.filterwarnings("ignore", message=".*no longer tied.*")
                    model = loaded.model.merge_and_unload()
            else:
                model = loaded.model
            model.to(dev).eval()
            explicit = {} if threshold is None else {"threshold": threshold}
            return cls.for_adapter(model, loaded.tokenizer, meta, name=path_str, mode=mode, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, allow_empty=allow_empty, **explicit)
        else:
            resolved = resolve_model_name(path_str, labels=labels)
            label_list = [normalize_label(x) for x in (labels or DEFAULT_LABELS)]
            loaded = load_base(resolved, revision=revision, dtype=dtype, labels=label_list)
            model = loaded.model
            use_template = loaded.family == "causal" and resolve_chat_template(loaded.tokenizer, chat_template)
            kwargs = dict(labels=label_list, family=loaded.family, task=task or DEFAULT_TASK,
                          input_name=input_name or DEFAULT_INPUT_NAME,
                          metadata={"base_model": resolved}, name=path_str, multi_label=bool(multi_label),
                          threshold=DEFAULT_THRESHOLD if threshold is None else threshold, chat_template=use_template)
        model.to(dev).eval()
        return cls(model, loaded.tokenizer, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   allow_empty=allow_empty, **kwargs)

    @classmethod
    def for_adapter(cls, model, tokenizer, meta: dict, *, name: str = "", **kwargs) -> Classifier:
        """A Classifier over an already loaded adapter model, with labels and prompt from its ``loratune.json``.

        For callers that load models themselves, e.g. the server's several adapters over one base model.
        """
        prompt = meta["prompt"]
        kwargs.setdefault("threshold", meta.get("threshold", DEFAULT_THRESHOLD))  # calibrated, if it was
        kwargs.setdefault("chat_template", bool(prompt.get("chat_template", False)))
        return cls(model, tokenizer, labels=meta["labels"], family=meta["family"], task=prompt["task"],
                   input_name=prompt["input_name"], multi_label=meta.get("multi_label", False),
                   max_length=meta.get("max_length", 384), metadata=meta, name=name, **kwargs)

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
        if self.multi_label and mode in ("score", "generate"):
            return self._predict_multi_label(prompts, mode, progress)
        if mode == "score":
            probs = self.predict_proba_prompts(prompts, progress=progress)
            return [
                Prediction(self.labels[int(row.argmax())], {label: float(p) for label, p in zip(self.labels, row)})
                for row in probs
            ]
        if mode == "generate" and self.family == "encoder":
            raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)
        if mode == "generate" and self.family == "causal":
            raws = causal_generate_texts(self.model, self.tokenizer, prompts, self.batch_size, self.max_length,
                                         self.max_new_tokens, self.chat_template, progress=progress)
            return [Prediction(self._to_label(raw), None, raw) for raw in raws]
        if mode == "generate":
            raws = generate_texts(self.model, self.tokenizer, prompts, self.batch_size, self.max_length,
                                  self.max_new_tokens, progress=progress)
            return [Prediction(self._to_label(raw), None, raw) for raw in raws]
        raise LoratuneError(f"--mode must be score or generate, got {mode!r}")

    def _predict_multi_label(self, prompts: Sequence[str], mode: str, progress=None) -> list[Prediction]:
        if mode == "score":
            probs = self.predict_proba_prompts(prompts, progress=progress)
            chosen = decide_labels(probs, self.threshold, self.allow_empty)
            predictions = []
            for row, picks in zip(probs, chosen):
                labels = [label for label, pick in zip(self.labels, picks) if pick]
                predictions.append(Prediction(format_target(labels, self.labels),
                                              {label: float(p) for label, p in zip(self.labels, row)}, labels=labels))
            return predictions
        raws = generate_texts(self.model, self.tokenizer, prompts, self.batch_size, self.max_length,
                              self.max_new_tokens, progress=progress)
        predictions = []
        for raw in raws:
            labels, unknown = self.parse_labels(raw)
            predictions.append(Prediction(format_target(labels, self.labels) if labels else INVALID, None, raw,
                                          labels=labels, unknown=unknown))
        return predictions

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

    def predict_proba_prompts(self, prompts: Sequence[str], progress=None) -> np.ndarray:
        """Probability of each label (columns in ``self.labels`` order) for formatted prompts.

        Multi-label: each label's own probability of being in the answer (rows need not sum to 1).
        """
        if self.multi_label:
            if not prompts:
                return np.zeros((0, len(self.labels)))
            return seq2seq_label_marginals(self.model, self.tokenizer, prompts, self.labels, self.batch_size,
                                           self.max_length, progress=progress)
        scores = self.score_prompts(prompts, progress=progress)
        return softmax(scores)

    def score_prompts(self, prompts: Sequence[str], progress=None) -> np.ndarray:
        """Summed label log-likelihoods (N, L) for formatted prompts."""
        if not prompts:
            return np.zeros((0, len(self.labels)))
        return label_logprobs(self.family, self.model, self.tokenizer, prompts, self.labels, self.batch_size,
                              self.max_length, self.chat_template, progress=progress)

    def predict(self, texts: str | Iterable[str], mode: str | None = None, progress=None) -> list[Prediction]:
        """Classify raw text(s); each is wrapped in the canonical prompt first."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.predict_prompts([self.format(t) for t in texts], mode=mode, progress=progress)

    def predict_proba(self, texts: str | Iterable[str]) -> np.ndarray:
        """Probability of each label for raw text(s): an (N, L) array, rows sum to 1 (multi-label: need not)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.predict_proba_prompts([self.format(t) for t in texts])
