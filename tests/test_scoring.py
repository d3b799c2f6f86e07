"""The fast scorer (label trie + tree attention) against the plain full-vocabulary reference."""

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import LABELS

from loratune.errors import LoratuneError
from loratune.families import Seq2SeqFamily
from loratune.families.seq2seq import label_token_ids, seq2seq_label_logprobs, seq2seq_label_logprobs_reference
from loratune.predict import Classifier
from loratune.prompt import PromptSpec, format_example
from loratune.scoring import T5LabelScorer, _logsumexp, build_label_trie, supports_fast_scoring

TEXTS = [
    "I was charged twice for my subscription.",
    "The app crashes on startup.",
    "Can't log in after resetting my password",
    "parcel never arrived",
    "Do you have a store in Leeds?",
    "hi",
    "Refund please, the invoice for March lists a plan I cancelled in January and nobody answers "
    "my emails about it, this is the third time I write",
]

LABEL_SETS = {
    "default": LABELS,
    "shared prefixes": ["bill", "billing", "billing account", "billing account closed", "account"],
    "multi-token": ["wrong item shipped", "app crashes on start", "refund"],
    "one label": ["billing"],
    "many labels": [
        f"topic {i} {w}"
        for i, w in enumerate(
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon".split()
        )
    ],
}


@pytest.fixture(scope="module")
def base(tiny_t5):
    from loratune.models import load_base

    loaded = load_base(str(tiny_t5))
    return loaded.model.eval(), loaded.tokenizer


@pytest.fixture(scope="module")
def lora_models(base):
    """An unmerged PEFT model with non-zero LoRA weights, and the same adapter merged into a copy."""
    from loratune.models import attach_lora

    model, _ = base
    torch.manual_seed(0)
    peft_model = attach_lora(copy.deepcopy(model), "seq2seq", r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    peft_model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no longer tied.*")  # flan-t5's head is untied anyway
        merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    return peft_model, merged


def prompts_for(labels):
    return [format_example(t, labels) for t in TEXTS]


@pytest.mark.parametrize("name", list(LABEL_SETS))
def test_fast_scores_match_the_reference(base, name):
    model, tokenizer = base
    labels = LABEL_SETS[name]
    prompts = prompts_for(labels)
    fast = seq2seq_label_logprobs(model, tokenizer, prompts, labels, batch_size=3)
    ref = seq2seq_label_logprobs_reference(model, tokenizer, prompts, labels, batch_size=3)
    assert fast.shape == ref.shape == (len(TEXTS), len(labels))
    np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.argsort(-fast, axis=1), np.argsort(-ref, axis=1))


