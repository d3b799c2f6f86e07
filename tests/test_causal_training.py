"""Causal training with the shared prefix run once per batch: the loss and the LoRA gradients equal the model's own.

The checks cover what the fast path has to get right: right padding, prompts whose text was cut to fit
``max_length``, a row that does not start with the shared prefix (plain path, weighted in), gradient
checkpointing (which drops caches: plain path), and gradient accumulation through the real Trainer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LABELS, tiny_config

from loratune import causal_scoring
from loratune.families import CausalFamily

MAX_LENGTH = 112
"""Small enough that the longer demo tickets get their middle cut (instruction and labels never are)."""


@pytest.fixture(scope="module")
def causal(tiny_causal):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal)
    CausalFamily.prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def _lora_family(causal, seed=0):
    """A family over a PEFT model whose LoRA weights are random (both A and B), so every gradient is non-zero."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = causal
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(model), config).train()
    spec = CausalFamily.make_spec(tokenizer, LABELS, chat_template="on", max_length=MAX_LENGTH)
    return CausalFamily(lora, tokenizer, spec)


def _batch(family, rows):
    texts, targets = [r["text"] for r in rows], [r["label"] for r in rows]
    encoded = family.encode(texts, targets)
    return encoded, family.collator()(encoded.features)


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _assert_same(ours, theirs):
    (a_loss, a_grads), (b_loss, b_grads) = ours, theirs
    assert abs(a_loss - b_loss) < 1e-5
    assert len(a_grads) == len(b_grads) > 0
    for a, b in zip(a_grads, b_grads):
        assert a.abs().max() > 0  # random A and B: every LoRA matrix gets a gradient
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.fixture
def shared_calls(monkeypatch):
    """Rows sent through the shared-prefix loss, per call (a spy: the real function still runs)."""
    calls = []
    real = causal_scoring.shared_prefix_lm_loss

    def spy(model, prefix_ids, input_ids, *args):
        calls.append(len(input_ids))
        return real(model, prefix_ids, input_ids, *args)

    monkeypatch.setattr(causal_scoring, "shared_prefix_lm_loss", spy)
    return calls


def test_training_loss_equals_model_loss_with_padding_and_cut_prompts(causal, demo_rows, shared_calls):
    family = _lora_family(causal)
    rows = sorted(demo_rows["train"][:40], key=lambda r: len(r["text"]))
    rows = rows[:3] + rows[-3:]  # short and long tickets: padding, and the long ones cut
    encoded, batch = _batch(family, rows)
    assert encoded.n_truncated > 0 and (batch["attention_mask"] == 0).any()
    model = family.model

    ours = _loss_and_grads(model, lambda: family.training_loss(model, batch))
    assert shared_calls == [len(rows)]  # one prefix forward for the whole batch
    _assert_same(ours, _loss_and_grads(model, lambda: model(**batch).loss))


def test_rows_without_the_prefix_take_the_plain_path_and_are_weighted_in(causal, demo_rows, shared_calls):
    family = _lora_family(causal, seed=1)
    encoded, _ = _batch(family, demo_rows["train"][:5])
    features = encoded.features
    odd = dict(features[2])  # a prompt that does not start with the shared prefix (its first token dropped)
    odd = {k: list(v[1:]) for k, v in odd.items()}
    features = [*features[:2], odd, *features[3:]]
    batch = family.collator()(features)
    model = family.model

    ours = _loss_and_grads(model, lambda: family.training_loss(model, batch))
    assert shared_calls == [len(features) - 1]
    _assert_same(ours, _loss_and_grads(model, lambda: model(**batch).loss))


