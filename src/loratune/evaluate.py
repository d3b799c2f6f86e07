"""Metrics for end-to-end predictions (never teacher-forced tokens), base-vs-adapter comparison, reports.

Reports go to one directory, written atomically: ``report.json``, ``report.md`` and one confusion-matrix PNG
per model and mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import replace_dir, temp_dir_beside
from .data import Example
from .predict import INVALID, Classifier, Prediction


@dataclass
class EvalResult:
    name: str
    mode: str
    metrics: dict
    predictions: list[Prediction] = field(repr=False)


def compute_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro/weighted F1, per-label P/R/F1/support and the confusion matrix (scikit-learn).

    A prediction outside ``labels`` (``invalid``) counts as wrong; the matrix gets an ``invalid`` column.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, pred, labels=labels, zero_division=0
    )
    columns = labels + [INVALID]
    matrix = confusion_matrix(gold, pred, labels=columns)[: len(labels)]
    n_invalid = sum(p == INVALID for p in pred)
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
        "confusion_matrix": {"rows": labels, "columns": columns, "values": matrix.tolist()},
    }


def evaluate(classifier: Classifier, examples: Sequence[Example], mode: str | None = None,
             name: str | None = None, progress=None) -> EvalResult:
    """Predict every example end to end and score the predictions; includes latency and throughput."""
    mode = mode or classifier.mode
    texts = [e.text for e in examples]
    start = time.perf_counter()
    predictions = classifier.predict(texts, mode=mode, progress=progress)
    seconds = time.perf_counter() - start
    metrics = compute_metrics([e.label for e in examples], [p.label for p in predictions], classifier.labels)
    metrics.update({
        "seconds": seconds,
        "ms_per_ticket": 1000 * seconds / max(len(texts), 1),
        "tickets_per_s": len(texts) / seconds if seconds > 0 else float("inf"),
        "batch_size": classifier.batch_size,
        "device": str(classifier.device),
    })
    return EvalResult(name or classifier.name, mode, metrics, predictions)


def disagreements(examples: Sequence[Example], a: EvalResult, b: EvalResult, limit: int = 8) -> list[dict]:
    """Examples where two results differ, with raw outputs (what the seed showed as Input/Output pairs)."""
    rows = []
    for ex, pa, pb in zip(examples, a.predictions, b.predictions):
        if pa.label != pb.label:
            rows.append({"text": ex.text, "gold": ex.label,
                         a.name: {"label": pa.label, "raw": pa.raw}, b.name: {"label": pb.label, "raw": pb.raw}})
            if len(rows) >= limit:
                break
    return rows


def build_report(results: Sequence[EvalResult], examples: Sequence[Example], dataset: str,
                 labels: Sequence[str]) -> dict:
    report = {
        "dataset": dataset,
        "n": len(examples),
        "labels": list(labels),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [{"model": r.name, "mode": r.mode, **r.metrics} for r in results],
        "disagreements": {},
    }
    names = list(dict.fromkeys(r.name for r in results))
    if len(names) >= 2:
        for mode in dict.fromkeys(r.mode for r in results):
            pair = [r for r in results if r.mode == mode][:2]
            if len(pair) == 2:
                report["disagreements"][mode] = disagreements(examples, pair[0], pair[1])
    return report


def _fmt(x: float, pct: bool = True) -> str:
    return f"{100 * x:.1f}%" if pct else f"{x:.1f}"


def report_markdown(report: dict) -> str:
    lines = [f"# loratune report: {report['dataset']} ({report['n']} examples)", "",
             "| model | mode | accuracy | macro-F1 | weighted-F1 | invalid | ms/ticket | tickets/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['mode']} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} | "
                     f"{_fmt(r['weighted_f1'])} | {_fmt(r['invalid_rate'])} | {r['ms_per_ticket']:.1f} | "
                     f"{r['tickets_per_s']:.1f} |")
    lines += ["", "Accuracy counts end-to-end predictions only; `invalid` is generated text that matches no label.", ""]
    for r in report["results"]:
        lines += [f"## {r['model']} ({r['mode']})", "", "| label | precision | recall | F1 | support |",
                  "|---|---|---|---|---|"]
        for label, m in r["per_label"].items():
            lines.append(f"| {label} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | {m['support']} |")
        cm = r["confusion_matrix"]
        lines += ["", "Confusion matrix (rows: true label, columns: predicted):", "",
                  "| true \\ pred | " + " | ".join(cm["columns"]) + " |",
                  "|---" * (len(cm["columns"]) + 1) + "|"]
        for row_label, row in zip(cm["rows"], cm["values"]):
            lines.append(f"| {row_label} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    for mode, rows in report["disagreements"].items():
        if not rows:
            continue
        lines += [f"## Where the models disagree ({mode} mode)", ""]
        for row in rows:
            lines.append(f"- **Input:** {row['text']}  ")
            lines.append(f"  **Gold:** {row['gold']}  ")
            for key, value in row.items():
                if isinstance(value, dict):
                    raw = f" (raw: `{value['raw']}`)" if value.get("raw") is not None else ""
                    lines.append(f"  **{key}:** {value['label']}{raw}  ")
        lines.append("")
    return "\n".join(lines)


def plot_confusion(metrics: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = metrics["confusion_matrix"]
    values = np.array(cm["values"])
    fig, ax = plt.subplots(figsize=(1.1 * len(cm["columns"]) + 2.5, 0.9 * len(cm["rows"]) + 2.0))
    image = ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(cm["columns"])), cm["columns"], rotation=40, ha="right")
    ax.set_yticks(range(len(cm["rows"])), cm["rows"])
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    threshold = values.max() / 2 if values.size else 0
    if len(cm["rows"]) <= 30:
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
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
            plot_confusion(r, f"{r['model']} ({r['mode']}): accuracy {100 * r['accuracy']:.1f}%", tmp / png)
        (tmp / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (tmp / "report.md").write_text(report_markdown(report), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