def test_fast_scorer_is_exact_in_float64(base):
    # fp32 agreement could hide a small systematic error under rounding noise; in fp64 only rounding is left.
    model, tokenizer = base
    model64 = copy.deepcopy(model).double()
    labels = LABEL_SETS["shared prefixes"]
    fast = seq2seq_label_logprobs(model64, tokenizer, prompts_for(labels), labels)
    ref = seq2seq_label_logprobs_reference(model64, tokenizer, prompts_for(labels), labels)
    np.testing.assert_allclose(fast, ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("which", ["unmerged", "merged"])
def test_fast_scores_match_the_reference_with_lora(lora_models, base, which):
    _, tokenizer = base
    model = lora_models[0] if which == "unmerged" else lora_models[1]
    assert supports_fast_scoring(model)
    for labels in (LABELS, LABEL_SETS["shared prefixes"]):
        prompts = prompts_for(labels)
        fast = seq2seq_label_logprobs(model, tokenizer, prompts, labels)
        ref = seq2seq_label_logprobs_reference(model, tokenizer, prompts, labels)
        np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(fast.argmax(1), ref.argmax(1))


def test_lora_changes_the_scores(lora_models, base):
    # Guards the LoRA tests above: an adapter that did nothing would make them pass trivially.
    model, tokenizer = base
    prompts = prompts_for(LABELS)
    plain = seq2seq_label_logprobs(model, tokenizer, prompts, LABELS)
    adapted = seq2seq_label_logprobs(lora_models[0], tokenizer, prompts, LABELS)
    assert np.abs(plain - adapted).max() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_both_attention_implementations(base, attn):
    model, tokenizer = base
    model = copy.deepcopy(model)
    model.set_attn_implementation(attn)
    labels = LABEL_SETS["shared prefixes"]
    np.testing.assert_allclose(
        seq2seq_label_logprobs(model, tokenizer, prompts_for(labels), labels),
        seq2seq_label_logprobs_reference(model, tokenizer, prompts_for(labels), labels),
        atol=1e-4,
        rtol=0,
    )


def test_trie_shares_prefixes_and_indexes_every_label_token():
    # labels: [5, 1], [5, 6, 1], [5, 6, 7, 1], [8, 1] (1 = EOS); start token 0
    label_ids = [[5, 1], [5, 6, 1], [5, 6, 7, 1], [8, 1]]
    trie = build_label_trie(label_ids, start_token_id=0)
    # internal nodes: root, [5], [5, 6], [5, 6, 7], [8]
    assert trie.tokens.tolist() == [0, 5, 6, 7, 8]
    assert trie.depth.tolist() == [0, 1, 2, 3, 1]
    assert trie.visible[3].tolist() == [True, True, True, True, False]
    assert trie.visible[4].tolist() == [True, False, False, False, True]
    for j, ids in enumerate(label_ids):
        n = len(ids)
        assert trie.target[j, :n].tolist() == ids
        assert trie.mask[j].tolist() == [1.0] * n + [0.0] * (trie.mask.shape[1] - n)
        # the node scoring step t holds the label's first t tokens
        for t in range(n):
            node = trie.node[j, t].item()
            assert trie.depth[node].item() == t
            assert (t == 0 and node == 0) or trie.tokens[node].item() == ids[t - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clamped_logsumexp_equals_torchs(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 32128) * 40).to(dtype)  # spans ~300: most terms fall under the clamp
    logits[0, 0, :5] = 500.0  # several equal maxima
    torch.testing.assert_close(_logsumexp(logits), torch.logsumexp(logits, -1), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_scorer_projects_only_trie_nodes(base):
    model, tokenizer = base
    label_ids = label_token_ids(tokenizer, LABEL_SETS["shared prefixes"])
    scorer = T5LabelScorer(model, label_ids)
    proper_prefixes = {tuple(ids[:t]) for ids in label_ids for t in range(len(ids))}
    assert scorer.n_nodes == len(proper_prefixes) < sum(len(ids) for ids in label_ids)


def test_other_seq2seq_models_fall_back_to_the_reference(base):
    from transformers import BartConfig, BartForConditionalGeneration

    _, tokenizer = base
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            decoder_start_token_id=0,
        )
    ).eval()
    assert not supports_fast_scoring(bart)
    prompts = prompts_for(LABELS)
    np.testing.assert_array_equal(
        seq2seq_label_logprobs(bart, tokenizer, prompts, LABELS), seq2seq_label_logprobs_reference(bart, tokenizer, prompts, LABELS)
    )


def test_duplicate_label_tokens_are_rejected(base):
    model, tokenizer = base
    with pytest.raises(LoratuneError, match="same token ids"):
        seq2seq_label_logprobs(model, tokenizer, ["x"], ["billing", "billing"])


def test_classifier_predictions_unchanged(lora_models, base):
    _, tokenizer = base
    clf = Classifier(Seq2SeqFamily(lora_models[1], tokenizer, PromptSpec(LABELS)), batch_size=4)
    prompts = [clf.format(t) for t in TEXTS]
    ref_probs = np.exp(seq2seq_label_logprobs_reference(clf.model, tokenizer, prompts, LABELS))
    ref_probs /= ref_probs.sum(1, keepdims=True)
    predictions = clf.predict(TEXTS)
    assert [p.label for p in predictions] == [LABELS[i] for i in ref_probs.argmax(1)]
    np.testing.assert_allclose(clf.predict_proba(TEXTS), ref_probs, atol=1e-5)


