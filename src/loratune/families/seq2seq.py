"""Encoder-decoder LMs (flan-t5): the prompt goes to the encoder, the label is the decoder's answer.

Scoring ranks every label by the summed log-probability of its tokens (with EOS) given the prompt. T5-family
models use the fast scorer (:mod:`loratune.scoring`: encoder once per prompt, label prefix tree, vocabulary
projection only where a label token is scored); others the plain reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import LoratuneError
from ..prompt import format_target, label_sets
from .common import IGNORE_INDEX, Encoded, Family, Progress, batches_by_length, right_pad, softmax

SET_TOKENS_PER_PASS = 8192
"""Multi-label score mode: decoder positions per pass (texts x sets x tokens); about 1 GB of fp32 logits at a
32k vocabulary."""


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    ids = tokenizer(list(labels))["input_ids"]
    if len({tuple(x) for x in ids}) != len(ids):
        raise LoratuneError("two labels tokenize to the same token ids; rename one of them")
    return ids


def score_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    label_ids: list[list[int]],
    batch_size: int = 32,
    progress: Progress = None,
    reference: bool = False,
) -> np.ndarray:
    """Summed log-probability of each label's ids given each tokenized prompt: an (N, L) array."""
    import torch

    from ..scoring import T5LabelScorer, supports_fast_scoring

    fast = not reference and supports_fast_scoring(model)
    score = T5LabelScorer(model, label_ids).score if fast else _reference_scorer(model, tokenizer, label_ids)
    device = next(model.parameters()).device
    out = np.zeros((len(prompt_ids), len(label_ids)), dtype=np.float64)
    with torch.inference_mode():
        for batch in batches_by_length([len(x) for x in prompt_ids], batch_size, progress):
            inputs = right_pad(tokenizer, [prompt_ids[i] for i in batch], device)
            out[batch] = score(inputs["input_ids"], inputs["attention_mask"]).double().cpu().numpy()
    return out


def _reference_scorer(model, tokenizer, label_ids: list[list[int]]):
    """Every (prompt, label) pair through the whole decoder, a full-vocabulary log-softmax at every label
    position. Slow; the reference the fast scorer is tested and benchmarked against."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    device = next(model.parameters()).device
    n_labels, width = len(label_ids), max(len(x) for x in label_ids)
    targets = torch.full((n_labels, width), tokenizer.pad_token_id, dtype=torch.long)
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

    return score


def _plain_ids(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(prompts), truncation=True, max_length=max_length)["input_ids"]


def seq2seq_label_logprobs(
    model, tokenizer, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 32, max_length: int = 512, progress: Progress = None
) -> np.ndarray:
    """Label scores for already formatted prompts (benchmarks and tests; classifiers go through the family)."""
    return score_ids(model, tokenizer, _plain_ids(tokenizer, prompts, max_length), label_token_ids(tokenizer, labels), batch_size, progress)


def seq2seq_label_logprobs_reference(
    model, tokenizer, prompts: Sequence[str], labels: Sequence[str], batch_size: int = 32, max_length: int = 512, progress: Progress = None
) -> np.ndarray:
    """The same scores through the plain reference scorer."""
    return score_ids(
        model,
        tokenizer,
        _plain_ids(tokenizer, prompts, max_length),
        label_token_ids(tokenizer, labels),
        batch_size,
        progress,
        reference=True,
    )


def generate_ids(
    model, tokenizer, prompt_ids: Sequence[Sequence[int]], batch_size: int = 32, max_new_tokens: int = 32, progress: Progress = None
) -> list[str]:
    """Greedy generation for each tokenized prompt, batched by length; returns the decoded text."""
    import torch

    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompt_ids)
    with torch.inference_mode():
        for batch in batches_by_length([len(x) for x in prompt_ids], batch_size, progress):
            inputs = right_pad(tokenizer, [prompt_ids[i] for i in batch], device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            for i, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                texts[i] = text.strip()
    return texts


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    max_new_tokens: int = 32,
    progress: Progress = None,
) -> list[str]:
    """Greedy generation for already formatted prompts (benchmarks and tests)."""
    return generate_ids(model, tokenizer, _plain_ids(tokenizer, prompts, max_length), batch_size, max_new_tokens, progress)


class Seq2SeqFamily(Family):
    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    supports_multi_label = True

    @classmethod
    def load_model(cls, source, config, tokenizer, labels, **kwargs):
        from transformers import AutoModelForSeq2SeqLM

        from ..quiet import expected_untied_t5_head

        with expected_untied_t5_head():  # flan-t5's own LM head is kept apart from the embeddings, as it should be
            return AutoModelForSeq2SeqLM.from_pretrained(source, config=config, **kwargs)

    def encode(self, texts, targets=None) -> Encoded:
        prompts = self.prompt_ids(texts)
        features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompts.ids]
        n_target_cut = 0
        if targets is not None:
            limit = self.spec.max_target_length
            label_ids = self.tokenizer(list(targets))["input_ids"]
            n_target_cut = sum(len(x) > limit for x in label_ids)
            for feature, ids in zip(features, label_ids):
                feature["labels"] = ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]  # keep EOS
        return Encoded(features, prompts.n_cut, n_target_cut, prompts.cut)

    def collator(self, pad_to_multiple_of=None):
        from transformers import DataCollatorForSeq2Seq

        # Label padding becomes -100 so the loss ignores it.
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of)

    def label_logprobs(self, texts, batch_size=32, progress=None):
        return score_ids(
            self.model, self.tokenizer, self.prompt_ids(texts).ids, label_token_ids(self.tokenizer, self.spec.labels), batch_size, progress
        )

    def label_marginals(self, texts, batch_size=32, progress=None):
        """P(label is in the answer): a softmax over every label set's score, summed over the sets holding it."""
        labels = self.spec.labels
        sets = label_sets(len(labels))
        targets = [format_target([labels[i] for i in s], labels) for s in sets]
        target_ids = label_token_ids(self.tokenizer, targets)
        # Each text brings len(targets) decoder rows: fewer texts per pass keep the logits to a bounded size.
        width = max(len(ids) for ids in target_ids)
        per_pass = max(1, min(batch_size, SET_TOKENS_PER_PASS // (len(targets) * width)))
        scores = score_ids(self.model, self.tokenizer, self.prompt_ids(texts).ids, target_ids, per_pass, progress)
        membership = np.zeros((len(sets), len(labels)))
        for row, s in enumerate(sets):
            membership[row, list(s)] = 1.0
        return softmax(scores) @ membership

    def generate(self, texts, batch_size=32, max_new_tokens=32, progress=None):
        return generate_ids(self.model, self.tokenizer, self.prompt_ids(texts).ids, batch_size, max_new_tokens, progress)
