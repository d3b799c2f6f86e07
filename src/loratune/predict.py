"""The Classifier: raw text in, label out, through the canonical prompt. Used by the CLI, evaluation and server.

Two decoding modes:

* ``score`` (rank classification, the default): every label's full token sequence (with EOS) is scored by
  its summed log-probability given the prompt; probabilities are a softmax over those sums. Sums are not
  length-normalised on purpose: the EOS term already tells a label apart from a longer label it prefixes,
  and normalising would favour long labels whose later tokens are nearly free. The answer is always a label.
* ``generate``: greedy decoding; the raw text is mapped to a label when it matches one (case- and
  space-insensitive), else ``invalid``. This shows what the model actually says, e.g. a base model echoing
  the input.

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
from .prompt import DEFAULT_INPUT_NAME, DEFAULT_LABELS, DEFAULT_TASK, format_example
from .tokenize import causal_label_ids, causal_prompt_ids, resolve_chat_template

INVALID = "invalid"
GENERATE_NOT_FOR_ENCODERS = ("generate mode is not applicable to encoder models (they have a classification head, "
                             "not a text decoder); use --mode score")


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

    The encoder runs once per prompt; all labels are then scored in one batched decoder pass.
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

    encoded = tokenizer(list(prompts), truncation=True, max_length=max_length)["input_ids"]
    out = np.zeros((len(prompts), n_labels), dtype=np.float64)
    encoder = model.get_encoder()
    with torch.inference_mode():
        for batch in _batches_by_length([len(x) for x in encoded], batch_size):
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            b = len(batch)
            logits = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n_labels, 0)),
                attention_mask=inputs["attention_mask"].repeat_interleave(n_labels, 0),
                decoder_input_ids=decoder_inputs.repeat(b, 1),
            ).logits
            logp = logits.float().log_softmax(-1).gather(-1, targets.repeat(b, 1).unsqueeze(-1)).squeeze(-1)
            sums = (logp * target_mask.repeat(b, 1)).sum(-1).view(b, n_labels)
            out[batch] = sums.double().cpu().numpy()
            if progress is not None:
                progress(b)
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


class Classifier:
    """Classify text with a base model or base + LoRA adapter, through the canonical prompt.

    >>> clf = Classifier.from_pretrained("outputs/lora/final")
    >>> clf.predict("I was charged twice")[0].label
    """

    def __init__(self, model, tokenizer, labels: Sequence[str], *, family: str = "seq2seq",
                 task: str = DEFAULT_TASK, input_name: str = DEFAULT_INPUT_NAME, multi_label: bool = False,
                 mode: str = "score", batch_size: int = 32, max_length: int = 384, max_new_tokens: int = 32,
                 metadata: dict | None = None, name: str = "", chat_template: bool = False):
        if mode not in ("score", "generate"):
            raise LoratuneError(f"--mode must be score or generate, got {mode!r}")
        if mode == "generate" and family == "encoder":
            raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)
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

    @classmethod
    def from_pretrained(cls, path: str | Path, *, mode: str = "score", labels: Sequence[str] | None = None,
                        task: str | None = None, input_name: str | None = None, base_model: str | None = None,
                        device: str | None = None, merge: bool = True, batch_size: int = 32,
                        max_new_tokens: int = 32, revision: str | None = None,
                        chat_template: str = "auto") -> Classifier:
        """Load an adapter directory (with ``loratune.json``), or a base model by hub id, path or ``tiny``.

        For a base model, ``labels``/``task``/``input_name`` set the prompt (defaults: the support-ticket
        prompt) and ``chat_template`` (auto|on|off) how a causal LM reads it. For an adapter they come from
        its metadata and must not disagree with it.
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
                          max_length=meta.get("max_length", 384), metadata=meta, name=path_str,
                          chat_template=bool(prompt.get("chat_template", False)))
        else:
            resolved = resolve_model_name(path_str, labels=labels)
            label_list = [normalize_label(x) for x in (labels or DEFAULT_LABELS)]
            loaded = load_base(resolved, revision=revision, dtype=dtype, labels=label_list)
            model = loaded.model
            use_template = loaded.family == "causal" and resolve_chat_template(loaded.tokenizer, chat_template)
            kwargs = dict(labels=label_list, family=loaded.family, task=task or DEFAULT_TASK,
                          input_name=input_name or DEFAULT_INPUT_NAME,
                          metadata={"base_model": resolved}, name=path_str, chat_template=use_template)
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

    def predict_proba_prompts(self, prompts: Sequence[str], progress=None) -> np.ndarray:
        """Probability of each label (columns in ``self.labels`` order) for formatted prompts."""
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
        """Probability of each label for raw text(s): an (N, L) array, rows sum to 1."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.predict_proba_prompts([self.format(t) for t in texts])
