import numpy as np
import pytest

from loratune.errors import LoratuneError
from loratune.families.seq2seq import seq2seq_label_logprobs
from loratune.predict import INVALID, Classifier

TEXTS = [
    "I was charged twice for my subscription.",
    "The app crashes on startup.",
    "Can't log in after resetting my password",
    "parcel never arrived",
    "Do you have a store in Leeds?",
]


@pytest.fixture(scope="module")
def tuned(trained):
    return Classifier.from_pretrained(trained.adapter_dir)


def test_score_mode_always_returns_a_label_with_probabilities_summing_to_one(tuned):
    predictions = tuned.predict(TEXTS)
    assert len(predictions) == len(TEXTS)
    for p in predictions:
        assert p.label in tuned.labels
        assert set(p.scores) == set(tuned.labels)
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-6)
        assert p.label == max(p.scores, key=p.scores.get)
    probs = tuned.predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), len(tuned.labels))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_generate_mode_returns_raw_text_and_maps_it(tuned):
    for p in tuned.predict(TEXTS, mode="generate"):
        assert p.scores is None and isinstance(p.raw, str)
        assert p.label == (p.raw.strip().lower() if p.raw.strip().lower() in tuned.labels else INVALID)


def test_generated_text_maps_case_and_space_insensitively(tuned):
    assert tuned._to_label("  BILLING ") == "billing"
    assert tuned._to_label("billing.") == INVALID
    assert tuned._to_label("Customer message: I was charged twice") == INVALID


def test_random_base_model_generates_no_valid_label(trained, tuned):
    base = Classifier.from_pretrained(tuned.meta.base_model, labels=tuned.labels, mode="generate")
    assert all(p.label == INVALID for p in base.predict(TEXTS))


def test_formatted_prompt_and_raw_text_give_the_same_prediction(tuned):
    from loratune import format_example
    from loratune.families.common import softmax

    prompts = [format_example(t, tuned.labels, tuned.spec.task, tuned.spec.input_name) for t in TEXTS]
    assert [tuned.format(t) for t in TEXTS] == prompts
    by_prompt = softmax(seq2seq_label_logprobs(tuned.model, tuned.tokenizer, prompts, tuned.labels))
    np.testing.assert_allclose(tuned.predict_proba(TEXTS), by_prompt, atol=1e-9)


def test_merged_and_unmerged_adapters_score_alike(trained, tuned):
    unmerged = Classifier.from_pretrained(trained.adapter_dir, merge=False)
    np.testing.assert_allclose(tuned.score(TEXTS), unmerged.score(TEXTS), atol=1e-4)


def test_batch_size_and_order_do_not_change_scores(trained, tuned):
    one = Classifier.from_pretrained(trained.adapter_dir, batch_size=1)
    np.testing.assert_allclose(one.predict_proba(TEXTS), tuned.predict_proba(TEXTS), atol=1e-5)
    np.testing.assert_allclose(tuned.predict_proba(TEXTS[::-1])[::-1], tuned.predict_proba(TEXTS), atol=1e-5)


def test_score_is_the_sum_of_label_token_log_probs(tuned):
    # Independent check with a plain teacher-forced forward pass per (text, label).
    import torch

    prompt = tuned.format(TEXTS[0])
    got = seq2seq_label_logprobs(tuned.model, tuned.tokenizer, [prompt], tuned.labels)[0]
    enc = tuned.tokenizer([prompt], return_tensors="pt")
    for j, label in enumerate(tuned.labels):
        target = tuned.tokenizer([label], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = tuned.model(**enc, labels=target).logits
        expected = logits.log_softmax(-1).gather(-1, target[..., None]).sum().item()
        assert got[j] == pytest.approx(expected, abs=1e-4)


def test_adapter_labels_cannot_be_overridden(trained):
    with pytest.raises(LoratuneError, match="was trained on labels"):
        Classifier.from_pretrained(trained.adapter_dir, labels=["spam", "ham"])


def test_empty_input_gives_empty_output(tuned):
    assert tuned.predict([]) == []
    assert tuned.predict_proba([]).shape == (0, len(tuned.labels))
