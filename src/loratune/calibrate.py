"""Decisions tuned on validation data and saved with the adapter (``loratune calibrate``).

* multi-label: the probability threshold that maximises micro-F1;
* single-label: the confidence below which a prediction abstains to a fallback label (CLINC150's ``oos``), for a
  target in-scope accuracy or the best macro-F1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .adapter import AdapterMeta
from .data import Example, example_labels, normalize_label, some_labels, spelled_as
from .errors import LoratuneError
from .evaluate import abstain_metrics, apply_abstain
from .predict import DEFAULT_THRESHOLD, Classifier, decide_labels


def split_val_of(classifier: Classifier, cfg) -> tuple[str, list[Example]]:
    """The validation examples an adapter was chosen on when they were split from its training file: the same
    seeded split of the same file, refused when the file is gone or changed."""
    import copy
    import hashlib

    from .data import load_splits

    recorded, trained = classifier.meta.config, (classifier.meta.data or {}).get("train") or {}
    path = trained.get("path")
    if (classifier.meta.data or {}).get("val") != "split from train" or not path or not Path(path).is_file():
        raise LoratuneError("no validation file recorded with the adapter and its training file is not at hand: pass --val FILE")
    if hashlib.sha256(Path(path).read_bytes()).hexdigest() != trained.get("sha256"):
        raise LoratuneError(f"{path} changed since training, so its validation split cannot be rebuilt: pass --val FILE")
    data = copy.deepcopy(cfg.data)
    data.train, data.val, data.labels, data.multi_label = path, None, list(classifier.labels), classifier.multi_label
    data.val_fraction = recorded.get("data", {}).get("val_fraction", data.val_fraction)
    for key in ("text_field", "label_field"):
        setattr(data, key, classifier.spec.fields.get(key) or getattr(data, key))
    splits = load_splits(data, seed=recorded.get("train", {}).get("seed", 42))
    return f"{path} (validation split)", splits.val


# --------------------------------------------------------------------------------------------------
# Multi-label threshold calibration.

THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)


def micro_f1(gold: np.ndarray, chosen: np.ndarray) -> float:
    tp = float((gold & chosen).sum())
    wrong = float((gold ^ chosen).sum())
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def calibrate_threshold(probs: np.ndarray, gold: np.ndarray, allow_empty: bool = False) -> tuple[float, float]:
    """The threshold (0.01 to 0.99) whose decisions maximise micro-F1, ties going to the one nearest 0.5.

    ``probs`` are per-label probabilities and ``gold`` the true (N, L) indicator matrix; decisions follow
    :func:`~loratune.predict.decide_labels`, so the at-least-one-label rule is part of what is tuned.
    Returns (threshold, micro-F1 at it).
    """
    gold = np.asarray(gold, dtype=bool)
    scored = [(micro_f1(gold, decide_labels(probs, t, allow_empty)), -abs(t - DEFAULT_THRESHOLD), float(t)) for t in THRESHOLD_GRID]
    best, _, threshold = max(scored)
    return threshold, best


def calibrate(classifier: Classifier, examples: Sequence[Example], progress=None) -> dict:
    """Tune a multi-label classifier's threshold on labelled (validation) examples; returns what was found."""
    if not classifier.multi_label:
        raise LoratuneError(f"calibrate tunes the multi-label decision threshold; {classifier.name} is single-label")
    probs = classifier.predict_proba([e.text for e in examples], progress=progress)
    gold = np.array([[label in example_labels(e) for label in classifier.labels] for e in examples])
    allow_empty = classifier.settings.allow_empty
    threshold, best = calibrate_threshold(probs, gold, allow_empty)
    return {
        "threshold": threshold,
        "micro_f1": best,
        "allow_empty": allow_empty,
        "n": len(examples),
        "micro_f1_at_default": micro_f1(gold, decide_labels(probs, DEFAULT_THRESHOLD, allow_empty)),
        "previous_threshold": classifier.threshold,
    }


