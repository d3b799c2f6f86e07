"""The validation set carved out of the training data when no val file is given, and what to warn about it."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence


def split_train_val(examples: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """A stratified, seeded split (plain seeded split when a label is too rare to stratify)."""
    from sklearn.model_selection import train_test_split

    strata = [ex.label if isinstance(ex.label, str) else ",".join(ex.label) for ex in examples]
    counts = Counter(strata)
    if min(counts.values()) >= 2 and len(examples) * fraction >= len(counts):
        train, val = train_test_split(list(examples), test_size=fraction, random_state=seed, stratify=strata)
        return train, val
    train, val = _split_keeping_every_label(list(examples), strata, fraction, seed)
    if not val:  # every label has a single example: nothing can be held out without losing a label
        return train_test_split(list(examples), test_size=fraction, random_state=seed)
    return train, val


def _split_keeping_every_label(examples: list, strata: list[str], fraction: float, seed: int):
    """Many rare labels: each label's share of val by largest remainder, and always one of its examples in
    train (a label seen only in val could never be learned)."""
    rng = random.Random(seed)
    groups: dict[str, list] = {}
    for ex, stratum in zip(examples, strata):
        groups.setdefault(stratum, []).append(ex)
    for group in groups.values():
        rng.shuffle(group)
    want = max(1, round(len(examples) * fraction))
    quota = {s: min(int(len(g) * fraction), len(g) - 1) for s, g in groups.items()}
    spare = sorted(groups, key=lambda s: (-(len(groups[s]) * fraction % 1), rng.random()))
    for s in spare:
        if sum(quota.values()) >= want:
            break
        quota[s] += quota[s] < len(groups[s]) - 1
    val = [ex for s, g in groups.items() for ex in g[: quota[s]]]
    train = [ex for s, g in groups.items() for ex in g[quota[s] :]]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def _key(text: str) -> str:
    return re.sub(r"\s+", " ", text).casefold().strip()


def quality_warnings(train: Sequence, val: Sequence) -> list[str]:
    """Report duplicates inside train and texts shared between train and val (they inflate val scores)."""
    warnings = []
    counts = Counter(_key(ex.text) for ex in train)
    dupes = sum(c - 1 for c in counts.values() if c > 1)
    if dupes:
        warnings.append(f"{dupes} duplicate text(s) in the training data")
    by_text: dict[str, set] = {}
    for ex in train:
        by_text.setdefault(_key(ex.text), set()).add(ex.label)
    conflicting = sum(1 for v in by_text.values() if len(v) > 1)
    if conflicting:
        warnings.append(f"{conflicting} training text(s) appear with different labels")
    overlap = sum(1 for ex in val if _key(ex.text) in counts)
    if overlap:
        warnings.append(f"{overlap} validation text(s) also appear in the training data (val scores will be optimistic)")
    return warnings
