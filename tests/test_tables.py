"""Training data from a Parquet file or a 🤗 ``datasets.Dataset``: the same validation and messages as JSONL."""

import json
import sys

import pytest
from conftest import LABELS, tiny_config, write_jsonl

from loratune.config import DataConfig
from loratune.data import DataError, load_splits, read_examples, read_texts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

ROWS = [{"text": "card charged twice", "label": "billing"}, {"text": "app crashes", "label": "technical"}]


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"text": "a"}, {"text": "b"}], ":1: missing field 'label' (fields present: text); map yours with --label-field"),
        ([ROWS[0], {"text": "b", "label": "refunds"}], ":2: label 'refunds' is not in the label set (billing, technical); fix the data"),
        ([ROWS[0], {"text": "  ", "label": "billing"}], ":2: field 'text' is empty"),
        ([ROWS[0], {"text": "b", "label": None}], ":2: field 'label' is empty (null)"),
    ],
)
def test_parquet_and_datasets_fail_with_the_jsonl_sentences(tmp_path, rows, expected):
    """Each source names itself and the row, then says exactly what JSONL says."""
    cfg = DataConfig(val=None, labels=["billing", "technical"])
    jsonl, pq_path = write_jsonl(tmp_path / "t.jsonl", rows), parquet(tmp_path / "t.parquet", rows)
    messages = {}
    for name, source in ((str(jsonl), None), (str(pq_path), None), ("train_data", datasets.Dataset.from_list(rows))):
        with pytest.raises(DataError) as err:
            load_splits(DataConfig(train=name, val=None, labels=cfg.labels), train_data=source)
        assert str(err.value).startswith(name + expected)
        messages[name] = str(err.value)[len(name) :]
    assert len(set(messages.values())) == 1


def test_parquet_file_reads_like_jsonl(tmp_path):
    rows = [{"id": i, "text": f"text {i}", "label": "billing" if i % 2 else "technical"} for i in range(6)]
    path = parquet(tmp_path / "t.parquet", rows)
    from_parquet = read_examples(path)
    from_jsonl = read_examples(write_jsonl(tmp_path / "t.jsonl", rows))
    assert [(e.text, e.label, e.line) for e in from_parquet] == [(e.text, e.label, e.line) for e in from_jsonl]
    assert read_texts(path) == [r["text"] for r in rows]


def test_parquet_list_labels_make_the_data_multi_label(tmp_path):
    rows = [{"text": "a", "label": ["billing", "technical"]}, {"text": "b", "label": ["billing"]}, {"text": "c", "label": ["technical"]}]
    splits = load_splits(DataConfig(train=str(parquet(tmp_path / "m.parquet", rows)), val=str(parquet(tmp_path / "v.parquet", rows))))
    assert splits.multi_label and splits.train[0].label == ("billing", "technical")
    assert "m.parquet:1 has a list of labels" in splits.warnings[0]


def test_dataset_class_label_column_gives_label_names():
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["billing", "technical"])})
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 1, 0]}, features=features)
    splits = load_splits(DataConfig(), train_data=ds, val_data=ds)
    assert [e.label for e in splits.train] == ["billing", "technical", "technical", "billing"] and not splits.val_is_split
    with pytest.raises(DataError, match=r"DatasetDict with splits train; pass one split, e.g. train_data=ds\['train'\]"):
        load_splits(DataConfig(), train_data=datasets.DatasetDict({"train": ds}))


def test_missing_pyarrow_is_one_sentence_with_the_pip_command(tmp_path, monkeypatch):
    path = parquet(tmp_path / "t.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"t.parquet: reading Parquet needs pyarrow, which is not installed: pip install pyarrow"):
        read_examples(path)


def test_a_damaged_parquet_file_is_one_sentence(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        read_examples(tmp_path / "bad.parquet")


@pytest.mark.integration
def test_parquet_and_a_dataset_train_the_tiny_model(tmp_path, tiny_t5, small_data, demo_rows):
    from loratune.train import train  # (after `import loratune.train`, loratune.train is the module)

    rows = demo_rows["train"][:96]
    cfg = tiny_config(tiny_t5, {**small_data, "train": parquet(tmp_path / "train.parquet", rows)}, tmp_path / "pq", max_steps=4)
    result = train(cfg, echo=lambda *a, **k: None)
    meta = json.loads((result.adapter_dir / "loratune.json").read_text())
    assert meta["data"]["train"]["path"].endswith("train.parquet") and meta["data"]["train_examples"] == 96

    cfg = tiny_config(tiny_t5, small_data, tmp_path / "ds", max_steps=4)
    ds = datasets.Dataset.from_list(rows)
    result = train(cfg, train_data=ds, echo=lambda *a, **k: None)
    meta = json.loads((result.adapter_dir / "loratune.json").read_text())
    assert meta["data"]["train"] == {"source": "datasets.arrow_dataset.Dataset", "rows": 96, "fingerprint": ds._fingerprint}
    assert meta["data"]["val"] == "split from train" and meta["data"]["train_examples"] + meta["data"]["val_examples"] == 96
    assert sorted(meta["labels"]) == sorted(LABELS)
