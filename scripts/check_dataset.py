"""Check labelled JSONL files for duplicates and near-duplicates, within and across splits.

    python scripts/check_dataset.py data/raw/train.jsonl data/raw/val.jsonl data/raw/test.jsonl

Reports exact duplicates (after case/space/punctuation folding), pairs whose word-set Jaccard similarity
exceeds --threshold (templated near-duplicates), and the label distribution per file. Exits 1 when any
duplicate or near-duplicate is found, so it can guard the shipped data.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def fold(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threshold", type=float, default=0.6, help="Jaccard similarity that counts as near-duplicate")
    args = parser.parse_args(argv)

    rows = []  # (file, line, text, label)
    for path in args.files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                rows.append((str(path), n, record["text"], record["label"]))

    for path in args.files:
        labels = Counter(str(r[3]) for r in rows if r[0] == str(path))
        print(f"{path}: {sum(labels.values())} examples; " + ", ".join(f"{k} {v}" for k, v in labels.most_common()))

    seen: dict[str, tuple] = {}
    exact = []
    for row in rows:
        key = fold(row[2])
        if key in seen:
            exact.append((seen[key], row))
        seen.setdefault(key, row)

    sets = [words(r[2]) for r in rows]
    near, best = [], (0.0, None, None)
    for i, j in combinations(range(len(rows)), 2):
        a, b = sets[i], sets[j]
        if not a or not b:
            continue
        sim = len(a & b) / len(a | b)
        if sim > best[0]:
            best = (sim, rows[i], rows[j])
        if sim > args.threshold:
            near.append((sim, rows[i], rows[j]))

    where = lambda r: f"{r[0]}:{r[1]}"  # noqa: E731
    for a, b in exact:
        print(f"duplicate: {where(a)} == {where(b)}: {a[2][:70]!r}")
    for sim, a, b in sorted(near, reverse=True):
        print(f"near-duplicate ({sim:.2f}): {where(a)} ~ {where(b)}: {a[2][:50]!r} / {b[2][:50]!r}")
    lengths = sorted(len(r[2].split()) for r in rows)
    print(f"{len(rows)} examples; words per text: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    print(
        f"exact duplicates: {len(exact)}; pairs above Jaccard {args.threshold}: {len(near)}; "
        f"most similar pair: {best[0]:.3f} ({where(best[1])} ~ {where(best[2])})"
        if best[1]
        else ""
    )
    return 1 if exact or near else 0


if __name__ == "__main__":
    sys.exit(main())