def test_gradient_checkpointing_falls_back_to_the_plain_path(causal, demo_rows, shared_calls):
    family = _lora_family(causal, seed=2)
    _, batch = _batch(family, demo_rows["train"][:4])
    model = family.model
    expected = _loss_and_grads(model, lambda: model(**batch).loss)
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()
    ours = _loss_and_grads(model, lambda: family.training_loss(model, batch))
    assert shared_calls == []  # checkpointing would drop the prefix cache
    _assert_same(ours, expected)
    with pytest.raises(ValueError, match="checkpointing"):
        prefix = family.shared_prefix()
        suffix = {k: v[:, len(prefix) :] for k, v in batch.items()}
        causal_scoring.shared_prefix_lm_loss(model, prefix, suffix["input_ids"], suffix["attention_mask"], suffix["labels"])


def test_gradient_accumulation_over_micro_batches_equals_model_loss(causal, demo_rows):
    family = _lora_family(causal, seed=3)
    model = family.model
    micro = [_batch(family, demo_rows["train"][i : i + 3])[1] for i in (0, 3)]

    def accumulated(loss_of):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro:  # what the Trainer does with grad_accum=2: backward of each micro-batch's mean / 2
            loss = loss_of(batch) / len(micro)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    _assert_same(accumulated(lambda b: family.training_loss(model, b)), accumulated(lambda b: model(**b).loss))


@pytest.mark.integration
def test_trainer_with_grad_accumulation_learns_the_same_adapter_as_the_model_loss(
    tiny_causal, small_data, tmp_path, monkeypatch, shared_calls
):
    """Two real runs (grad_accum=2, no dropout): the family's loss vs the model's own (training_loss -> None)."""
    from safetensors.torch import load_file

    from loratune.train import train

    def run(name):
        cfg = tiny_config(tiny_causal, small_data, tmp_path / name, max_steps=3, batch_size=4, grad_accum=2, eval_steps=3)
        cfg.lora.dropout = 0.0
        result = train(cfg, echo=lambda *a, **k: None)
        return result.metrics, load_file(result.adapter_dir / "adapter_model.safetensors")

    fast_metrics, fast = run("fast")
    # 3 steps x 2 micro-batches of 4 through the shared prefix, then the validation loss (60 examples, batch 32).
    assert shared_calls[:6] == [4] * 6 and len(shared_calls) == 8
    monkeypatch.setattr(CausalFamily, "training_loss", lambda self, model, inputs, weights=None: None)
    plain_metrics, plain = run("plain")
    assert fast.keys() == plain.keys() and fast
    for k in fast:
        torch.testing.assert_close(fast[k], plain[k], atol=1e-5, rtol=1e-4)
    assert fast_metrics["loss_history"] == pytest.approx(plain_metrics["loss_history"], abs=1e-4)
    assert fast_metrics["val_loss"] == pytest.approx(plain_metrics["val_loss"], abs=1e-5)


def test_training_loss_under_autocast_matches_the_model_loss(causal, demo_rows):
    """Mixed precision (what bf16 training runs under): the prefix path's mask follows the autocast dtype."""
    family = _lora_family(causal, seed=4)
    _, batch = _batch(family, demo_rows["train"][:4])
    model = family.model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = family.training_loss(model, batch), model(**batch).loss
    assert torch.isfinite(ours) and abs(ours.item() - theirs.item()) < 0.05 * abs(theirs.item())


def test_class_weighted_loss_equals_the_weighted_model_loss(causal, demo_rows, shared_calls):
    """train.class_weights: per-row weights, with a row off the prefix path, against forward_loss (the DDP way)."""
    family = _lora_family(causal, seed=5)
    encoded, _ = _batch(family, demo_rows["train"][:5])
    features = [*encoded.features[:4], {k: list(v[1:]) for k, v in encoded.features[4].items()}]
    batch = family.collator()(features)
    weights = torch.tensor([0.5, 2.0, 1.0, 1.5, 3.0])
    model = family.model

    ours = _loss_and_grads(model, lambda: family.training_loss(model, batch, weights))
    assert shared_calls == [4]
    _assert_same(ours, _loss_and_grads(model, lambda: family.forward_loss(model, batch, weights)))
