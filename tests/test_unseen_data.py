"""Data we never saw: plain field names, many labels, integer labels, BOM/CRLF CSVs, labels with one example.

Field detection (which field is the text, which the label) when the user named none, the flags that win over it,
and the readers and the validation split on awkward files. The last test trains a tiny encoder on such a file
and uses it with no flags at all.
"""

from __future__ import annotations

import csv
import json

import pytest
from conftest import cli, write_jsonl

from loratune.config import Config, load_config
from loratune.data import DataError, load_splits, read_examples, resolve_labels
from loratune.errors import LoratuneError
from loratune.fields import detect_fields, settle_fields
from loratune.split import split_train_val


def write_csv(path, header, rows, bom=False, crlf=False, delimiter=","):
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\r\n" if crlf else "\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [("how do I reset my password please", "account"), ("my parcel never arrived at all", "shipping")] * 3


@pytest.mark.parametrize(
    "header, text, label",
    [
        (["sentence", "label"], "sentence", "label"),
        (["utterance", "intent"], "utterance", "intent"),
        (["Review", "Sentiment"], "Review", "Sentiment"),
        (["content", "topic"], "content", "topic"),
        (["question", "label_text"], "question", "label_text"),
        (["Text", "Label"], "Text", "Label"),
        (["id", "message", "category"], "message", "category"),
        (["blurb", "kind"], "blurb", "kind"),  # no known name: the long text and the short repeated value
        (["query", "stars"], "query", "stars"),
    ],
)
def test_the_text_and_label_fields_are_found_and_said(header, text, label):
    rows = [dict(zip(header, (["7"] if len(header) == 3 else []) + list(r))) for r in ROWS]
    used_text, used_label, note = detect_fields(rows, "text", "label", set(), "train.csv")
    assert (used_text, used_label) == (text, label)
    changed = [flag for flag, name, default in (("--text-field", text, "text"), ("--label-field", label, "label")) if name != default]
    assert note.startswith("train.csv: reading ") and all(flag in note for flag in changed)


def test_label_ids_beside_their_names_read_the_names_unless_the_ids_were_asked_for():
    rows = [{"text": t, "label": i % 2, "label_text": y} for i, (t, y) in enumerate(ROWS)]
    text, label, note = detect_fields(rows, "text", "label", set(), "hf.jsonl")
    assert (text, label) == ("text", "label_text") and "label from 'label_text'" in note
    assert detect_fields(rows, "text", "label", {"data.label_field"}, "hf.jsonl") == ("text", "label", None)


def test_a_second_field_that_never_repeats_is_not_taken_for_the_label():
    rows = [{"text": t, "note": f"note {i}"} for i, (t, _) in enumerate(ROWS)]
    assert detect_fields(rows, "text", "label", set(), "f") == ("text", "label", None)  # the reader's missing-field error


def test_an_id_or_a_one_word_column_is_not_taken_for_the_text():
    ids = [{"id": f"r{i}", "label": y} for i, (_, y) in enumerate(ROWS)]
    assert detect_fields(ids, "text", "label", set(), "f")[0] == "text"  # no text here: the reader's missing-field error
    words = [{"a": "positive" if i % 2 else "negative", "b": i % 2} for i in range(len(ROWS))]
    assert detect_fields(words, "text", "label", set(), "f")[:2] == ("text", "label")  # not a = text, b = label


def test_plain_text_and_label_say_nothing():
    assert detect_fields([{"text": "a", "label": "b", "intent": "c"}], "text", "label", set(), "f") == ("text", "label", None)


def test_two_candidates_are_an_error_naming_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": t, "query": t, "label": y} for t, y in ROWS])
    with pytest.raises(LoratuneError, match=r"'question' and 'query' could both be the text; choose with --text-field") as err:
        settle_fields(load_config(), str(path))
    assert "fields present: question, query, label" in str(err.value)


