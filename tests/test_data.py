import json
import sys
from pathlib import Path

import pytest

from loratune.config import DataConfig
from loratune.data import DataError, load_splits, normalize_label, read_examples, read_texts

ROOT = Path(__file__).resolve().parents[1]

LABELS = ["billing", "technical", "account", "shipping", "other"]


def jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reads_jsonl_and_cleans_labels_keeping_their_case(tmp_path):
    path = jsonl(tmp_path, "a.jsonl", [{"text": " hi ", "label": " Billing "}, {"text": "yo", "label": "OTHER"}])
    examples = read_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [("hi", "Billing", 1), ("yo", "OTHER", 2)]


def test_reads_csv_with_field_mapping(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('id,text,category\n1,"Refund, please",billing\n2,App crashed,technical\n', encoding="utf-8")
    examples = read_examples(path, text_field="text", label_field="category")
    assert [(e.text, e.label, e.line) for e in examples] == [("Refund, please", "billing", 2), ("App crashed", "technical", 3)]


@pytest.mark.parametrize(
    "rows,message",
    [
        (['{"text": "a", "label": "billing"}', '{"text": "b", "label": '], r"bad.jsonl:2: invalid JSON"),
        ([{"text": "a", "label": "billing"}, {"text": "b"}], r"bad.jsonl:2: missing field 'label'"),
        ([{"text": "a", "label": "billing"}, {"text": "b", "label": "refunds"}], r"bad.jsonl:2: label 'refunds' is not in the label set"),
        ([{"text": "  ", "label": "billing"}], r"bad.jsonl:1: field 'text' is empty"),
        ([{"text": "a", "label": ""}], r"bad.jsonl:1: empty or non-string label"),
        ([{"text": 5, "label": "billing"}], r"bad.jsonl:1: field 'text' must be a string"),
        (['["a", "billing"]'], r"bad.jsonl:1: expected a JSON object"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, rows, message):
    path = jsonl(tmp_path, "bad.jsonl", rows)
    cfg = DataConfig(train=str(path), val=None, labels=LABELS)
    with pytest.raises(DataError, match=message):
        load_splits(cfg)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        read_examples(path)


def test_latin1_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "billing"}\n{"text": "caf\xe9", "label": "billing"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not valid UTF-8 \(byte 0xe9\)"):
        read_examples(path)


def test_csv_missing_column_says_which_flag(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("body,category\nhello,billing\n")
    with pytest.raises(DataError, match=r"t.csv:2: missing field 'text' .*--text-field"):
        read_examples(path, label_field="category")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "t.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type ..xlsx.; use .jsonl, .csv or .parquet"):
        read_examples(path)


def test_label_set_from_data_when_not_declared(tmp_path):
    path = jsonl(tmp_path, "a.jsonl", [{"text": f"t{i}", "label": lab} for i, lab in enumerate("bcab" * 5)])
    splits = load_splits(DataConfig(train=str(path), val=None, labels=None, val_fraction=0.25))
    assert splits.labels == ["a", "b", "c"]


def test_stratified_seeded_split(tmp_path):
    rows = [{"text": f"ticket {i}", "label": "billing" if i % 4 else "other"} for i in range(200)]
    path = jsonl(tmp_path, "a.jsonl", rows)
    cfg = DataConfig(train=str(path), val=None, labels=["billing", "other"], val_fraction=0.2)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert [e.text for e in a.val] == [e.text for e in b.val]
    assert a.val_is_split and len(a.val) == 40 and len(a.train) == 160
    assert sum(e.label == "other" for e in a.val) == 10  # 25% of val, like the whole set
    assert not {e.text for e in a.val} & {e.text for e in a.train}


def test_duplicates_and_overlap_are_reported_not_fatal(tmp_path):
    train = jsonl(
        tmp_path,
        "t.jsonl",
        [{"text": "Same text", "label": "billing"}, {"text": "same  TEXT", "label": "other"}, {"text": "unique", "label": "billing"}],
    )
    val = jsonl(tmp_path, "v.jsonl", [{"text": "unique", "label": "billing"}])
    splits = load_splits(DataConfig(train=str(train), val=str(val), labels=LABELS))
    joined = " | ".join(splits.warnings)
    assert "1 duplicate text(s)" in joined
    assert "appear with different labels" in joined
    assert "1 validation text(s) also appear in the training data" in joined


def test_imbalance_warning(tmp_path):
    rows = [{"text": f"t{i}", "label": "billing"} for i in range(40)] + [{"text": "x", "label": "other"}]
    path = jsonl(tmp_path, "a.jsonl", rows)
    splits = load_splits(DataConfig(train=str(path), val=str(path), labels=["billing", "other"]))
    assert any("imbalanced" in w for w in splits.warnings)


def test_read_texts_plain_lines_and_jsonl(tmp_path):
    plain = tmp_path / "in.txt"
    plain.write_text("first\n\n second \n")
    assert read_texts(plain) == ["first", "second"]
    path = jsonl(tmp_path, "in.jsonl", [{"body": "a"}, {"body": "b"}])
    assert read_texts(path, text_field="body") == ["a", "b"]


def test_normalize_label():
    assert normalize_label("  Tech   Support ") == "tech support"


def test_labels_keep_their_spelling_and_compare_case_insensitively(tmp_path):
    rows = [("a", "Very Positive"), ("b", "very  positive"), ("c", "Very Positive"), ("d", "Negative"), ("e", "NEGATIVE ")]
    rows += [("f", "Negative"), ("g", "Very Positive"), ("h", "Negative")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "z", "label": "NEGATIVE"}) + "\n")
    splits = load_splits(DataConfig(train=str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl")))
    assert splits.labels == ["Negative", "Very Positive"]  # the most frequent spelling, sorted case-insensitively
    assert {ex.label for ex in splits.train} == {"Negative", "Very Positive"}
    assert [ex.label for ex in splits.val] == ["Negative"]


def test_shipped_demo_data_has_no_duplicates_or_templated_near_duplicates():
    import subprocess

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "data").glob("*/*.jsonl"))
    assert len(files) == 6
    result = subprocess.run([sys.executable, "scripts/check_dataset.py", *files], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "exact duplicates: 0; pairs above Jaccard 0.6: 0" in result.stdout
