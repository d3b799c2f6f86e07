"""Metrics for end-to-end predictions (never teacher-forced tokens), base-vs-adapter comparison, reports.

Reports go to one directory, written atomically: ``report.json``, ``report.md`` and one confusion-matrix PNG
per model and mode (multi-label: one 2x2 matrix per label in the PNG).

Multi-label classifiers are scored on label sets: micro/macro F1, subset accuracy (the whole set right),
Hamming loss (share of wrong label decisions) and per-label P/R/F1/support. :func:`calibrate_threshold` picks
their decision threshold on validation data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import replace_dir, temp_dir_beside
from .callable_module import make_callable
from .data import Example, example_labels
from .predict import INVALID, Classifier, Prediction

MAX_TABLE_LABELS = 20
"""Confusion matrices with more columns go to report.json and the PNG only, not into report.md."""


@dataclass
class EvalResult:
    name: str
    mode: str
    metrics: dict
    predictions: list[Prediction] = field(repr=False)


def compute_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str], invalid_column: bool | None = None) -> dict:
    """Accuracy, macro/weighted F1, per-label P/R/F1/support and the confusion matrix (scikit-learn), with each
    row also as shares of the true label's examples (``row_shares``: a dominant class does not wash out the rest).

    A prediction outside ``labels`` (``invalid``) counts as wrong. The matrix has an ``invalid`` column when
    ``invalid_column`` (generate mode, where free text can miss every label); None: when a prediction is invalid.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(labels)
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    n_invalid = sum(p == INVALID for p in pred)
    columns = labels + ([INVALID] if invalid_column or n_invalid else [])
    matrix = confusion_matrix(gold, pred, labels=columns)[: len(labels)]
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    return {
        "n": len(gold),
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, labels=labels, average="weighted", zero_division=0)),
        "invalid_rate": n_invalid / max(len(pred), 1),
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": {"rows": labels, "columns": columns, "values": matrix.tolist(), "row_shares": shares.round(4).tolist()},
    }


def compute_multilabel_metrics(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], labels: Sequence[str], n_invalid: int = 0, n_unknown: int = 0
) -> dict:
    """Micro/macro F1, subset accuracy, Hamming loss, per-label P/R/F1/support and 2x2 matrices (scikit-learn).

    ``n_invalid`` outputs with no known label (generate mode) are already empty sets in ``pred``; they and the
    ``n_unknown`` dropped pieces are reported, not re-scored.
    """
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        hamming_loss,
        multilabel_confusion_matrix,
        precision_recall_fscore_support,
        precision_score,
        recall_score,
    )
    from sklearn.preprocessing import MultiLabelBinarizer

    labels = list(labels)
    binarizer = MultiLabelBinarizer(classes=labels)
    y_true, y_pred = binarizer.fit_transform(gold), binarizer.transform(pred)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    matrices = multilabel_confusion_matrix(y_true, y_pred)
    return {
        "n": len(gold),
        "multi_label": True,
        "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "micro_precision": float(precision_score(y_true, y_pred, average="micro", zero_division=0)),
        "micro_recall": float(recall_score(y_true, y_pred, average="micro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "labels_per_example": {
            "gold": float(y_true.sum(1).mean()) if len(gold) else 0.0,
            "pred": float(y_pred.sum(1).mean()) if len(gold) else 0.0,
        },
        "invalid_rate": n_invalid / max(len(pred), 1),
        "unknown_labels": n_unknown,
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for label, p, r, f, n in zip(labels, precision, recall, f1, support)
        },
        # scikit-learn's layout per label: [[true negatives, false positives], [false negatives, true positives]]
        "confusion_matrix": {"labels": labels, "values": matrices.tolist()},
    }