def test_the_users_fields_win_and_are_never_replaced(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": t, "query": t.upper(), "label": y} for t, y in ROWS])
    cfg = load_config(overrides={"data.text_field": "query"})
    assert settle_fields(cfg, str(path)) is None and cfg.data.text_field == "query"
    # Naming the default explicitly means it: a file without it is the reader's missing-field error, not a guess.
    other = write_jsonl(tmp_path / "u.jsonl", [{"utterance": t, "intent": y} for t, y in ROWS])
    cfg = load_config(overrides={"data.text_field": "text", "data.train": str(other)})
    settle_fields(cfg, str(other))
    assert (cfg.data.text_field, cfg.data.label_field) == ("text", "intent")
    with pytest.raises(DataError, match=r"missing field 'text' \(fields present: utterance, intent\); map yours with --text-field"):
        load_splits(cfg.data)


def test_a_config_built_in_python_keeps_its_fields_after_they_were_settled(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"utterance": t, "intent": y} for t, y in ROWS])
    cfg = Config()
    settle_fields(cfg, str(path))
    assert (cfg.data.text_field, cfg.data.label_field) == ("utterance", "intent")
    plain = write_jsonl(tmp_path / "p.jsonl", [{"text": t, "label": y} for t, y in ROWS])
    settle_fields(cfg, str(plain))  # detected names are not the user's choice: the next file is read as it is
    assert (cfg.data.text_field, cfg.data.label_field) == ("text", "label")


def test_an_in_memory_table_is_detected_like_a_file():
    cfg = Config()
    note = settle_fields(cfg, [{"sentence": t, "category": y} for t, y in ROWS], name="train_data")
    assert (cfg.data.text_field, cfg.data.label_field) == ("sentence", "category") and note.startswith("train_data: reading")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_predict_input_finds_its_text_field(tmp_path, suffix):
    path = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [{"id": i, "utterance": t} for i, (t, _) in enumerate(ROWS)])
    elif suffix == ".csv":
        write_csv(path, ["utterance"], [(t,) for t, _ in ROWS])
    else:
        path.write_text("\n".join(t for t, _ in ROWS))
    cfg = load_config()
    note = settle_fields(cfg, str(path), labelled=False)
    assert cfg.data.text_field == ("text" if suffix == ".txt" else "utterance")
    assert (note is None) == (suffix == ".txt") and cfg.data.label_field == "label"


def test_a_bom_crlf_csv_with_capitalised_headers_and_multiline_cells_reads(tmp_path):
    rows = [
        (t + ("\r\nsecond line" if i == 0 else ""), "Très Négatif" if y == "account" else "Very Positive") for i, (t, y) in enumerate(ROWS)
    ]
    path = write_csv(tmp_path / "d.csv", ["Review", "Sentiment"], rows, bom=True, crlf=True)
    cfg = load_config(overrides={"data.train": str(path)})
    settle_fields(cfg, str(path))
    examples = read_examples(path, cfg.data.text_field, cfg.data.label_field)
    assert len(examples) == len(rows) and {e.label for e in examples} == {"Très Négatif", "Very Positive"}
    assert "second line" in examples[0].text


def test_integer_labels_read_alike_from_csv_tsv_jsonl_and_sort_as_numbers(tmp_path):
    labels = [0, 2, 10, 1, 2.0]
    tsv = write_csv(tmp_path / "t.tsv", ["text", "label"], [(f"text {i}", y) for i, y in enumerate(labels[:4])], delimiter="\t")
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"text": f"text {i}", "label": y} for i, y in enumerate(labels)])
    from_tsv, from_jsonl = read_examples(tsv), read_examples(jsonl)
    assert [e.label for e in from_tsv] == [e.label for e in from_jsonl][:4] == ["0", "2", "10", "1"]
    assert from_jsonl[4].label == "2"  # 2.0, as a Parquet/pandas column with gaps stores integers
    assert resolve_labels(None, from_jsonl) == ["0", "1", "2", "10"]


def test_the_split_keeps_every_label_in_train_when_labels_have_one_or_two_examples():
    from loratune.data import Example

    examples = [Example(f"text {label} {i}", f"label {label}") for label in range(200) for i in range(1 + label % 3)]
    train, val = split_train_val(examples, 0.1, seed=42)
    assert {e.label for e in train} == {e.label for e in examples}  # no label left for val alone
    assert len(val) == round(0.1 * len(examples)) and len(train) + len(val) == len(examples)
    assert not {e.text for e in train} & {e.text for e in val}
    assert split_train_val(examples, 0.1, seed=42) == (train, val)


