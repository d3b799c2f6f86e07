"""The embedding baseline: frozen sentence embeddings + logistic regression, and its metrics row."""

from __future__ import annotations

import numpy as np
import pytest

from loratune.baseline import EmbeddingBaseline, embed_texts, run_baseline
from loratune.data import Example


def clusters(labels, per=10, dim=8, seed=0):
    """Unit vectors around one random centre per label: separable, like good sentence embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(labels), dim)) * 3
    x = np.concatenate([c + rng.normal(scale=0.3, size=(per, dim)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [label for label in labels for _ in range(per)]


def test_probability_columns_follow_the_given_label_order_and_unseen_labels_get_zero():
    x, y = clusters(["zeta", "alpha", "mid"])
    base = EmbeddingBaseline().fit_vectors(x, y, labels=["mid", "never", "zeta", "alpha"])
    probs = base.predict_proba_vectors(x)
    assert probs.shape == (len(x), 4)
    assert np.allclose(probs.sum(1), 1.0)
    assert np.all(probs[:, 1] == 0)
    assert base.labels_from_proba(probs) == y


def test_multi_label_uses_one_vs_rest_with_a_half_threshold():
    x, single = clusters(["a", "b", "c"])
    y = [(s,) if s != "c" else ("a", "c") for s in single]
    base = EmbeddingBaseline(multi_label=True).fit_vectors(x, y, labels=["a", "b", "c"])
    probs = base.predict_proba_vectors(x)
    assert probs.shape == (len(x), 3) and probs.max() <= 1 and probs.min() >= 0
    assert base.labels_from_proba(probs) == [tuple(sorted(t)) for t in y]


def test_embeddings_are_unit_length_and_independent_of_batching(tiny_encoder):
    texts = ["short", "a much longer text about a refund for my order", "my parcel", "login fails"]
    one = embed_texts(texts, str(tiny_encoder), batch_size=1)
    all_at_once = embed_texts(texts, str(tiny_encoder), batch_size=4)
    assert np.allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    assert np.allclose(one, all_at_once, atol=1e-5)  # mean pooling ignores padding


def test_run_baseline_row_scores_its_own_predictions(tiny_encoder, demo_rows):
    train = [Example(r["text"], r["label"]) for r in demo_rows["train"][:120]]
    test = [Example(r["text"], r["label"]) for r in demo_rows["test"][:40]]
    labels = ["billing", "technical", "account", "shipping", "other"]
    row = run_baseline(train, test, labels, model_path=str(tiny_encoder))
    pred = EmbeddingBaseline().fit([e.text for e in train], [e.label for e in train], str(tiny_encoder), labels=labels)
    expected = np.mean([p == e.label for p, e in zip(pred.predict([e.text for e in test]), test)])
    assert row["accuracy"] == pytest.approx(expected)
    assert row["n"] == 40 and list(row["per_label"]) == labels
    assert row["fit_seconds"] > 0 and row["examples_per_s"] > 0 and row["embedding_model"] == str(tiny_encoder)
    # With a fallback label, the same abstain metrics as an adapter's row, from the same predictions.
    predicted = pred.predict([e.text for e in test])
    scoped = run_baseline(train, test, labels, model_path=str(tiny_encoder), fallback_label="other")
    gold_in = [(p, e.label) for p, e in zip(predicted, test) if e.label != "other"]
    assert scoped["in_scope_accuracy"] == pytest.approx(np.mean([p == g for p, g in gold_in]))
    assert scoped["abstain_rate"] == pytest.approx(np.mean([p == "other" for p in predicted]))
