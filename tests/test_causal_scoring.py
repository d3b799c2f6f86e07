"""The shared-prefix causal scorer and the label-position loss agree with the naive definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LABELS

from loratune.causal_scoring import (
    CausalLabelScorer,
    causal_lm_loss,
    naive_label_logprobs,
    shared_prefix_lm_loss,
    split_shared_prefix,
)
from loratune.families import CausalFamily
from loratune.families.causal import causal_collator, causal_label_ids

# Multi-token labels that share token prefixes with each other, so the trie has shared inner nodes.
MANY_LABELS = [*LABELS, "billing dispute", "billing refund", "technical issue", "account locked", "other question"]
N_EXAMPLES = 256
"""The agreement target (issue 15): 256 examples run under the `slow` marker (-m slow), 32 by default."""
SIZES = [32, pytest.param(N_EXAMPLES, marks=pytest.mark.slow)]


def family(tokenizer, labels) -> CausalFamily:
    """The causal family's prompts (chat template, 512-token budget) without a model: encoding only."""
    spec = CausalFamily.make_spec(tokenizer, labels, chat_template="on", max_length=512)
    return CausalFamily(None, tokenizer, spec)


@pytest.fixture(scope="module")
def causal(tiny_causal):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(demo_rows, causal):
    """Token ids of N_EXAMPLES chat-template prompts (instruction + label list + text + assistant header)."""
    _, tokenizer = causal
    texts = [r["text"] for r in demo_rows["train"][:N_EXAMPLES]]
    return family(tokenizer, MANY_LABELS).prompt_ids(texts).ids


