"""Decoder-only LMs (Llama, SmolLM2, GPT-2): prompt + label + EOS as one sequence.

The prompt is the user turn of the tokenizer's chat template when it has one (else prompt + answer cue); the
loss sees only the label and EOS. Scoring runs each prompt batch once (left-padded) and scores every label's
continuation from its KV cache; generation decodes only the new tokens (never the echoed prompt).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import numpy as np

from ..errors import LoratuneError
from ..prompt import ANSWER_CUE, Budgeted
from .common import IGNORE_INDEX, Encoded, Family, batches_by_length, left_pad

CHAT_TEMPLATE_SETTINGS = ("auto", "on", "off")


def resolve_chat_template(tokenizer, setting: str) -> bool:
    """Whether to wrap prompts in the tokenizer's chat template: ``auto`` when it has one, ``on``, ``off``."""
    if setting not in CHAT_TEMPLATE_SETTINGS:
        raise LoratuneError(f"prompt.chat_template must be auto, on or off, got {setting!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has_template:
        raise LoratuneError("prompt.chat_template=on but the tokenizer has no chat template; use auto or off")
    return has_template if setting == "auto" else setting == "on"


def causal_label_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """Each label's ids followed by EOS, so a label is told apart from a longer label it prefixes."""
    ids = [x + [tokenizer.eos_token_id] for x in tokenizer(list(labels), add_special_tokens=False)["input_ids"]]
    if len({tuple(x) for x in ids}) != len(ids):
        raise LoratuneError("two labels tokenize to the same token ids; rename one of them")
    return ids


def _cache_argument(model) -> str:
    """``cache`` in recent transformers 5 releases, ``past_key_values`` before (now a deprecated alias)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def causal_score_ids(
    model, pad_id: int, prompt_ids: Sequence[Sequence[int]], label_ids: list[list[int]], batch_size: int = 32, progress=None
) -> np.ndarray:
    """Summed log-probability of each label's ids (with EOS) after each prompt: an (N, L) array.

    The plain way, kept as the reference: each prompt batch runs once (left-padded), its KV cache is repeated
    per label and all label continuations run in one batched pass. The family scores with the shared-prefix
    scorer (:mod:`loratune.causal_scoring`) instead.
    """
    import torch

    device = next(model.parameters()).device
    n_labels, width = len(label_ids), max(len(x) for x in label_ids)
    targets = torch.full((n_labels, width), pad_id, dtype=torch.long)
    for i, ids in enumerate(label_ids):
        targets[i, : len(ids)] = torch.tensor(ids)
    target_mask = (torch.arange(width) < torch.tensor([len(x) for x in label_ids])[:, None]).to(device)
    targets = targets.to(device)
    cache_name = _cache_argument(model)
    out = np.zeros((len(prompt_ids), n_labels), dtype=np.float64)
    with torch.inference_mode():
        for batch in batches_by_length([len(x) for x in prompt_ids], batch_size, progress):
            b = len(batch)
            ids, mask, positions = (t.to(device) for t in left_pad([prompt_ids[i] for i in batch], pad_id))
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
                    attention_mask=torch.cat(
                        [mask.repeat_interleave(n_labels, 0), torch.ones(b * n_labels, width - 1, dtype=mask.dtype, device=device)], 1
                    ),
                    position_ids=(mask.sum(-1, keepdim=True) + steps).repeat_interleave(n_labels, 0),
                    use_cache=True,
                    **{cache_name: cache},
                ).logits
                logp = logits.float().log_softmax(-1).gather(-1, targets[:, 1:].repeat(b, 1).unsqueeze(-1)).squeeze(-1)
                sums = sums + (logp * target_mask[:, 1:].repeat(b, 1)).sum(-1).view(b, n_labels)
            out[batch] = sums.double().cpu().numpy()
    return out


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


class CausalFamily(Family):
    name = "causal"
    peft_task_type = "CAUSAL_LM"
    exports_gguf = True
    shifts_labels = True

    def __init__(self, model, tokenizer, spec):
        super().__init__(model, tokenizer, spec)
        self._scorer, self._prefix = None, None

    @classmethod
    def load_model(cls, source, config, tokenizer, labels, **kwargs):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
        except ValueError as exc:
            raise LoratuneError(
                f"cannot load {source!r} as a causal LM: {str(exc).splitlines()[0][:300]} (pass --family to override detection)"
            ) from None
        cls.prepare_tokenizer(tokenizer, model)
        return model

    @classmethod
    def prepare_tokenizer(cls, tokenizer, model) -> None:
        """Left padding (batched inference) and a pad token; many causal LMs (Llama, GPT-2) ship without one."""
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise LoratuneError("the tokenizer has neither a pad nor an EOS token; loratune needs an EOS token to end labels")
            # Reuse EOS rather than add a token: a new token would resize the embeddings, and the adapter would
            # then no longer fit the base model. Label EOS tokens stay in the loss (the collator never masks by id).
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def make_spec(cls, tokenizer, labels, *, chat_template="auto", input_only=None, **prompt):
        use = resolve_chat_template(tokenizer, chat_template) if isinstance(chat_template, str) else bool(chat_template)
        spec = super().make_spec(tokenizer, labels, input_only=input_only, **prompt)
        return dataclasses.replace(spec, chat_template=use, answer_cue=cls.answer_cue(use))

    @classmethod
    def answer_cue(cls, chat_template: bool) -> str:
        return "" if chat_template else ANSWER_CUE

    def _encode_prompts(self, texts) -> Budgeted:
        # A chat template writes its own BOS; plain prompts get the tokenizer's special tokens (Llama: BOS).
        out = self.spec.encode(self.tokenizer, texts, add_special_tokens=not self.spec.chat_template)
        eos = self.tokenizer.eos_token_id
        # Some tokenizers append EOS: it must not sit in the middle of prompt + label.
        return Budgeted([x[:-1] if x and x[-1] == eos else x for x in out.ids], out.cut)

    def encode(self, texts, targets=None) -> Encoded:
        prompts = self.prompt_ids(texts)
        if targets is None:
            return Encoded([{"input_ids": x, "attention_mask": [1] * len(x)} for x in prompts.ids], prompts.n_cut, 0, prompts.cut)
        eos, limit = self.tokenizer.eos_token_id, self.spec.max_target_length
        target_ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        features = []
        for p, t in zip(prompts.ids, target_ids):
            t = t[: limit - 1] + [eos]
            features.append({"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)), "labels": [IGNORE_INDEX] * len(p) + t})
        return Encoded(features, prompts.n_cut, sum(len(t) + 1 > limit for t in target_ids), prompts.cut)

    def collator(self, pad_to_multiple_of=None):
        return causal_collator(self.tokenizer, pad_to_multiple_of)

    def training_loss(self, model, inputs, weights=None):
        """The model's own loss, computed the fast way: the shared prefix (chat header, instruction, label list)
        runs once per batch with its graph kept, and the 49k-vocabulary head only at label positions. Equal to
        ``model(**inputs).loss`` and its gradients within fp32 rounding (tests/test_causal_training.py); rows that
        do not start with the prefix, and runs under gradient checkpointing, take the plain path."""
        from ..causal_scoring import shared_prefix_batch_loss

        return shared_prefix_batch_loss(
            model, self.shared_prefix(), inputs["input_ids"], inputs["attention_mask"], inputs["labels"], weights
        )

    def label_logprobs(self, texts, batch_size=32, progress=None):
        """Every prompt is the spec's shared prefix (chat header, instruction, label list) + its own suffix (text,
        cue): the prefix's KV is computed once per model state and the labels are scored over a trie."""
        from ..causal_scoring import CausalLabelScorer

        if self._scorer is None:
            self._scorer = CausalLabelScorer(self.model, causal_label_ids(self.tokenizer, self.spec.labels))
        ids, prefix = self.prompt_ids(texts).ids, self.shared_prefix()
        shared = [i for i, x in enumerate(ids) if x[: len(prefix)] == prefix and len(x) > len(prefix)]
        out = np.zeros((len(ids), len(self.spec.labels)))
        out[shared] = self._scorer.score(prefix, [ids[i][len(prefix) :] for i in shared], batch_size, progress)
        # A prompt whose text merged into the prefix's last token (rare with BPE) is scored the plain way.
        other = sorted(set(range(len(ids))) - set(shared))
        if other:
            out[other] = causal_score_ids(
                self.model,
                self.tokenizer.pad_token_id,
                [ids[i] for i in other],
                causal_label_ids(self.tokenizer, self.spec.labels),
                batch_size,
                progress,
            )
        return out

    def shared_prefix(self) -> list[int]:
        """The token ids every prompt starts with: the common prefix of two prompts with different texts."""
        if self._prefix is None:
            a, b = self.prompt_ids(["alpha", "zulu"]).ids
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            self._prefix = a[:n]
        return self._prefix

    def invalidate(self) -> None:
        if self._scorer is not None:
            self._scorer.invalidate()

    def generate(self, texts, batch_size=32, max_new_tokens=32, progress=None):
        import torch

        tokenizer, prompt_ids = self.tokenizer, self.prompt_ids(texts).ids
        out: list[str] = [""] * len(prompt_ids)
        with torch.inference_mode():
            for batch in batches_by_length([len(x) for x in prompt_ids], batch_size, progress):
                ids, mask, _ = left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id)
                generated = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for i, text in zip(batch, tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)):
                    out[i] = text.strip()
        return out
