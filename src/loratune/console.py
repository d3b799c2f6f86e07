"""What the CLI prints: progress bars and result tables (rich), kept apart from the commands' logic."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; our own bars show real progress


NOT_A_TTY_INTERVAL_S = 30.0
"""Seconds between redraws of a bar whose stream is a file or a pipe: a log gets a line now and then, not hundreds."""


def progress(
    total: int, desc: str, unit: str = "example", *, initial: int = 0, leave: bool = True, delay: float = 0.0, file=None, rate=True
):
    """A tqdm bar on stderr. On a terminal it redraws ten times a second; to a file or pipe every
    NOT_A_TTY_INTERVAL_S seconds (and at the end). ``rate=False`` leaves out tqdm's items/s, for bars that show
    their own speed in the postfix (which comes last, so a narrow terminal shortens the bar, not the figures)."""
    from tqdm.auto import tqdm

    file = file or sys.stderr
    tty = _isatty(file)
    speed = ", {rate_fmt}" if rate else ""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=file,
        leave=leave,
        delay=delay,
        dynamic_ncols=tty,
        mininterval=0.1 if tty else NOT_A_TTY_INTERVAL_S,
        maxinterval=10.0 if tty else NOT_A_TTY_INTERVAL_S,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}" + speed + "{postfix}]",
    )


def _isatty(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def print_predictions(texts, predictions, mode: str, top_k: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("text", "label", "top scores" if mode == "score" else "raw output")
    for t, p in zip(texts, predictions):
        if p.scores is not None:
            best = sorted(p.scores.items(), key=lambda kv: -kv[1])[: top_k or 3]
            detail = ", ".join(f"{label} {prob:.3f}" for label, prob in best)
        else:
            detail = p.raw or ""
        table.add_row(t if len(t) <= 80 else t[:77] + "...", p.label, detail)
    Console().print(table)


def print_summary(report: dict, out_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    if report.get("multi_label"):
        return print_multilabel_summary(report, out_dir)
    abstain = any("in_scope_accuracy" in r for r in report["results"])
    extra = ("in-scope acc.", "oos recall", "abstained") if abstain else ()
    from .evaluate import shows_invalid

    invalid = shows_invalid(report)
    table = Table(
        "model",
        "mode",
        "accuracy",
        "macro-F1",
        "weighted-F1",
        *(("invalid",) if invalid else ()),
        *extra,
        "examples/s",
        title=f"{report['dataset']} ({report['n']} examples)",
    )
    for r in report["results"]:
        cells = [pct(r.get(k)) for k in ("in_scope_accuracy", "oos_recall", "abstain_rate")] if abstain else []
        table.add_row(
            r["model"],
            r["mode"],
            f"{100 * r['accuracy']:.1f}%",
            f"{100 * r['macro_f1']:.1f}%",
            f"{100 * r['weighted_f1']:.1f}%",
            *((f"{100 * r['invalid_rate']:.1f}%",) if invalid else ()),
            *cells,
            f"{r['examples_per_s']:.1f}",
        )
    console = Console()
    console.print(table)
    _print_int8(console, report)
    if out_dir is not None:
        console.print(f"report: {out_dir / 'report.md'} (also report.json and confusion_*.png)")


def _print_int8(console, report: dict) -> None:
    from .quantize import describe

    for row in report.get("int8", ()):
        console.print(describe(row), highlight=False)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_multilabel_summary(report: dict, out_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "model",
        "mode",
        "micro-F1",
        "macro-F1",
        "subset acc.",
        "Hamming",
        "invalid",
        "examples/s",
        title=f"{report['dataset']} ({report['n']} examples, multi-label)",
    )
    for r in report["results"]:
        table.add_row(
            r["model"],
            r["mode"] + (f" @{r['threshold']:.2f}" if "threshold" in r else ""),
            f"{100 * r['micro_f1']:.1f}%",
            f"{100 * r['macro_f1']:.1f}%",
            f"{100 * r['subset_accuracy']:.1f}%",
            f"{r['hamming_loss']:.3f}",
            f"{100 * r['invalid_rate']:.1f}%",
            f"{r['examples_per_s']:.1f}",
        )
    console = Console()
    console.print(table)
    _print_int8(console, report)
    if out_dir is not None:
        console.print(f"report: {out_dir / 'report.md'} (also report.json and confusion_*.png)")


def print_targets(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("target", "value", "threshold", "met", title=f"benchmark targets ({results['mode']} run)")
    for t in results["targets"]:
        table.add_row(t["target"], f"{t['value']} {t['unit']}", str(t["threshold"]), "met" if t["met"] else "NOT MET")
    Console().print(table)


def print_calibration(found: dict, path, meta_path, json_out: bool) -> None:
    """What ``loratune calibrate`` found and where it was written."""
    import json

    if json_out:
        print(json.dumps({**found, "data": str(path), "written": str(meta_path)}, indent=2))
        return
    if "micro_f1_at_default" in found:  # multi-label threshold
        print(
            f"threshold {found['threshold']:.2f}: micro-F1 {found['micro_f1']:.4f} on {path} ({found['n']} examples); "
            f"at 0.50: {found['micro_f1_at_default']:.4f}; was {found['previous_threshold']:.2f}"
        )
        print(f"written to {meta_path} (override with --threshold)")
        return
    scope = (
        f"in-scope accuracy {found['in_scope_accuracy']:.4f}, out-of-scope recall {found['oos_recall']:.4f}"
        if "in_scope_accuracy" in found
        else f"macro-F1 {found['macro_f1']:.4f}"
    )
    print(
        f"min confidence {found['threshold']:.2f} -> {found['fallback_label']}: {scope}, abstained "
        f"{found['abstain_rate']:.1%} on {path} ({found['n']} examples)"
    )
    print(f"written to {meta_path} (override with --min-confidence)")
