"""Data sources beside JSONL and CSV: Parquet files (pyarrow) and in-memory tables (a 🤗 ``datasets.Dataset``, or
any sequence of dicts, passed to the Python API).

Each yields the same ``(where, row, record)`` triples as a JSONL or CSV file, so one validation (data.py) checks
them all and reports a problem the same way: ``SOURCE:ROW: what is wrong``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from .data import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
DATA_EXTRA = "pip install 'loratune[data]'"


def parquet_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    """The rows of a Parquet file, numbered from 1."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed: pip install pyarrow (or {DATA_EXTRA})") from None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file is empty")
    row = 0
    for batch in table.to_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:{row}", row, record


def dataset_records(data, name: str, label_field: str | None = None) -> Iterator[tuple[str, int, dict]]:
    """The rows of a ``datasets.Dataset`` (or a list of dicts), numbered from 1; ``name`` stands for the file name
    in messages. A ``ClassLabel`` label column gives its label names, not their integer ids."""
    if isinstance(data, (str, bytes, Path)) or not hasattr(data, "__iter__"):
        raise DataError(f"{name} must be a datasets.Dataset or a list of dicts, got {type(data).__name__}")
    if isinstance(getattr(data, "column_names", None), dict):  # a DatasetDict: {split: Dataset}
        raise DataError(f"{name} is a DatasetDict with splits {', '.join(data)}; pass one split, e.g. {name}=ds['train']")
    feature = (getattr(data, "features", None) or {}).get(label_field) if label_field else None
    names = getattr(feature, "names", None)
    row = 0
    for row, record in enumerate(data, start=1):
        if not isinstance(record, Mapping):
            raise DataError(f"{name}:{row}: expected a mapping like {{'text': ..., 'label': ...}}, got {type(record).__name__}")
        record = dict(record)
        if names and isinstance(record.get(label_field), int) and 0 <= record[label_field] < len(names):
            record[label_field] = names[record[label_field]]
        yield f"{name}:{row}", row, record
    if row == 0:
        raise DataError(f"{name}: no examples found")


def source_fingerprint(source) -> dict[str, object]:
    """What identifies the training data in the adapter metadata: a file's path, SHA-256 and size, or an in-memory
    table's kind, row count and (``datasets``) fingerprint."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}
    out: dict[str, object] = {"source": f"{type(source).__module__}.{type(source).__name__}", "rows": len(source)}
    if getattr(source, "_fingerprint", None):
        out["fingerprint"] = source._fingerprint
    return out
