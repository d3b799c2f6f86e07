"""What every model family shares: the :class:`Family` interface and batching by length.

A family object holds its model, tokenizer and :class:`~loratune.prompt.PromptSpec`, so its methods take texts
and return arrays: nothing carries the (model, tokenizer, prompts, labels, max_length, ...) pile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import LoratuneError
from ..prompt import Budgeted, PromptSpec

IGNORE_INDEX = -100
Progress = Callable[[int], object] | None


@dataclass
class Encoded:
    """Training features of one split, and what the budget had to cut."""

    features: list[dict]
    n_truncated: int
    """Prompts whose input text was cut to fit ``max_length``."""
    n_target_truncated: int
    cut: list[int]
    """Text tokens each prompt lost (0: none)."""


def batches_by_length(lengths: Sequence[int], batch_size: int, progress: Progress = None) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), so padding costs little; ``progress(n)`` after each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        yield batch
        if progress is not None:
            progress(len(batch))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask, position_ids) for left-padded sequences; positions count real tokens only,
    so absolute-position models (GPT-2) see the same positions as without padding."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def right_pad(tokenizer, seqs: Sequence[Sequence[int]], device):
    """A right-padded batch (the tokenizer's own padding side and pad id) on ``device``."""
    return tokenizer.pad({"input_ids": [list(x) for x in seqs]}, return_tensors="pt").to(device)


def weighted_loss(logits, labels, weights, shifted: bool = False):
    """mean_i(weights_i x loss_i), loss_i the mean cross-entropy over example i's labelled positions.

    ``logits`` (B, L) with ``labels`` (B,) for a classification head, or (B, T, V) with (B, T) token labels
    (-100 ignored; ``shifted``: position t predicts label t + 1). Dividing by B, not by the sum of the weights,
    keeps inverse-frequency weights (mean 1 over the data) from rescaling the loss batch by batch.
    """
    import torch.nn.functional as F

    if logits.dim() == 2:
        logits, labels = logits[:, None], labels[:, None]
    elif shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return weighted_token_mean(F.cross_entropy(logits[keep].float(), labels[keep], reduction="none"), keep, weights)


def weighted_token_mean(token_losses, keep, weights):
    """Per-token losses (``keep``'s True positions, row-major) -> each row's mean -> mean of weight x row mean."""
    rows = keep.nonzero()[:, 0]
    per_row = token_losses.new_zeros(keep.shape[0]).index_add(0, rows, token_losses) / keep.sum(1).clamp(min=1)
    return (per_row * weights.to(per_row)).mean()


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Family:
    """One model family. Subclasses set the class facts and implement the methods below."""

    name: ClassVar[str]
    peft_task_type: ClassVar[str]
    supports_generate: ClassVar[bool] = True
    supports_multi_label: ClassVar[bool] = False
    exports_gguf: ClassVar[bool] = False
    """``loratune export --format gguf`` can write this family (Llama-architecture causal LMs)."""
    reads_text_alone: ClassVar[bool] = False
    """Default for ``PromptSpec.input_only``: the model needs no instruction (a classification head)."""
    shifts_labels: ClassVar[bool] = False
    """The logits at position t predict the label at t + 1 (causal LMs), for :meth:`forward_loss`."""

    def __init__(self, model, tokenizer, spec: PromptSpec):
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self._last: tuple[tuple[str, ...], Budgeted] | None = None

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load_model(cls, source: str, config, tokenizer, labels: Sequence[str] | None, **kwargs):
        """The base model from ``source`` (``kwargs`` go to ``from_pretrained``)."""
        raise NotImplementedError

    @classmethod
    def prepare_tokenizer(cls, tokenizer, model) -> None:
        """Make the tokenizer fit this family's batching (padding side, pad token)."""

    train_defaults: ClassVar[dict] = {}
    """This family's own defaults for settings the user did not choose ({"train.lr": 1e-3, ...})."""

    @classmethod
    def make_spec(
        cls,
        tokenizer,
        labels: Sequence[str],
        *,
        chat_template: str = "auto",
        input_only: bool | None = None,
        pooling: str = "auto",
        model_config=None,
        **prompt,
    ) -> PromptSpec:
        """The prompt spec this family reads (``prompt``: task, input_name, multi_label, max_length, ...)."""
        if pooling not in ("auto", None):
            raise LoratuneError(f"model.pooling={pooling} applies to encoder models only; this is a {cls.name} model")
        return PromptSpec(tuple(labels), input_only=cls.reads_text_alone if input_only is None else input_only, **prompt)

    @classmethod
    def lora_targets(cls, model, spec: PromptSpec) -> tuple[list[str] | None, list[str] | None]:
        """(target_modules, exclude_modules) when the user chose none; None lets PEFT pick per architecture."""
        return None, None

    def prepare_training(self, texts: Sequence[str], labels: Sequence[str], echo=print) -> None:
        """Set up what training starts from, once, before the first step (e.g. a classification head)."""

    @classmethod
    def answer_cue(cls, chat_template: bool) -> str:
        """What follows the prompt so the model knows its answer starts (causal LMs without a chat template)."""
        return ""

    def check(self, mode: str) -> None:
        """Raise LoratuneError if this family cannot run ``mode`` with its spec."""
        if self.spec.multi_label and not self.supports_multi_label:
            raise LoratuneError(MULTI_LABEL_SEQ2SEQ_ONLY)
        if mode == "generate" and not self.supports_generate:
            raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)

    # -- the interface -------------------------------------------------------------------------------------
    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompt_ids(self, texts: Sequence[str]) -> Budgeted:
        """Token ids of each text's rendered prompt, within the budget.

        The last call is remembered: a Classifier reads the cut counts and then scores the same texts, and
        tokenizing a long prompt (many labels) twice per request would double that cost."""
        key = tuple(texts)
        if self._last is None or self._last[0] != key:
            self._last = (key, self._encode_prompts(key))
        return self._last[1]

    def _encode_prompts(self, texts: Sequence[str]) -> Budgeted:
        return self.spec.encode(self.tokenizer, texts)

    def invalidate(self) -> None:
        """Forget anything computed from the weights (e.g. a cached prompt prefix): they changed."""

    def encode(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> Encoded:
        """Training (or validation) features for ``texts`` and their target strings."""
        raise NotImplementedError

    def training_loss(self, model, inputs: dict, weights=None):
        """This family's own training loss for a collated batch, or None for the model's (the default).

        ``weights`` (one per example: class weights) make it the mean of weight x the example's own loss (its
        mean over its target tokens)."""
        return self.forward_loss(model, inputs, weights)

    def forward_loss(self, model, inputs: dict, weights=None):
        """The weighted loss from the model's forward pass (safe under DDP); None (the model's own) without weights."""
        if weights is None:
            return None
        return weighted_loss(model(**inputs).logits, inputs["labels"], weights, self.shifts_labels)

    def collator(self, pad_to_multiple_of: int | None = None):
        """Pads a list of features from :meth:`encode` into a batch."""
        raise NotImplementedError

    def label_logprobs(self, texts: Sequence[str], batch_size: int = 32, progress: Progress = None) -> np.ndarray:
        """Score every label for every text: an (N, L) array of log-probabilities, columns in label order."""
        raise NotImplementedError

    def label_marginals(self, texts: Sequence[str], batch_size: int = 32, progress: Progress = None) -> np.ndarray:
        """Multi-label: P(label is in the answer), an (N, L) array."""
        raise LoratuneError(MULTI_LABEL_SEQ2SEQ_ONLY)

    def generate(self, texts: Sequence[str], batch_size: int = 32, max_new_tokens: int = 32, progress: Progress = None) -> list[str]:
        """Greedy decoding: the model's raw answer for each text."""
        raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)


GENERATE_NOT_FOR_ENCODERS = (
    "generate mode is not applicable to encoder models (they have a classification head, not a text decoder); use --mode score"
)
MULTI_LABEL_SEQ2SEQ_ONLY = (
    "multi-label classification is implemented for seq2seq (encoder-decoder) models only; "
    "use a seq2seq base model such as flan-t5, or single-label data"
)
