"""Encoders with a classification head (BERT, MiniLM): the head's log-softmax is the score.

The head already knows the labels, so by default the model reads the input text alone (``input_only``): an
instruction listing every label would cost 6-7x the tokens of the text and, with many labels, push the text
itself out of the window. There is nothing to generate.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import ClassVar

import numpy as np

from ..errors import LoratuneError
from ..quiet import expected_new_head
from .common import Encoded, Family, batches_by_length, right_pad

HEAD_SEED = 0
"""A new classification head is always initialised from this seed (see :meth:`EncoderFamily.load_model`)."""
HEAD_SCALE = 20.0
"""Mean pooling: the L2-normalised embedding is multiplied by this before the head, so a head of ordinary
weights can reach confident logits from unit vectors (the embedding-classifier recipe)."""
MEAN_POOLING_TYPES = ("bert",)
"""Model types whose sequence classifier reads its ``pooler``'s output through one Linear ``classifier``; mean
pooling replaces that output (BERT, MiniLM and the BERT-style sentence embedders)."""
PROBE_C = 10.0
"""Inverse regularisation of the linear probe that starts the head (unit-vector inputs: a weak penalty)."""


class EncoderFamily(Family):
    name = "encoder"
    peft_task_type = "SEQ_CLS"
    supports_generate = False
    reads_text_alone = True
    # Measured on CLINC150 (151 intents) with MiniLM: scripts/encoder_sweep_results.md. LoRA on every
    # projection of attention and MLP, two epochs at lr 1e-3, a head started from a linear probe.
    train_defaults: ClassVar[dict] = {
        "train.epochs": 2.0,
        "train.batch_size": 32,
        "train.lr": 1e-3,
        "train.weight_decay": 0.01,
        "train.warmup_ratio": 0.06,
        "lora.alpha": 16,
        "lora.dropout": 0.1,
    }

    def __init__(self, model, tokenizer, spec):
        super().__init__(model, tokenizer, spec)
        if spec.pooling == "mean" and model is not None:  # inspect reads prompts without a model
            _install_mean_pooling(model)

    @classmethod
    def make_spec(cls, tokenizer, labels, *, pooling="auto", model_config=None, **prompt):
        model_type = getattr(model_config, "model_type", None)
        if pooling == "mean" and model_type not in MEAN_POOLING_TYPES:
            raise LoratuneError(
                f"model.pooling=mean needs a BERT-style encoder (model type {', '.join(MEAN_POOLING_TYPES)}), "
                f"not {model_type!r}; use --set model.pooling=cls"
            )
        mean = pooling == "mean" or (pooling == "auto" and model_type in MEAN_POOLING_TYPES)
        spec = super().make_spec(tokenizer, labels, **prompt)
        return dataclasses.replace(spec, pooling="mean" if mean else None)

    @classmethod
    def lora_targets(cls, model, spec) -> tuple[list[str] | None, list[str] | None]:
        """(target_modules, exclude_modules) when the user chose none: every attention and MLP projection of a
        BERT-style encoder, but not the pooler that mean pooling bypasses."""
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        if not {"query", "key", "value", "dense"} <= names:
            return None, None
        return ["query", "key", "value", "dense"], (["pooler.dense"] if spec.pooling == "mean" else None)

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

    def prepare_training(self, texts, labels, echo=print) -> None:
        """Mean pooling: start the head as a linear probe, the logistic regression fit on the frozen model's
        embeddings of the training texts, so step 0 already scores what an embedding classifier scores and
        LoRA refines it (measured: scripts/encoder_sweep_results.md)."""
        import torch

        from ..baseline import EmbeddingBaseline

        if self.spec.pooling != "mean" or len(set(labels)) < 2:
            return
        start = time.perf_counter()
        echo(f"head: fitting a linear probe on the frozen embeddings of {len(texts)} training texts ...")
        vectors = self.embeddings(texts) / HEAD_SCALE
        probe = EmbeddingBaseline(C=PROBE_C).fit_vectors(vectors, labels, self.spec.labels)
        weight = np.zeros((len(self.spec.labels), vectors.shape[1]), dtype=np.float32)
        bias = np.full(len(self.spec.labels), -10.0, dtype=np.float32)  # labels without examples: never first
        coef, intercept = probe._clf.coef_, probe._clf.intercept_
        if coef.shape[0] == 1:  # two classes: sklearn fits one row for the second class
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        weight[probe._columns], bias[probe._columns] = coef / HEAD_SCALE, intercept
        head = _trainable_head(self.model)
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
        echo(f"head: linear probe fit in {time.perf_counter() - start:.0f} s")

    def embeddings(self, texts, batch_size: int = 64) -> np.ndarray:
        """What the head reads for each text (mean pooling: the normalised mean embedding x HEAD_SCALE)."""
        import torch

        ids = self.prompt_ids(texts).ids
        body = _body(self.model)
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for batch in batches_by_length([len(x) for x in ids], batch_size):
                    inputs = right_pad(self.tokenizer, [ids[i] for i in batch], self.device)
                    pooled = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
                    out[batch] = pooled.float().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _body(model):
    base = _unwrap(model)
    return getattr(base, base.base_model_prefix)


def _trainable_head(model):
    """The classification Linear that training updates (PEFT keeps a trainable copy beside the original)."""
    head = _unwrap(model).classifier
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:
        return copies[head.active_adapter if isinstance(head.active_adapter, str) else head.active_adapter[0]]
    return head


_MASKS = threading.local()


def _install_mean_pooling(model) -> None:
    """Make the model's own forward classify from the attention-mask mean of its last hidden states, L2-
    normalised and x HEAD_SCALE: the pooler's output is replaced by a forward hook (its weights stay, unused),
    so training, DDP, merging and scoring all go through the unchanged ``model(...)`` call."""
    body = _body(model)
    pooler = getattr(body, "pooler", None)
    if pooler is None:
        raise LoratuneError("mean pooling needs the encoder's pooler output; use --set model.pooling=cls")
    if getattr(pooler, "_loratune_mean", False):
        return

    def remember_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        _MASKS.mask = mask

    def mean_pool(module, args, output):
        import torch

        hidden = args[0]
        mask = getattr(_MASKS, "mask", None)
        if mask is None:
            pooled = hidden.mean(1)
        else:
            weights = mask[:, : hidden.shape[1]].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) * HEAD_SCALE

    body.register_forward_pre_hook(remember_mask, with_kwargs=True)
    pooler.register_forward_hook(mean_pool)
    pooler._loratune_mean = True
