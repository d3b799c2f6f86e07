"""Which fields of a data file hold the text and the label, when the user did not say.

A file with ``text`` and ``label`` needs nothing. Otherwise, for a field the user did not name (``--text-field``,
``--label-field``, a config file or ``--set``), a common name is looked for (``sentence``, ``utterance``,
``intent``, ``category``, ...; any case), then, in a file of exactly two fields, the long free-text one and the
short repeated one. What was chosen is said in one line with the flag that overrides it; two candidates for
one role are an error naming the fields present.
"""

from __future__ import annotations

import copy
import re
import sys
from itertools import islice
from pathlib import Path

from .config import Config, explicit_keys
from .errors import LoratuneError

TEXT_NAMES = (
    "text",
    "sentence",
    "utterance",
    "query",
    "question",
    "review",
    "content",
    "document",
    "body",
    "message",
    "comment",
    "input",
    "prompt",
    "tweet",
    "post",
    "description",
    "sentence1",
    "text_a",
)
LABEL_NAMES = (
    "label",
    "labels",
    "label_text",
    "label_name",
    "intent",
    "category",
    "class",
    "class_name",
    "target",
    "topic",
    "sentiment",
    "tag",
    "tags",
    "y",
    "output",
    "emotion",
    "polarity",
    "rating",
    "stars",
)
SAMPLE_ROWS = 200


def _norm(name: object) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip()).casefold()


def user_given(cfg: Config) -> set[str]:
    """The ``data.*`` keys the user chose; remembered on ``cfg`` the first time, so fields settled later (detected,
    or read from an adapter) are never taken for the user's own choice."""
    if getattr(cfg, "_given", None) is None:
        cfg._given = explicit_keys(cfg)
    return {key for key in cfg._given if key.startswith("data.")}


def _by_name(keys: list, names: tuple[str, ...], role: str, flag: str, source: str, taken: set) -> object | None:
    found = [key for key in keys if _norm(key) in names and key not in taken]
    if len(found) > 1:
        raise LoratuneError(
            f"{source}: fields {' and '.join(map(repr, found))} could both be the {role}; choose with {flag} NAME "
            f"(fields present: {', '.join(map(str, keys))})"
        )
    return found[0] if found else None


def _by_shape(keys: list, rows: list[dict], text, label):
    """In a two-field file: the text is the longer string field of words, the label the one with fewer distinct values."""
    if len(keys) != 2:
        return text, label
    a, b = keys

    def shape(key):
        values = [r.get(key) for r in rows]
        strings = [v for v in values if isinstance(v, str)]
        mean = sum(len(v) for v in strings) / max(len(strings), 1)
        return len(strings) == len(values), mean, len({str(v) for v in values})

    def prose(key):  # text has words: an id, a code or a one-word category does not
        values = [r.get(key) for r in rows]
        return sum(isinstance(v, str) and len(v.split()) > 1 for v in values) * 2 >= len(values)

    (a_str, a_len, a_distinct), (b_str, b_len, b_distinct) = shape(a), shape(b)
    if text is None and label is None:
        if a_str and prose(a) and a_len > b_len and a_distinct >= b_distinct and b_distinct < len(rows):
            return a, b
        if b_str and prose(b) and b_len > a_len and b_distinct >= a_distinct and a_distinct < len(rows):
            return b, a
        return None, None
    if text is None:
        other = b if label == a else a
        return (other if shape(other)[0] and prose(other) else None), label
    other = b if text == a else a
    return text, (other if shape(other)[2] < len(rows) else None)  # a label repeats; a unique note or id does not


def _numbered(rows: list[dict], key) -> bool:
    return key is not None and all(isinstance(r.get(key), int) or str(r.get(key, "")).strip().isdigit() for r in rows)


def _named(keys: list) -> bool:
    return any(_norm(key) in ("label_text", "label_name", "class_name") for key in keys)


