"""Turn prompts and targets into model inputs (seq2seq: encoder ids, target ids with padding as -100).

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
