"""Read labelled examples from JSONL, CSV or Parquet (or a 🤗 ``datasets.Dataset``: tables.py), validate them,
and settle the label set and the splits.

Every problem in a file is reported as ``FILE:LINE: what is wrong`` through :class:`DataError`, before any
model is loaded or anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import DataConfig
from .errors import LoratuneError
from .prompt import LABEL_SEPARATOR
from .split import quality_warnings, split_train_val

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_SUFFIXES = JSONL_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES


class DataError(LoratuneError):
    """A problem in a data file, with the file and line in the message."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str | tuple[str, ...]
    """One label, or for multi-label data a tuple of labels."""
    source: str = ""
    line: int = 0


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    labels: list[str]
    multi_label: bool
    warnings: list[str] = field(default_factory=list)
    val_is_split: bool = False
    """True when val was carved out of train (no val file given)."""


def clean_label(label: str) -> str:
    """A label as it is shown and predicted: outer space stripped, inner runs of space made one, its case kept."""
    return re.sub(r"\s+", " ", label.strip())


def normalize_label(label: str) -> str:
    """Labels compare case- and space-insensitively: ``" Billing "`` is ``billing`` (the key, not the label shown)."""
    return clean_label(label).casefold()


def spelled_as(labels: Sequence[str]) -> dict[str, str]:
    """Each label's comparison key (:func:`normalize_label`) -> the label as ``labels`` spell it."""
    return {normalize_label(label): label for label in labels}


def some_labels(labels: Sequence[str], n: int = 8) -> str:
    """The first ``n`` labels, and how many more, for one-sentence messages about large label sets."""
    return ", ".join(labels[:n]) + (f", ... {len(labels) - n} more" if len(labels) > n else "")


def decode_file(path: Path) -> str:
    """File contents as text; non-UTF-8 bytes raise DataError naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _labels_from_value(value: object, where: str, field_name: str, multi_label: bool, delimiter: str) -> str | tuple[str, ...]:
    if isinstance(value, list):
        if not multi_label:
            raise DataError(f"{where}: field {field_name!r} is a list; pass --multi-label for multi-label data")
        parts = value
    elif isinstance(value, str):
        parts = value.split(delimiter) if multi_label else [value]
    elif value is None:
        raise DataError(f"{where}: field {field_name!r} is empty (null)")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: field {field_name!r} is the number {value}; labels must be strings")
        parts = [str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)]
    else:
        raise DataError(f"{where}: field {field_name!r} must be a string, got {type(value).__name__}")
    labels = []
    for part in parts:
        if not isinstance(part, str) or not normalize_label(part):
            raise DataError(f"{where}: empty or non-string label in field {field_name!r}")
        labels.append(clean_label(part))
    if not multi_label:
        return labels[0]
    unique: dict[str, str] = {}
    for label in labels:  # one label written twice in a row ("Billing,billing") counts once
        unique.setdefault(normalize_label(label), label)
    return tuple(unique.values())


def _make_example(
    record: dict,
    where: str,
    source: str,
    line: int,
    text_field: str,
    label_field: str,
    multi_label: bool,
    delimiter: str,
) -> Example:
    for name in (text_field, label_field):
        if name not in record:
            present = ", ".join(map(str, record)) or "none"
            flag = "--text-field" if name == text_field else "--label-field"
            raise DataError(f"{where}: missing field {name!r} (fields present: {present}); map yours with {flag}")
    text = record[text_field]
    if text is None:
        raise DataError(f"{where}: field {text_field!r} is empty (null)")
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: field {text_field!r} is empty")
    label = _labels_from_value(record[label_field], where, label_field, multi_label, delimiter)
    if label in ("", ()):
        raise DataError(f"{where}: field {label_field!r} is empty")
    return Example(text=text.strip(), label=label, source=source, line=line)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json_line(line: str, where: str):
    """One JSONL line as a Python value; anything JSON accepts but Python or UTF-8 cannot hold is a DataError."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; a line should be one flat object") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{where}: unreadable JSON value ({str(exc).splitlines()[0][:120]})") from None
    # JSON may escape half of a UTF-16 pair ("\ud800"), which is no text at all: it cannot be tokenized or saved.
    if _SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{where}: a string holds a lone UTF-16 surrogate (an escape like \\ud800 without its "
                f"pair), which is not valid text; fix or drop the line"
            ) from None
    return record


