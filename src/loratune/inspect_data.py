"""``loratune inspect``: what a dataset looks like to the model before any training."""

from __future__ import annotations

import numpy as np

from .config import Config
from .data import imbalance_warning, label_counts, load_splits
from .errors import LoratuneError
from .fields import settled

PERCENTILES = (50, 90, 95, 99, 100)


def _percentiles(lengths: list[int]) -> dict[str, int]:
    return {f"p{q}" if q < 100 else "max": int(np.percentile(lengths, q)) for q in PERCENTILES}


def inspect_dataset(cfg: Config, n_examples: int = 3) -> dict:
    """Label counts, imbalance, token-length percentiles, truncation counts and sample prompt/target pairs."""
    notes: list[str] = []
    cfg = settled(cfg, cfg.data.train, notes.append)
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    report: dict = {
        "fields": {"text": cfg.data.text_field, "label": cfg.data.label_field, "note": notes[0] if notes else None},
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

    examples = splits.train + splits.val
    report["model"], report["examples"] = cfg.model.name, []
    try:
        family, add_special = _reader(cfg, splits)
    except (LoratuneError, OSError, ValueError) as exc:
        # Counts need no model; token lengths do. Say so plainly rather than fail the whole report.
        report["tokens"] = None
        report["warnings"].append(f"token lengths skipped: {str(exc).splitlines()[0]}")
        return report
    spec = family.spec
    targets = [spec.target(e.label) for e in examples]
    report["examples"] = [{"prompt": spec.render(e.text, family.tokenizer), "target": t} for e, t in zip(examples[:n_examples], targets)]
    fixed = spec.fixed_length(family.tokenizer, add_special)
    try:
        fed = family.prompt_ids([e.text for e in examples])
    except LoratuneError as exc:  # the fixed part alone does not fit: the one thing to fix first
        report["tokens"] = None
        report["warnings"].append(str(exc))
        return report
    target_lengths = [len(x) for x in family.tokenizer(targets)["input_ids"]]
    report["tokens"] = {
        "prompt": _percentiles([len(x) for x in fed.ids]),
        "target": _percentiles(target_lengths),
        "max_length": spec.max_length,
        "max_target_length": spec.max_target_length,
        "fixed_prompt_tokens": fixed,
        "input_only": spec.input_only,
        "truncated_prompts": fed.n_cut,
        "truncated_targets": sum(n > spec.max_target_length for n in target_lengths),
    }
    return report


def _reader(cfg: Config, splits):
    """The family (without weights) and prompt spec that training would use, to measure exactly what it feeds."""
    from transformers import AutoTokenizer

    from .families import detect_family, family_class
    from .models import load_config, prompt_spec, resolve_model_name

    name = resolve_model_name(cfg.model.name, texts=[e.text for e in splits.train], labels=splits.labels)
    config, local_only = load_config(name, cfg.model.revision, cfg.model.trust_remote_code)
    family_cls = family_class(detect_family(config, cfg.model.family))
    tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision, local_files_only=local_only)
    spec = prompt_spec(cfg, family_cls, tokenizer, splits.labels, splits.multi_label, config)
    family = family_cls(None, tokenizer, spec)
    return family, not spec.chat_template


def render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report["fields"]["note"]:
        console.print(report["fields"]["note"], highlight=False, markup=False, soft_wrap=True)
    console.print(f"train: {report['train']}   val: {report['val']}", highlight=False)
    table = Table("label", "train", "val")
    for label in report["labels"]:
        table.add_row(label, str(report["counts"]["train"][label]), str(report["counts"]["val"][label]))
    table.add_row("[bold]total[/bold]", str(report["n"]["train"]), str(report["n"]["val"]))
    console.print(table)
    tokens = report.get("tokens")
    if tokens:
        t = Table("tokens (" + report["model"] + ")", *[k for k in tokens["prompt"]], "limit", "truncated")
        t.add_row("prompt as fed", *map(str, tokens["prompt"].values()), str(tokens["max_length"]), str(tokens["truncated_prompts"]))
        t.add_row("target", *map(str, tokens["target"].values()), str(tokens["max_target_length"]), str(tokens["truncated_targets"]))
        console.print(t)
        console.print(
            f"every prompt carries {tokens['fixed_prompt_tokens']} fixed tokens (instruction, labels, cue)"
            if not tokens["input_only"]
            else "the model reads the text alone (its head carries the labels)",
            highlight=False,
        )
        if tokens["truncated_prompts"]:
            console.print(f"{tokens['truncated_prompts']} texts are cut in the middle to fit; nothing else is cut", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    for i, ex in enumerate(report["examples"], 1):
        console.rule(f"example {i}")
        console.print(ex["prompt"], markup=False, highlight=False)
        console.print(f"[bold]target:[/bold] {ex['target']}", highlight=False)
