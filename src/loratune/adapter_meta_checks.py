"""Check a loaded ``loratune.json`` before anything trusts it: a tampered or hand-edited file is one sentence, not a
traceback deep inside model loading or prompt building.

Kept apart from the metadata format itself so the adapter module (AdapterMeta) can call it unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import LoratuneError

FAMILIES = ("seq2seq", "causal", "encoder")


def _text(value: Any) -> bool:
    """A non-empty string that is valid Unicode (no lone surrogates, which JSON escapes can carry)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_meta(meta: Any, path: str | Path) -> None:
    """Raise LoratuneError naming ``path`` and every bad key of the adapter metadata ``meta``; return if it is sound.

    Checks the keys prediction relies on: base_model, family, labels, prompt (task, input_name), multi_label,
    max_length, threshold, lora_target_modules.
    """
    if not isinstance(meta, dict):
        raise LoratuneError(
            f"{path}: expected a JSON object of adapter metadata, got {type(meta).__name__}; the adapter is damaged: train it again"
        )
    problems: list[str] = []
    for key in ("base_model", "labels", "family", "prompt"):
        if key not in meta:
            problems.append(f"missing key {key!r}")
    if "base_model" in meta and not _text(meta["base_model"]):
        problems.append(f"base_model must be a model id or path (got {meta['base_model']!r})")
    if "family" in meta and meta["family"] not in FAMILIES:
        problems.append(f"family must be one of {', '.join(FAMILIES)} (got {meta['family']!r})")
    if "labels" in meta:
        labels = meta["labels"]
        if not isinstance(labels, list) or len(labels) < 2:
            problems.append(f"labels must be a list of at least two labels (got {labels!r})")
        elif not all(_text(label) for label in labels):
            problems.append("labels must be non-empty strings of valid text")
        elif len(set(labels)) != len(labels):
            problems.append("labels has duplicates")
    if "prompt" in meta:
        prompt = meta["prompt"]
        if not isinstance(prompt, dict) or not all(_text(prompt.get(k)) for k in ("task", "input_name")):
            problems.append("prompt must be an object with string task and input_name")
    if not isinstance(meta.get("multi_label", False), bool):
        problems.append(f"multi_label must be true or false (got {meta['multi_label']!r})")
    if "max_length" in meta and not (_int(meta["max_length"]) and meta["max_length"] >= 8):
        problems.append(f"max_length must be an integer >= 8 (got {meta['max_length']!r})")
    threshold = meta.get("threshold")
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0
    ):
        problems.append(f"threshold must be a number in [0, 1] (got {threshold!r})")
    targets = meta.get("lora_target_modules")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        problems.append("lora_target_modules must be a list of module names")
    if problems:
        raise LoratuneError(f"{path}: damaged adapter metadata: {'; '.join(problems)}")