def _records(path: Path):
    """Yield (where, line, record) for each non-empty row of a JSONL, CSV/TSV or Parquet file."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        from .tables import parquet_records

        yield from parquet_records(path)
        return
    content = decode_file(path)
    if not content.strip():
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        delimiter = "\t" if suffix == ".tsv" else ","
        header = content.split("\n", 1)[0]
        if delimiter not in header:  # e.g. a spreadsheet's ';'-separated "CSV"
            delimiter = next((d for d in (";", "\t", "|", ",") if d in header), delimiter)
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter)
        if reader.fieldnames is None:
            raise DataError(f"{path}:1: missing header row")
        repeated = sorted({name for name in reader.fieldnames if reader.fieldnames.count(name) > 1})
        if repeated:
            raise DataError(
                f"{path}:1: the header names column(s) {', '.join(map(repr, repeated))} more than once; "
                f"rename them so each column has its own name"
            )
        try:
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if None in record:
                    raise DataError(f"{where}: more cells than header columns (quote text that contains '{delimiter}')")
                if any((v or "").strip() for v in record.values()):
                    yield where, reader.line_num, record
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    elif suffix == ".json" and content.lstrip().startswith("["):  # one JSON array of objects, not JSON lines
        yield from _json_array(path, content)
    elif suffix in JSONL_SUFFIXES:
        # Split on "\n" only: str.splitlines also splits at U+2028/U+2029/U+0085, which are valid inside JSON strings.
        for number, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = _parse_json_line(line, where)
            if not isinstance(record, dict):
                raise DataError(f'{where}: expected a JSON object like {{"text": ..., "label": ...}}')
            yield where, number, record
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .parquet")


def _json_array(path: Path, content: str):
    try:
        records = json.loads(content)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise DataError(f"{path}: invalid JSON ({getattr(exc, 'msg', exc)} at line {getattr(exc, 'lineno', '?')})") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f'{path}: item {number} of the array: expected a JSON object like {{"text": ..., "label": ...}}')
        yield f"{path}: item {number}", number, record


def _source_records(source, name: str, label_field: str):
    """(records, source name) of a data file path, or of a datasets.Dataset / list of dicts called ``name``."""
    if isinstance(source, (str, Path)):
        return _records(Path(source)), str(source)
    from .tables import dataset_records

    return dataset_records(source, name, label_field), name


def read_examples(
    path,
    text_field: str = "text",
    label_field: str = "label",
    multi_label: bool = False,
    label_delimiter: str = ",",
    name: str = "data",
) -> list[Example]:
    """Read labelled examples from a JSONL, CSV/TSV or Parquet file, or from a ``datasets.Dataset`` (or list of
    dicts, called ``name`` in messages); raise DataError naming file:line (name:row) on any problem."""
    records, source = _source_records(path, name, label_field)
    examples = [
        _make_example(record, where, source, line, text_field, label_field, multi_label, label_delimiter) for where, line, record in records
    ]
    if not examples:
        raise DataError(f"{source}: no examples found")
    return examples


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Unlabelled texts for prediction: a JSONL/CSV/Parquet file (``text_field``) or any other file as one text per line."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        return [line.strip() for line in decode_file(path).split("\n") if line.strip()]
    texts = []
    for where, _, record in _records(path):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: no string field {text_field!r}; map yours with --text-field")
        texts.append(text)
    return texts


def read_inputs(text: str | None, input_path: str | Path | None, text_field: str = "text") -> list[str]:
    """Texts to classify: the TEXT argument, a file (JSONL/CSV ``text_field``, or plain lines) or stdin (``-``)."""
    import sys

    if text is not None and input_path is not None:
        raise LoratuneError("give either a TEXT argument or --input FILE, not both")
    if text is not None and text != "-":
        if not text.strip():
            raise LoratuneError("TEXT is empty: give the text to classify (or '-' to read lines from stdin)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise LoratuneError("TEXT is not valid text (undecodable bytes or a lone surrogate); pass UTF-8") from None
        return [text]
    if input_path is None:
        if sys.stdin.isatty() and text != "-":
            raise LoratuneError("nothing to classify: pass TEXT, --input FILE, or pipe lines on stdin")
        return [line.strip() for line in sys.stdin if line.strip()]
    return read_texts(input_path, text_field)


def read_ids(path: str | Path, id_field: str | None = None) -> list | None:
    """The id of each row of a JSONL/CSV file, for ``predict`` to pass through: ``id_field``, else ``id`` when
    every row has one; None when there is none (plain text files have no ids)."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        if id_field:
            raise DataError(f"{path}: --id-field {id_field!r} needs a .jsonl or .csv file")
        return None
    ids = []
    for where, _, record in _records(path):
        if id_field and id_field not in record:
            raise DataError(f"{where}: no field {id_field!r} (from --id-field)")
        ids.append(record.get(id_field or "id"))
    return ids if id_field or all(x is not None for x in ids) else None