def _lora(model, seed=0):
    """A PEFT LoRA wrapper whose adapter weights are random, so it changes every score."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), config).eval()


def _assert_same_scores(fast: np.ndarray, naive: np.ndarray, n: int):
    assert fast.shape == naive.shape == (n, len(MANY_LABELS))
    np.testing.assert_allclose(fast, naive, atol=1e-4, rtol=1e-5)
    # Full ranking of every label, for every example (not just top-1).
    assert (np.argsort(fast, 1) == np.argsort(naive, 1)).mean() == 1.0


def test_split_shared_prefix_keeps_ids_exact(prompts):
    prefix, suffixes = split_shared_prefix(prompts)
    assert len(prefix) > 50  # the instruction and the label list
    assert all(len(s) >= 1 and prefix + s == p for s, p in zip(suffixes, prompts))
    assert split_shared_prefix([[1, 2, 3]]) == ([1, 2], [[3]])  # one prompt: everything but the last token


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("wrapped", [False, True], ids=["base", "peft-lora"])
def test_scorer_matches_naive(causal, prompts, wrapped, n):
    model, tokenizer = causal
    if wrapped:
        model = _lora(model)
    label_ids = causal_label_ids(tokenizer, MANY_LABELS)
    assert max(map(len, label_ids)) >= 3  # multi-token labels reach the trie's inner nodes
    scorer = CausalLabelScorer(model, label_ids)
    assert scorer.n_nodes < sum(map(len, label_ids))  # shared label prefixes are computed once
    prefix, suffixes = split_shared_prefix(prompts[:n])
    fast = scorer.score(prefix, suffixes, batch_size=32)  # suffixes of different lengths share each batch
    _assert_same_scores(fast, naive_label_logprobs(model, prompts[:n], label_ids), n)


def test_scorer_batch_size_and_empty_prefix_do_not_change_scores(causal, prompts):
    model, tokenizer = causal
    scorer = CausalLabelScorer(model, causal_label_ids(tokenizer, MANY_LABELS))
    prefix, suffixes = split_shared_prefix(prompts[:12])
    by_32 = scorer.score(prefix, suffixes, batch_size=32)
    np.testing.assert_allclose(scorer.score(prefix, suffixes, batch_size=1), by_32, atol=2e-5)
    # No shared prefix at all: the whole prompt is the suffix.
    np.testing.assert_allclose(scorer.score([], prompts[:12], batch_size=5), by_32, atol=2e-5)


def test_prefix_kv_is_cached_until_invalidated(causal, prompts):
    model, tokenizer = causal
    lora = _lora(model, seed=1)
    scorer = CausalLabelScorer(lora, causal_label_ids(tokenizer, MANY_LABELS))
    prefix, suffixes = split_shared_prefix(prompts[:8])
    before = scorer.score(prefix, suffixes)
    kv = scorer.prefix_kv(prefix)
    assert scorer.prefix_kv(prefix)[0][0] is kv[0][0]  # same prefix: not recomputed
    with lora.disable_adapter():
        stale = scorer.score(prefix, suffixes)  # prefix KV still from the adapter
        scorer.invalidate()
        base = scorer.score(prefix, suffixes)
    label_ids = causal_label_ids(tokenizer, MANY_LABELS)
    np.testing.assert_allclose(base, naive_label_logprobs(model, prompts[:8], label_ids), atol=1e-4)
    assert np.abs(stale - base).max() > 1e-3 and np.abs(before - base).max() > 1e-3
    assert scorer.prefix_kv(prefix[:-1])[0][0] is not kv[0][0]  # a different prefix replaces the cache


@pytest.mark.parametrize("labels", [["billing dispute"], MANY_LABELS], ids=["one-label", "shared-prefixes"])
def test_grouped_query_path_matches_naive_with_padding_both_sides(causal, prompts, labels, monkeypatch):
    """The tiny model has 4 query heads on 2 KV heads: SDPA takes ``enable_gqa`` instead of copying KV heads, the
    switch is gone after the call, and scores equal the right-padded naive scorer, the left-padded plain scorer
    and the scorer without the switch, for suffixes of different lengths in one batch."""
    import contextlib
    import os

    import torch.nn.functional as F

    import loratune.causal_scoring as cs
    from loratune.families.causal import causal_score_ids

    model, tokenizer = causal
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    label_ids = causal_label_ids(tokenizer, labels)
    picked = sorted(prompts[:40], key=len)
    picked = picked[:3] + picked[-3:]  # the shortest and longest prompts: padding in every batch
    prefix, suffixes = split_shared_prefix(picked)
    assert len({len(s) for s in suffixes}) > 1
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    fast = CausalLabelScorer(model, label_ids).score(prefix, suffixes, batch_size=6)
    assert seen and all(seen) and cs._FORCE_GQA not in os.environ
    monkeypatch.setattr(cs, "_grouped_query_sdpa", lambda config, device: contextlib.nullcontext())
    copied = CausalLabelScorer(model, label_ids).score(prefix, suffixes, batch_size=6)
    assert not seen[-1]
    np.testing.assert_allclose(fast, copied, atol=2e-5)
    naive = naive_label_logprobs(model, picked, label_ids)  # right padding
    left = causal_score_ids(model, tokenizer.pad_token_id or tokenizer.eos_token_id, picked, label_ids, batch_size=6)
    for reference in (naive, left):
        np.testing.assert_allclose(fast, reference, atol=1e-4, rtol=1e-5)
        assert (np.argsort(fast, 1) == np.argsort(reference, 1)).all()


def test_scorer_rejects_bad_inputs(causal):
    model, _ = causal
    with pytest.raises(ValueError, match="same token ids"):
        CausalLabelScorer(model, [[5, 2], [5, 2]])
    scorer = CausalLabelScorer(model, [[5, 2], [6, 2]])
    with pytest.raises(ValueError, match="at least one token"):
        scorer.score([1, 2, 3], [[4], []])


@pytest.mark.parametrize("wrapped", [False, True], ids=["base", "peft-lora"])
def test_causal_lm_loss_equals_model_loss_and_gradients(causal, demo_rows, wrapped):
    model, tokenizer = causal
    model = _lora(model) if wrapped else __import__("copy").deepcopy(model)
    model.train()
    rows = demo_rows["train"][:6]
    encoded = family(tokenizer, LABELS).encode([r["text"] for r in rows], [r["label"] for r in rows])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = causal_collator(tokenizer)(encoded.features)  # right-padded, prompt masked with -100
    assert (batch["attention_mask"] == 0).any()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    theirs = model(**batch).loss
    assert abs(ours.item() - theirs.item()) < 1e-5
    for a, b in zip(grads(ours), grads(model(**batch).loss)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("wrapped", [False, True], ids=["base", "peft-lora"])
def test_shared_prefix_loss_equals_full_prompt_loss_and_gradients(causal, demo_rows, wrapped):
    model, tokenizer = causal
    model = _lora(model) if wrapped else __import__("copy").deepcopy(model)
    model.train()
    rows = demo_rows["train"][:6]
    texts = [r["text"] for r in rows]
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    full = causal_collator(tokenizer)(family(tokenizer, LABELS).encode(texts, [r["label"] for r in rows]).features)
    prompt_ids = family(tokenizer, LABELS).prompt_ids(texts).ids
    prefix, _ = split_shared_prefix(prompt_ids)
    n = len(prefix)
    suffix = {k: v[:, n:] for k, v in full.items()}  # every row starts with the same prefix ids

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours, our_grads = loss_and_grads(
        lambda: shared_prefix_lm_loss(model, prefix, suffix["input_ids"], suffix["attention_mask"], suffix["labels"])
    )
    theirs, their_grads = loss_and_grads(lambda: model(**full).loss)
    assert abs(ours - theirs) < 1e-5
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="first suffix token"):
        shared_prefix_lm_loss(model, prefix, suffix["input_ids"], suffix["attention_mask"], suffix["input_ids"])