def test_a_test_label_never_seen_in_training_is_one_clear_sentence(tmp_path):
    from loratune.data import load_eval_examples

    labels = [f"label {i}" for i in range(150)]
    path = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "label 1"}, {"text": "b", "label": "Brand New"}])
    with pytest.raises(DataError) as err:
        load_eval_examples(path, Config().data, labels)
    message = str(err.value)
    assert message.startswith(f"{path}:2: label 'Brand New' is not in the label set (label 0, label 1,") and len(message) < 300
    assert "142 more" in message and "drop those rows, or train again with them" in message
    assert "\n" not in message


@pytest.mark.integration
def test_an_own_file_trains_and_is_used_with_no_field_flags(tmp_path, tiny_encoder):
    words = "billing refund parcel password invoice login courier".split()
    rows = [(f"{words[i % 7]} question number {i} {words[(i * 3) % 7]}", f"Topic {i % 12}") for i in range(120)]
    rows += [("a one-off text", "Rare Label")]
    train = write_csv(tmp_path / "train.csv", ["utterance", "intent"], rows, bom=True, crlf=True)
    test = write_csv(tmp_path / "test.csv", ["utterance", "intent"], rows[:24])
    code, stdout, stderr = cli("inspect", "--model", tiny_encoder, "--train", train, "--json", "-n", 0)
    assert code == 0, stderr
    assert json.loads(stdout)["fields"] == {
        "text": "utterance",
        "label": "intent",
        "note": f"{train}: reading text from 'utterance' and label from 'intent' (detected; choose others with "
        "--text-field / --label-field)",
    }
    out = tmp_path / "run"
    code, stdout, stderr = cli("train", "--model", tiny_encoder, "--train", train, "--output-dir", out, "--max-steps", 2)
    assert code == 0, stderr
    assert f"{train}: reading text from 'utterance' and label from 'intent' (detected;" in stdout
    meta = json.loads((out / "final" / "loratune.json").read_text())
    assert meta["prompt"]["fields"]["text_field"] == "utterance" and "Rare Label" in meta["labels"]
    code, stdout, stderr = cli("evaluate", "--adapter", out / "final", "--test", test, "--json", "--output-dir", tmp_path / "ev")
    assert code == 0, stderr
    assert json.loads(stdout)["n"] == 24
    code, stdout, stderr = cli("predict", "--adapter", out / "final", "--input", test, "--json")
    assert code == 0, stderr
    predicted = [json.loads(line)["label"] for line in stdout.splitlines() if line.startswith("{")]
    assert len(predicted) == 24 and set(predicted) <= set(meta["labels"])  # the data's spelling: "Topic 3", not "topic 3"
    # No val file: calibrate rebuilds the same seeded split of the unchanged training file.
    code, stdout, stderr = cli("calibrate", "--adapter", out / "final", "--fallback-label", "Topic 0", "--json")
    assert code == 0, stderr
    assert f"{train} (validation split)" in stdout and json.loads(stdout)["n"] == meta["data"]["val_examples"]
    train.write_text(train.read_text(encoding="utf-8-sig") + "one more text,Topic 1\n", encoding="utf-8")
    code, _, stderr = cli("calibrate", "--adapter", out / "final", "--fallback-label", "Topic 0")
    assert code == 2 and "changed since training, so its validation split cannot be rebuilt: pass --val FILE" in stderr


def test_a_json_array_file_and_a_semicolon_csv_read_like_jsonl(tmp_path):
    rows = [{"text": t, "label": y} for t, y in ROWS]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (tmp_path / "s.csv").write_text("text;label\r\n" + "".join(f"{t};{y}\r\n" for t, y in ROWS), encoding="utf-8")
    expected = [(t, y) for t, y in ROWS]
    assert [(e.text, e.label) for e in read_examples(tmp_path / "a.json")] == expected
    assert [(e.text, e.label) for e in read_examples(tmp_path / "s.csv")] == expected
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], 3]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: item 2 of the array: expected a JSON object"):
        read_examples(tmp_path / "bad.json")
