"""``loratune inspect``: what a dataset looks like to the model before any training."""

from __future__ import annotations

import numpy as np

from .config import Config
from .data import imbalance_warning, label_counts, load_splits
from .errors import LoratuneError
from .prompt import format_example, format_target

PERCENTILES = (50, 90, 95, 99, 100)


def _percentiles(lengths: list[int]) -> dict[str, int]:
    return {f"p{q}" if q < 100 else "max": int(np.percentile(lengths, q)) for q in PERCENTILES}


def inspect_dataset(cfg: Config, n_examples: int = 3) -> dict:
    """Label counts, imbalance, token-length percentiles, truncation counts and sample prompt/target pairs."""
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    report: dict = {
        "train": cfg.data.train,
        "val": cfg.data.val or f"{cfg.data.val_fraction:.0%} split from train",
        "labels": splits.labels,
        "counts": {
            "train": {label: label_counts(splits.train).get(label, 0) for label in splits.labels},
            "val": {label: label_counts(splits.val).get(label, 0) for label in splits.labels},
        },
        "n": {"train": len(splits.train), "val": len(splits.val)},
        "warnings": list(splits.warnings),
    }
    imbalance = imbalance_warning(label_counts(splits.train), splits.labels)
    if imbalance and imbalance not in report["warnings"]:
        report["warnings"].append(imbalance)

    def prompt(e):
        return format_example(e.text, splits.labels, cfg.prompt.task, cfg.prompt.input_name, splits.multi_label)

    examples = splits.train + splits.val
    prompts = [prompt(e) for e in examples]
    targets = [format_target(e.label, splits.labels) for e in examples]
    report["examples"] = [{"prompt": p, "target": t} for p, t in zip(prompts[:n_examples], targets[:n_examples])]
    report["model"] = cfg.model.name
    try:
        from .models import load_config as load_model_config
        from .models import resolve_model_name

        name = resolve_model_name(cfg.model.name, texts=[e.text for e in splits.train], labels=splits.labels)
        load_model_config(name, cfg.model.revision, cfg.model.trust_remote_code)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision)
    except (LoratuneError, OSError, ValueError) as exc:
        # Counts need no model; token lengths do. Say so plainly rather than fail the whole report.
        report["tokens"] = None
        report["warnings"].append(f"token lengths skipped: {str(exc).splitlines()[0]}")
        return report
    from .tokenize import token_lengths

    prompt_lengths = token_lengths(tokenizer, prompts)
    target_lengths = token_lengths(tokenizer, targets)
    report["tokens"] = {
        "prompt": _percentiles(prompt_lengths),
        "target": _percentiles(target_lengths),
        "max_length": cfg.data.max_length,
        "max_target_length": cfg.data.max_target_length,
        "truncated_prompts": sum(n > cfg.data.max_length for n in prompt_lengths),
        "truncated_targets": sum(n > cfg.data.max_target_length for n in target_lengths),
    }
    return report


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"train: {report['train']}   val: {report['val']}", highlight=False)
    table = Table("label", "train", "val")
    for label in report["labels"]:
        table.add_row(label, str(report["counts"]["train"][label]), str(report["counts"]["val"][label]))
    table.add_row("[bold]total[/bold]", str(report["n"]["train"]), str(report["n"]["val"]))
    console.print(table)
    tokens = report.get("tokens")
    if tokens:
        t = Table("tokens (" + report["model"] + ")", *[k for k in tokens["prompt"]], "limit", "truncated")
        t.add_row("prompt", *map(str, tokens["prompt"].values()), str(tokens["max_length"]),
                  str(tokens["truncated_prompts"]))
        t.add_row("target", *map(str, tokens["target"].values()), str(tokens["max_target_length"]),
                  str(tokens["truncated_targets"]))
        console.print(t)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    for i, ex in enumerate(report["examples"], 1):
        console.rule(f"example {i}")
        console.print(ex["prompt"], markup=False, highlight=False)
        console.print(f"[bold]target:[/bold] {ex['target']}", highlight=False)