def detect_fields(rows: list[dict], text_field: str, label_field: str | None, given: set[str], source: str):
    """(text field, label field, note): the configured names where the rows have them or the user gave them,
    else detected ones; ``note`` says what was detected (None when nothing was). ``label_field`` None: unlabelled."""
    keys = list(rows[0]) if rows else []
    labelled = label_field is not None
    text = text_field if (text_field in keys or "data.text_field" in given) else None
    label = label_field if (not labelled or label_field in keys or "data.label_field" in given) else None
    skip = {text}
    if labelled and "data.label_field" not in given and _numbered(rows, label) and _named(keys):
        label, skip = None, {text, label}  # ids beside their names (a 🤗 export's label + label_text): names read better
    if not keys or (text is not None and label is not None) or (text is not None and not labelled):
        return text_field if text is None else text, label_field, None
    if text is None:
        text = _by_name(keys, TEXT_NAMES, "text", "--text-field", source, {label})
    if labelled and label is None:
        label = _by_name(keys, LABEL_NAMES, "label", "--label-field", source, skip | {text})
    if labelled and (text is None or label is None):
        text, label = _by_shape(keys, rows, text, label)
    elif text is None and len(keys) == 1:
        text = keys[0]
    if text is None or (labelled and label is None):  # the reader reports the missing field, naming the fields present
        return text or text_field, label or label_field, None
    roles = [("text", text, text_field, "--text-field"), ("label", label, label_field, "--label-field")]
    changed = [(role, used, flag) for role, used, configured, flag in roles if used != configured]
    what = " and ".join(f"{role} from {used!r}" for role, used, _ in changed)
    note = f"{source}: reading {what} (detected; choose others with {' / '.join(flag for *_, flag in changed)})"
    return text, label, note


def first_rows(source, name: str = "data", n: int = SAMPLE_ROWS) -> list[dict]:
    """Up to ``n`` records of a data file or an in-memory table; [] when it cannot be read (the reader says why)."""
    from .data import DataError, _source_records

    try:
        records, _ = _source_records(source, name, None)
        return [record for _, _, record in islice(records, n)]
    except DataError:
        return []


def settle_fields(cfg: Config, source, *, labelled: bool = True, name: str = "data") -> str | None:
    """Set ``cfg.data.text_field`` / ``label_field`` to the fields ``source`` uses (unless the user chose them) and
    return the line saying what was detected, or None. A plain text file (predict input) has no fields."""
    from .data import TABLE_SUFFIXES

    if source is None or (isinstance(source, str) and source in ("", "none")):
        return None
    if isinstance(source, (str, Path)):
        if Path(source).suffix.lower() not in TABLE_SUFFIXES:
            return None  # plain lines, or a file the reader will refuse
        name = str(source)
    given = user_given(cfg)
    label_field = cfg.data.label_field if labelled else None
    text, label, note = detect_fields(first_rows(source, name), cfg.data.text_field, label_field, given, name)
    cfg.data.text_field = text
    if labelled:
        cfg.data.label_field = label
    return note


def settled(cfg: Config, source, echo=None, *, labelled: bool = True, name: str = "data") -> Config:
    """A copy of ``cfg`` reading ``source`` with its fields settled (:func:`settle_fields`); ``echo`` gets the note."""
    cfg = copy.deepcopy(cfg)
    note = settle_fields(cfg, source, labelled=labelled, name=name)
    if note and echo:
        echo(note)
    return cfg


def settle_for_model(cfg: Config, source, recorded: dict | None = None, *, labelled: bool = True) -> None:
    """Before evaluating on or predicting ``source``: the adapter's ``recorded`` fields (what it was trained on)
    for those the user did not choose, then :func:`settle_fields`; the note goes to stderr (stdout may be JSON)."""
    given = user_given(cfg)
    for key, value in (recorded or {}).items():
        if value and f"data.{key}" not in given and hasattr(cfg.data, key):
            setattr(cfg.data, key, value)
    note = settle_fields(cfg, source, labelled=labelled)
    if note:
        print(note, file=sys.stderr)
