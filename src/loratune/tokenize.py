"""Turn prompts and targets into model inputs, per model family.

* seq2seq: encoder ids, target ids with padding as -100.
* causal: prompt + label + EOS as one sequence; the loss sees only the label and EOS (prompt is -100).
* encoder: the prompt's ids and the label's index, for a classification head.

Padding is dynamic (per batch, by the collator), never to a fixed length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class Encoded:
    features: list[dict[str, list[int]]]
    n_truncated: int
    """Prompts longer than max_length (their end was cut)."""
    n_target_truncated: int


def _tokenize_counting(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    ids = tokenizer(list(texts))["input_ids"]
    n_long = sum(len(x) > max_length for x in ids)
    if n_long:
        # Re-tokenize with truncation so special tokens (EOS) survive the cut.
        ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return ids, n_long


def encode_seq2seq(tokenizer, prompts: Sequence[str], targets: Sequence[str] | None,
                   max_length: int, max_target_length: int = 32) -> Encoded:
    """Tokenize prompts (and targets as ``labels``) for an encoder-decoder model."""
    input_ids, n_trunc = _tokenize_counting(tokenizer, prompts, max_length)
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in input_ids]
    n_target_trunc = 0
    if targets is not None:
        label_ids, n_target_trunc = _tokenize_counting(tokenizer, targets, max_target_length)
        for feature, ids in zip(features, label_ids):
            feature["labels"] = ids
    return Encoded(features, n_trunc, n_target_trunc)


def seq2seq_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Dynamic padding; label padding becomes -100 so it is ignored by the loss."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of)


def token_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts))["input_ids"]]


# --------------------------------------------------------------------------------------------------
# Causal (decoder-only) LMs.

CAUSAL_ANSWER_CUE = "\n\nLabel:\n"
"""Appended to the canonical prompt when no chat template is used, so the model knows where the message ends
and its answer starts. It ends in a newline: byte-level BPEs never merge across one, so the label tokenized
on its own gets the same ids as in running text."""
CHAT_TEMPLATE_SETTINGS = ("auto", "on", "off")
CAUSAL_TAIL_TOKENS = 32
"""On truncation, this many tokens are kept from the end of the prompt (the answer cue or the chat template's
assistant header); the end of the message is what gets cut."""


def resolve_chat_template(tokenizer, setting: str) -> bool:
    """Whether to wrap prompts in the tokenizer's chat template: ``auto`` when it has one, ``on``, ``off``."""
    from .errors import LoratuneError

    if setting not in CHAT_TEMPLATE_SETTINGS:
        raise LoratuneError(f"prompt.chat_template must be auto, on or off, got {setting!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has_template:
        raise LoratuneError("prompt.chat_template=on but the tokenizer has no chat template; use auto or off")
    return has_template if setting == "auto" else setting == "on"


def render_causal_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """The canonical prompt as a causal LM reads it: a user turn of its chat template, or prompt + answer cue."""
    if chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + CAUSAL_ANSWER_CUE


def causal_prompt_ids(tokenizer, prompts: Sequence[str], max_length: int, chat_template: bool) -> tuple[list[list[int]], int]:
    """Token ids of each rendered prompt (no EOS), cut in the middle to ``max_length``; returns (ids, n_cut)."""
    texts = [render_causal_prompt(tokenizer, p, chat_template) for p in prompts]
    # A chat template writes its own BOS; plain prompts get the tokenizer's special tokens (Llama: BOS).
    ids = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = [x[:-1] if x and x[-1] == eos else x for x in ids]  # some tokenizers append EOS: not mid-sequence
    tail = min(CAUSAL_TAIL_TOKENS, max_length // 4)
    n_cut = sum(len(x) > max_length for x in ids)
    ids = [x if len(x) <= max_length else x[: max_length - tail] + x[-tail:] for x in ids]
    return ids, n_cut


def causal_label_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """Each label's ids followed by EOS, so a label is told apart from a longer label it prefixes."""
    from .errors import LoratuneError

    ids = [x + [tokenizer.eos_token_id] for x in tokenizer(list(labels), add_special_tokens=False)["input_ids"]]
    if len({tuple(x) for x in ids}) != len(ids):
        raise LoratuneError("two labels tokenize to the same token ids; rename one of them")
    return ids


def encode_causal(tokenizer, prompts: Sequence[str], targets: Sequence[str] | None, max_length: int,
                  max_target_length: int = 32, chat_template: bool = False) -> Encoded:
    """Prompt + target + EOS as one sequence; ``labels`` copies the target part and masks the prompt with -100."""
    prompt_ids, n_trunc = causal_prompt_ids(tokenizer, prompts, max_length, chat_template)
    if targets is None:
        return Encoded([{"input_ids": x, "attention_mask": [1] * len(x)} for x in prompt_ids], n_trunc, 0)
    eos = tokenizer.eos_token_id
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    n_target_trunc = sum(len(t) + 1 > max_target_length for t in target_ids)
    features = []
    for p, t in zip(prompt_ids, target_ids):
        t = t[: max_target_length - 1] + [eos]
        features.append({"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)),
                         "labels": [IGNORE_INDEX] * len(p) + t})
    return Encoded(features, n_trunc, n_target_trunc)


def causal_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Right padding for training (positions stay 0..n for every example); labels padded with -100.

    Padding is by position, never by comparing ids with the pad id: pad is often EOS, and the label's EOS
    must stay in the loss.
    """
    import torch

    pad_id = tokenizer.pad_token_id

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * n)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * n)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    return collate


# --------------------------------------------------------------------------------------------------
# Encoders with a classification head.

def encode_encoder(tokenizer, prompts: Sequence[str], targets: Sequence[str] | None, labels: Sequence[str],
                   max_length: int) -> Encoded:
    """The canonical prompt's ids; ``labels`` is the target's index in the label set (for the head)."""
    input_ids, n_trunc = _tokenize_counting(tokenizer, prompts, max_length)
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in input_ids]
    if targets is not None:
        index = {label: i for i, label in enumerate(labels)}
        for feature, target in zip(features, targets):
            feature["labels"] = index[target]
    return Encoded(features, n_trunc, 0)


def encoder_collator(tokenizer, pad_to_multiple_of: int | None = None):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


# --------------------------------------------------------------------------------------------------
# One entry point per step for the trainer.

def encode_for_family(family: str, tokenizer, prompts: Sequence[str], targets: Sequence[str] | None, *,
                      labels: Sequence[str], max_length: int, max_target_length: int = 32,
                      chat_template: bool = False) -> Encoded:
    """Tokenize canonical prompts and targets the way ``family`` trains."""
    if family == "causal":
        return encode_causal(tokenizer, prompts, targets, max_length, max_target_length, chat_template)
    if family == "encoder":
        return encode_encoder(tokenizer, prompts, targets, labels, max_length)
    return encode_seq2seq(tokenizer, prompts, targets, max_length, max_target_length)


def collator_for_family(family: str, tokenizer, pad_to_multiple_of: int | None = None):
    factory = {"causal": causal_collator, "encoder": encoder_collator}.get(family, seq2seq_collator)
    return factory(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