def example_labels(example: Example) -> tuple[str, ...]:
    return (example.label,) if isinstance(example.label, str) else example.label


def check_labels(
    examples: Sequence[Example], labels: Sequence[str], fix: str = "fix the data or pass --labels with every label"
) -> list[Example]:
    """The examples with every label spelled as in ``labels`` (labels compare case- and space-insensitively, so
    ``BILLING`` in a test file is the model's ``Billing``); DataError at the first label outside the set, counting
    the others (``fix``: what to do)."""
    shown_as = spelled_as(labels)
    out, unknown = [], []
    for ex in examples:
        given = example_labels(ex)
        spelled = tuple(shown_as.get(normalize_label(label)) for label in given)
        unknown += [(ex, label) for label, known in zip(given, spelled) if known is None]
        label = spelled[0] if isinstance(ex.label, str) else spelled
        out.append(ex if label == ex.label else replace(ex, label=label))
    if unknown:
        (ex, label), n = unknown[0], len(unknown)
        others = f"; {n - 1} more row(s) have labels outside the set" if n > 1 else ""
        raise DataError(f"{ex.source}:{ex.line}: label {label!r} is not in the label set ({some_labels(labels)}){others}; {fix}")
    return out


def resolve_labels(declared: Sequence[str] | None, examples: Sequence[Example]) -> list[str]:
    """The declared label set (cleaned, in order), or every label seen in the data, sorted case-insensitively.

    Labels keep the data's case (predictions come back as ``Very Positive``, not ``very positive``); spellings
    that differ only in case or spacing are one label, shown as its most frequent spelling.
    """
    if declared:
        labels = [clean_label(label) for label in declared]
        if len({normalize_label(label) for label in labels}) != len(labels):
            raise LoratuneError(f"--labels has duplicates after normalisation: {', '.join(declared)}")
        return labels
    spellings = Counter(label for ex in examples for label in example_labels(ex))
    seen: dict[str, str] = {}
    for label, _ in spellings.most_common():  # ties: the spelling met first
        seen.setdefault(normalize_label(label), label)
    if len(seen) < 2:
        raise DataError(f"{examples[0].source}: found {len(seen)} distinct label(s); a classifier needs at least two")
    if all(re.fullmatch(r"-?\d+", key) for key in seen):  # integer labels in numeric order: 0, 1, 2, ..., 10
        return [seen[key] for key in sorted(seen, key=int)]
    return [seen[key] for key in sorted(seen)]


def label_counts(examples: Sequence[Example]) -> Counter:
    return Counter(label for ex in examples for label in example_labels(ex))