def evaluate(
    classifier: Classifier, examples: Sequence[Example], mode: str | None = None, name: str | None = None, progress=None
) -> EvalResult:
    """Predict every example end to end and score the predictions; includes latency and throughput."""
    mode = mode or classifier.mode
    texts = [e.text for e in examples]
    start = time.perf_counter()
    predictions = classifier.predict(texts, mode=mode, progress=progress)
    seconds = time.perf_counter() - start
    if classifier.multi_label:
        metrics = compute_multilabel_metrics(
            [example_labels(e) for e in examples],
            [p.labels for p in predictions],
            classifier.labels,
            n_invalid=sum(p.label == INVALID for p in predictions),
            n_unknown=sum(len(p.unknown or ()) for p in predictions),
        )
        if mode == "score":
            metrics.update(threshold=classifier.threshold, allow_empty=classifier.settings.allow_empty)
    else:
        gold, pred = [e.label for e in examples], [p.label for p in predictions]
        metrics = compute_metrics(gold, pred, classifier.labels, invalid_column=mode == "generate")
        if classifier.settings.fallback_label:
            metrics.update(
                abstain_metrics(gold, pred, classifier.settings.fallback_label), min_confidence=classifier.settings.min_confidence
            )
    metrics.update(
        {
            "seconds": seconds,
            "ms_per_example": 1000 * seconds / max(len(texts), 1),
            "examples_per_s": len(texts) / seconds if seconds > 0 else float("inf"),
            "cut_texts": sum(p.cut > 0 for p in predictions),
            "batch_size": classifier.batch_size,
            "device": str(classifier.device),
        }
    )
    return EvalResult(name or classifier.name, mode, metrics, predictions)


def disagreements(examples: Sequence[Example], a: EvalResult, b: EvalResult, limit: int = 8) -> list[dict]:
    """Examples where two results differ, with raw outputs (what the seed showed as Input/Output pairs)."""
    rows = []
    for ex, pa, pb in zip(examples, a.predictions, b.predictions):
        if pa.label != pb.label:
            rows.append(
                {"text": ex.text, "gold": ex.label, a.name: {"label": pa.label, "raw": pa.raw}, b.name: {"label": pb.label, "raw": pb.raw}}
            )
            if len(rows) >= limit:
                break
    return rows


def build_report(results: Sequence[EvalResult], examples: Sequence[Example], dataset: str, labels: Sequence[str]) -> dict:
    report = {
        "dataset": dataset,
        "n": len(examples),
        "labels": list(labels),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [{"model": r.name, "mode": r.mode, **r.metrics} for r in results],
        "disagreements": {},
    }
    if any(r.metrics.get("multi_label") for r in results):
        report["multi_label"] = True
    names = list(dict.fromkeys(r.name for r in results))
    if len(names) >= 2:
        for mode in dict.fromkeys(r.mode for r in results):
            pair = [r for r in results if r.mode == mode][:2]
            if len(pair) == 2:
                report["disagreements"][mode] = disagreements(examples, pair[0], pair[1])
    return report


def _fmt(x: float, pct: bool = True) -> str:
    return f"{100 * x:.1f}%" if pct else f"{x:.1f}"


def shows_invalid(report: dict) -> bool:
    """An ``invalid`` column only where free text can miss every label (generate mode) or something did."""
    return any(r["mode"] == "generate" or r.get("invalid_rate") for r in report["results"])