def _fused_and_module_scores(model, tokenizer, labels):
    """(fused-path scores, module-path scores) from one scorer on the same padded batch."""
    from loratune.families.common import right_pad

    scorer = T5LabelScorer(model, label_token_ids(tokenizer, labels))
    assert scorer.fused is not None
    inputs = right_pad(tokenizer, tokenizer(prompts_for(labels))["input_ids"], "cpu")
    fused = scorer.score(inputs["input_ids"], inputs["attention_mask"])
    scorer.fused = None
    return fused, scorer.score(inputs["input_ids"], inputs["attention_mask"])


@pytest.mark.parametrize("absorbed", [True, False])
@pytest.mark.parametrize("name", ["default", "shared prefixes", "multi-token"])
def test_fused_path_matches_the_module_path(lora_models, base, name, absorbed, monkeypatch):
    from loratune import t5_fused

    seen = []
    monkeypatch.setattr(t5_fused, "absorbs", lambda *args: seen.append(args) or absorbed)  # both cross-attentions
    _, tokenizer = base
    fused, module = _fused_and_module_scores(lora_models[1], tokenizer, LABEL_SETS[name])
    torch.testing.assert_close(fused, module, rtol=0, atol=1e-4)
    assert torch.equal(fused.argmax(1), module.argmax(1)) and seen


def test_fused_int8_path_is_bit_identical_to_the_module_path(lora_models, base):
    from loratune.quantize import quantize_int8

    _, tokenizer = base
    int8 = quantize_int8(copy.deepcopy(lora_models[1]))
    fused, module = _fused_and_module_scores(int8, tokenizer, LABEL_SETS["shared prefixes"])
    assert torch.equal(fused, module)


def test_fused_path_only_for_plain_or_int8_linear_layers(lora_models):
    from loratune.t5_fused import fused_t5

    peft_model, merged = lora_models
    assert fused_t5(peft_model.base_model.model) is None  # unmerged LoRA layers keep the module path
    assert fused_t5(merged) is fused_t5(merged)  # built once per model


def test_absorbed_cross_attention_only_where_it_costs_less():
    from loratune.t5_fused import absorbs

    assert absorbs(6, 75, 64)  # 5 one-token labels after a ticket: 6 trie nodes
    assert not absorbs(300, 900, 64)  # 151 labels: hundreds of nodes


def test_fp16_keeps_the_module_path(base):
    from loratune.scoring import T5LabelScorer

    model, _ = base
    half = copy.deepcopy(model).to(torch.float16).eval()
    assert T5LabelScorer(half, [[5, 1], [6, 1]]).fused is None  # transformers' T5 clamps fp16 overflow; the fused path does not
    assert T5LabelScorer(half.to(torch.bfloat16), [[5, 1], [6, 1]]).fused is not None  # bf16 has fp32's range
    assert T5LabelScorer(model, [[5, 1], [6, 1]]).fused is not None


def test_fused_weights_follow_a_cast_in_place(base):
    from loratune.t5_fused import fused_t5

    model = copy.deepcopy(base[0])
    before = fused_t5(model)
    model.to(torch.bfloat16)  # same parameters, new storage and dtype
    after = fused_t5(model)
    assert after is not before and after.cross_kv.weight.dtype == torch.bfloat16


def test_fused_weights_follow_a_weight_change(base):
    model, tokenizer = base
    model = copy.deepcopy(model)
    before = _fused_and_module_scores(model, tokenizer, LABELS)[0]
    with torch.no_grad():
        model.get_encoder().block[0].layer[0].SelfAttention.k.weight.mul_(3.0)
    fused, module = _fused_and_module_scores(model, tokenizer, LABELS)
    assert not torch.allclose(before, fused)
    torch.testing.assert_close(fused, module, rtol=0, atol=1e-4)


def test_gated_gelu_equals_torchs_tanh_gelu_times_the_gate():
    from loratune.t5_fused import _gated_gelu

    torch.manual_seed(0)
    x, gate = torch.randn(2, 64, 100) * 4, torch.randn(2, 64, 100)
    ref = torch.nn.functional.gelu(x, approximate="tanh") * gate
    torch.testing.assert_close(_gated_gelu(x, gate), ref, rtol=1e-6, atol=1e-6)