def imbalance_warning(counts: Counter, labels: Sequence[str], ratio: float = 3.0) -> str | None:
    """A warning when the most frequent label outnumbers the rarest by more than ``ratio``, or a label is absent."""
    missing = [label for label in labels if counts.get(label, 0) == 0]
    if missing:
        return f"no training examples for {len(missing)} label(s): {some_labels(missing)}"
    most, least = max(counts[x] for x in labels), min(counts[x] for x in labels)
    if most > ratio * least:
        rare = min(labels, key=lambda x: counts[x])
        return f"labels are imbalanced: {most} vs {least} examples ({rare!r} is rarest); consider more data for it"
    return None


def first_list_label(path, label_field: str = "label", name: str = "data") -> str | None:
    """``FILE:LINE`` of the first list-valued label in a JSONL or Parquet file or an in-memory table (``name``),
    else None (a CSV cell is always a string)."""
    if isinstance(path, (str, Path)) and Path(path).suffix.lower() in CSV_SUFFIXES:
        return None
    records, _ = _source_records(path, name, label_field)
    for where, _, record in records:
        if isinstance(record.get(label_field), list):
            return where
    return None


def check_multi_label_names(labels: Sequence[str]) -> None:
    """Multi-label outputs are comma-separated lists, so a label containing the separator could not be read back."""
    separator = LABEL_SEPARATOR.strip()
    bad = [label for label in labels if separator in label]
    if bad:
        raise DataError(
            f"label(s) {', '.join(map(repr, bad))} contain {separator!r}, which separates labels in multi-label outputs; rename them"
        )


def load_splits(cfg: DataConfig, seed: int = 42, train_data=None, val_data=None) -> Splits:
    """Load train and validation data as configured, settle the label set, and validate every label.

    ``train_data`` / ``val_data``: a ``datasets.Dataset`` (or list of dicts) instead of the configured files;
    with ``train_data`` and no ``val_data`` the validation set is split from it (``cfg.val`` is not read).
    A list-valued label in JSONL/Parquet/table training data makes the data multi-label even without
    ``--multi-label``; the first such row is named in ``Splits.warnings`` so the switch is never silent.
    """
    train_source = cfg.train if train_data is None else train_data
    val_source = val_data if val_data is not None else (cfg.val if train_data is None else None)
    detected = None if cfg.multi_label else first_list_label(train_source, cfg.label_field, "train_data")
    multi_label = cfg.multi_label or detected is not None
    read = dict(text_field=cfg.text_field, label_field=cfg.label_field, multi_label=multi_label, label_delimiter=cfg.label_delimiter)
    train = read_examples(train_source, **read, name="train_data")
    labels = resolve_labels(cfg.labels, train)
    train = check_labels(train, labels)
    if multi_label:
        check_multi_label_names(labels)
    if val_source is not None and not (isinstance(val_source, str) and not val_source):
        val = read_examples(val_source, **read, name="val_data")
        val = check_labels(val, labels)
        is_split = False
    else:
        train, val = split_train_val(train, cfg.val_fraction, seed)
        is_split = True
    warnings = quality_warnings(train, val)
    imbalance = imbalance_warning(label_counts(train), labels)
    if imbalance:
        warnings.append(imbalance)
    if detected:
        warnings.insert(
            0,
            f"multi-label data detected ({detected} has a list of labels): each example may carry "
            f"several labels; pass --multi-label to make this explicit",
        )
    return Splits(train=train, val=val, labels=labels, multi_label=multi_label, warnings=warnings, val_is_split=is_split)


def load_eval_examples(path: str | Path, cfg: DataConfig, labels: Sequence[str], multi_label: bool | None = None) -> list[Example]:
    """Read a labelled evaluation file and check its labels against the model's label set.

    ``multi_label`` (the model's own setting) overrides ``cfg.multi_label`` when given.
    """
    multi_label = cfg.multi_label if multi_label is None else multi_label
    examples = read_examples(path, cfg.text_field, cfg.label_field, multi_label, cfg.label_delimiter)
    examples = check_labels(examples, labels, "the model was not trained on it: drop those rows, or train again with them")
    return examples