def report_markdown(report: dict) -> str:
    if report.get("multi_label"):
        return multilabel_report_markdown(report)
    invalid = shows_invalid(report)
    columns = ["model", "mode", "accuracy", "macro-F1", "weighted-F1", *(["invalid"] if invalid else [])]
    columns += ["in-scope acc.", "oos recall", "abstained", "ms/example", "examples/s"]
    lines = [
        f"# loratune report: {report['dataset']} ({report['n']} examples)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in report["results"]:
        scope = " | ".join(_fmt(r[k]) if k in r else "-" for k in ("in_scope_accuracy", "oos_recall", "abstain_rate"))
        lines.append(
            f"| {r['model']} | {r['mode']} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} | {_fmt(r['weighted_f1'])} | "
            + (f"{_fmt(r['invalid_rate'])} | " if invalid else "")
            + f"{scope} | {r['ms_per_example']:.1f} | {r['examples_per_s']:.1f} |"
        )
    note = "; `invalid` is generated text that matches no label" if invalid else ""
    lines += ["", f"Accuracy counts end-to-end predictions only{note}.", ""]
    lines += _int8_lines(report)
    for r in report["results"]:
        lines += [f"## {r['model']} ({r['mode']})", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for label, m in r["per_label"].items():
            lines.append(f"| {label} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | {m['support']} |")
        cm = r["confusion_matrix"]
        if len(cm["columns"]) > MAX_TABLE_LABELS:
            lines += ["", f"Confusion matrix: see report.json ({len(cm['columns'])} columns).", ""]
            continue
        lines += [
            "",
            "Confusion matrix (rows: true label, columns: predicted; count and share of the true label's examples):",
            "",
            "| true \\ pred | " + " | ".join(cm["columns"]) + " |",
            "|---" * (len(cm["columns"]) + 1) + "|",
        ]
        for row_label, row, shares in zip(cm["rows"], cm["values"], cm["row_shares"]):
            lines.append(f"| {row_label} | " + " | ".join(f"{v} ({100 * f:.0f}%)" for v, f in zip(row, shares)) + " |")
        lines.append("")
    lines += _disagreement_lines(report)
    return "\n".join(lines)


def multilabel_report_markdown(report: dict) -> str:
    lines = [
        f"# loratune report: {report['dataset']} ({report['n']} examples, multi-label)",
        "",
        "| model | mode | micro-F1 | macro-F1 | subset accuracy | Hamming loss | labels/example | invalid | "
        "unknown labels | ms/example | examples/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        per = r["labels_per_example"]
        lines.append(
            f"| {r['model']} | {r['mode']} | {_fmt(r['micro_f1'])} | {_fmt(r['macro_f1'])} | "
            f"{_fmt(r['subset_accuracy'])} | {r['hamming_loss']:.3f} | {per['pred']:.2f} (gold {per['gold']:.2f}) | "
            f"{_fmt(r['invalid_rate'])} | {r['unknown_labels']} | {r['ms_per_example']:.1f} | {r['examples_per_s']:.1f} |"
        )
    lines += [
        "",
        "End-to-end predictions only. Subset accuracy: the whole label set right. Hamming loss: share of "
        "wrong yes/no label decisions. `invalid`: generated text with no known label; `unknown labels`: "
        "pieces of generated lists that matched no label (dropped).",
        "",
    ]
    lines += _int8_lines(report)
    for r in report["results"]:
        threshold = f", threshold {r['threshold']:.2f}" if "threshold" in r else ""
        lines += [
            f"## {r['model']} ({r['mode']}{threshold})",
            "",
            "| label | precision | recall | F1 | support | TP | FP | FN | TN |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (label, m), ((tn, fp), (fn, tp)) in zip(r["per_label"].items(), r["confusion_matrix"]["values"]):
            lines.append(
                f"| {label} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | {m['support']} | {tp} | {fp} | {fn} | {tn} |"
            )
        lines.append("")
    lines += _disagreement_lines(report)
    return "\n".join(lines)


def _int8_lines(report: dict) -> list[str]:
    from .quantize import describe

    return [f"- {describe(row)}" for row in report.get("int8", ())] + ([""] if report.get("int8") else [])


def _disagreement_lines(report: dict) -> list[str]:
    lines = []
    for mode, rows in report["disagreements"].items():
        if not rows:
            continue
        lines += [f"## Where the models disagree ({mode} mode)", ""]
        for row in rows:
            gold = row["gold"] if isinstance(row["gold"], str) else ", ".join(row["gold"])
            lines.append(f"- **Input:** {row['text']}  ")
            lines.append(f"  **Gold:** {gold}  ")
            for key, value in row.items():
                if isinstance(value, dict):
                    raw = f" (raw: `{value['raw']}`)" if value.get("raw") is not None else ""
                    lines.append(f"  **{key}:** {value['label']}{raw}  ")
        lines.append("")
    return lines


def confusion_figure(metrics: dict, title: str):
    """Counts (left) and the same matrix as shares of each true label's examples (right), on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = metrics["confusion_matrix"]
    counts, shares = np.array(cm["values"]), np.array(cm["row_shares"])
    n_rows, n_cols = len(cm["rows"]), len(cm["columns"])
    # Capped: at 150 labels the figure would be tens of thousands of pixels wide.
    width, height = min(1.1 * n_cols + 2.5, 24), min(0.9 * n_rows + 2.0, 20)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height))
    panels = ((counts, "count", None, lambda v: str(v)), (shares, "share of the true label", 1.0, lambda v: f"{100 * v:.0f}%"))
    for ax, (values, what, vmax, text) in zip(axes, panels):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_xticks(range(n_cols), cm["columns"], rotation=40, ha="right")
        ax.set_yticks(range(n_rows), cm["rows"])
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(what)
        threshold = (vmax or (values.max() if values.size else 0)) / 2
        if n_rows <= 30:
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, text(v), ha="center", va="center", color="white" if v > threshold else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(metrics: dict, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(metrics, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multilabel_confusion(metrics: dict, title: str, path: Path) -> None:
    """One 2x2 matrix per label (rows: true no/yes, columns: predicted no/yes), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = metrics["confusion_matrix"]
    n = len(cm["labels"])
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n + 0.5, 3.0), squeeze=False)
    for ax, label, values in zip(axes[0], cm["labels"], np.array(cm["values"])):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=max(int(values.max()), 1))
        ax.set_xticks([0, 1], ["no", "yes"])
        ax.set_yticks([0, 1], ["no", "yes"])
        ax.set_xlabel("predicted")
        ax.set_title(label)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > values.max() / 2 else "black")
    axes[0][0].set_ylabel("true")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_")[:60] or "model"


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write report.json, report.md and confusion PNGs into ``out_dir`` atomically; return the dir."""
    out_dir = Path(out_dir)
    tmp = temp_dir_beside(out_dir)
    try:
        for r in report["results"]:
            png = f"confusion_{_slug(r['model'])}_{r['mode']}.png"
            r["confusion_png"] = png
            if r.get("multi_label"):
                plot_multilabel_confusion(r, f"{r['model']} ({r['mode']}): micro-F1 {100 * r['micro_f1']:.1f}%", tmp / png)
            else:
                plot_confusion(r, f"{r['model']} ({r['mode']}): accuracy {100 * r['accuracy']:.1f}%", tmp / png)
        (tmp / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (tmp / "report.md").write_text(report_markdown(report), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Abstain (single-label): low-confidence predictions become a fallback label such as CLINC150's ``oos``.


def apply_abstain(labels_pred: Sequence[str], confidences: Sequence[float], min_confidence: float, fallback_label: str) -> list[str]:
    """Replace every prediction whose confidence is below ``min_confidence`` by ``fallback_label``."""
    return [fallback_label if c < min_confidence else p for p, c in zip(labels_pred, confidences)]


def abstain_metrics(gold: Sequence[str], pred: Sequence[str], fallback_label: str) -> dict:
    """Abstain rate (share of predictions that are the fallback) and, when the fallback occurs in ``gold``, the
    CLINC150 pair: in-scope accuracy (over gold != fallback; predicting the fallback is wrong there) and
    out-of-scope recall (share of gold == fallback predicted as the fallback)."""
    gold, pred = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    metrics = {"fallback_label": fallback_label, "abstain_rate": float((pred == fallback_label).mean()) if len(pred) else 0.0}
    out = gold == fallback_label
    if out.any():
        metrics.update(
            {
                "n_in_scope": int((~out).sum()),
                "n_out_of_scope": int(out.sum()),
                "in_scope_accuracy": float((pred[~out] == gold[~out]).mean()) if (~out).any() else 0.0,
                "oos_recall": float((pred[out] == fallback_label).mean()),
            }
        )
    return metrics


make_callable(__name__, "evaluate")  # loratune.evaluate(...) works even once this module is imported