def write_threshold(adapter_dir: str | Path, calibration: dict, dataset: str) -> Path:
    """Record a calibrated threshold in the adapter's ``loratune.json`` (rewritten atomically); returns its path."""
    meta = AdapterMeta.read(adapter_dir)
    meta.threshold = calibration["threshold"]
    meta.calibration = {**calibration, "data": dataset, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return meta.write(adapter_dir)


CONFIDENCE_GRID = np.round(np.arange(0.0, 1.0, 0.01), 2)


def calibrate_confidence(
    probs: np.ndarray, gold_idx: Sequence[int], labels: Sequence[str], fallback_label: str, target_in_scope_accuracy: float | None = None
) -> tuple[float, dict]:
    """Pick ``min_confidence`` (0.00 to 0.99) on validation data; returns (threshold, metrics at it).

    With a target: the highest threshold whose in-scope accuracy still reaches it (the most out-of-scope recall
    the target allows; needs the fallback label in the gold data); ``target_met`` is False, and the threshold 0,
    when even no abstaining misses it. Without: the threshold with the best macro-F1 (over ``labels``), ties to
    the lower one. ``probs`` are (n, len(labels)) probabilities, ``gold_idx`` indices into ``labels``.
    """
    from sklearn.metrics import f1_score

    labels = list(labels)
    probs = np.asarray(probs)
    gold = [labels[i] for i in gold_idx]
    top = [labels[j] for j in probs.argmax(1)]
    confidence = probs.max(1)
    if target_in_scope_accuracy is not None and fallback_label not in gold:
        raise LoratuneError(f"calibrating for an in-scope accuracy needs validation examples labelled {fallback_label!r}")

    def metrics_at(threshold: float) -> dict:
        pred = apply_abstain(top, confidence, threshold, fallback_label)
        return {
            "threshold": float(threshold),
            "n": len(gold),
            "accuracy": float(np.mean([p == g for p, g in zip(pred, gold)])) if gold else 0.0,
            "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
            **abstain_metrics(gold, pred, fallback_label),
        }

    scored = [metrics_at(t) for t in CONFIDENCE_GRID]
    if target_in_scope_accuracy is not None:
        reaching = [m for m in scored if m["in_scope_accuracy"] >= target_in_scope_accuracy]
        best = reaching[-1] if reaching else scored[0]
        best = {**best, "target_in_scope_accuracy": target_in_scope_accuracy, "target_met": bool(reaching)}
    else:
        best = max(scored, key=lambda m: (m["macro_f1"], -m["threshold"]))
    return best["threshold"], best


def calibrate_abstain(
    classifier: Classifier, examples: Sequence[Example], fallback_label: str, target_in_scope_accuracy: float | None = None, progress=None
) -> dict:
    """Single-label: pick ``min_confidence`` on labelled (validation) examples; returns what was found."""
    shown_as = spelled_as(classifier.labels)  # labels compare case-insensitively: "OOS" is "oos"
    if normalize_label(fallback_label) not in shown_as:  # before scoring every example, not after
        raise LoratuneError(f"--fallback-label {fallback_label!r} is not one of the adapter's labels ({some_labels(classifier.labels)})")
    fallback_label = shown_as[normalize_label(fallback_label)]
    unknown = next((e for e in examples if normalize_label(e.label) not in shown_as), None)
    if unknown is not None:
        raise LoratuneError(f"{unknown.source}:{unknown.line}: label {unknown.label!r} is not one of the adapter's labels")
    probs = classifier.predict_proba([e.text for e in examples], progress=progress)
    position = {label: i for i, label in enumerate(classifier.labels)}
    gold = [position[shown_as[normalize_label(e.label)]] for e in examples]
    _, found = calibrate_confidence(probs, gold, classifier.labels, fallback_label, target_in_scope_accuracy)
    return found


def write_abstain(adapter_dir: str | Path, calibration: dict, dataset: str) -> Path:
    """Record a calibrated ``min_confidence`` and fallback label in the adapter's metadata; returns its path."""
    meta = AdapterMeta.read(adapter_dir)
    meta.min_confidence, meta.fallback_label = calibration["threshold"], calibration["fallback_label"]
    meta.calibration = {**calibration, "data": dataset, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return meta.write(adapter_dir)
