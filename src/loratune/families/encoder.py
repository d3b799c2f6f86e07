"""Encoders with a classification head (BERT, MiniLM): the head's log-softmax is the score.

The head already knows the labels, so by default the model reads the input text alone (``input_only``): an
instruction listing every label would cost 6-7x the tokens of the text and, with many labels, push the text
itself out of the window. There is nothing to generate.
"""

from __future__ import annotations

import numpy as np

from ..errors import LoratuneError
from ..quiet import expected_new_head
from .common import Encoded, Family, batches_by_length, right_pad

HEAD_SEED = 0
"""A new classification head is always initialised from this seed (see :meth:`EncoderFamily.load_model`)."""


class EncoderFamily(Family):
    name = "encoder"
    peft_task_type = "SEQ_CLS"
    supports_generate = False
    reads_text_alone = True

    @classmethod
    def load_model(cls, source, config, tokenizer, labels, **kwargs):
        """The encoder with a new head of one output per label, initialised from HEAD_SEED: the base alone is
        then exactly the starting point of every adapter trained on it, so ``compare`` shows what training
        changed (the base alone predicts at chance)."""
        import torch
        from transformers import AutoModelForSequenceClassification

        if not labels:
            raise LoratuneError(f"{source!r} is an encoder: it needs the label set to size its classification head")
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        if tokenizer.pad_token_id is None:
            raise LoratuneError(f"the tokenizer of {source!r} has no pad token; encoder models need one for batching")
        config.pad_token_id = tokenizer.pad_token_id
        try:
            # The head is new (random); a private RNG makes it reproducible without touching the caller's seed.
            with torch.random.fork_rng(devices=[]), expected_new_head():
                torch.manual_seed(HEAD_SEED)
                return AutoModelForSequenceClassification.from_pretrained(source, config=config, **kwargs)
        except ValueError as exc:
            raise LoratuneError(
                f"cannot load {source!r} as an encoder classifier (AutoModelForSequenceClassification): {str(exc).splitlines()[0][:300]}"
            ) from None

    def encode(self, texts, targets=None) -> Encoded:
        prompts = self.prompt_ids(texts)
        features = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prompts.ids]
        if targets is not None:
            index = {label: i for i, label in enumerate(self.spec.labels)}
            for feature, target in zip(features, targets):
                feature["labels"] = index[target]
        return Encoded(features, prompts.n_cut, 0, prompts.cut)

    def collator(self, pad_to_multiple_of=None):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def label_logprobs(self, texts, batch_size=32, progress=None):
        import torch

        n_out, labels = self.model.config.num_labels, self.spec.labels
        if n_out != len(labels):
            raise LoratuneError(f"the model's classification head has {n_out} outputs but there are {len(labels)} labels")
        prompt_ids = self.prompt_ids(texts).ids
        out = np.zeros((len(prompt_ids), len(labels)), dtype=np.float64)
        with torch.inference_mode():
            for batch in batches_by_length([len(x) for x in prompt_ids], batch_size, progress):
                inputs = right_pad(self.tokenizer, [prompt_ids[i] for i in batch], self.device)
                logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                out[batch] = logits.float().log_softmax(-1).double().cpu().numpy()
        return out
