"""Bring your own data: a CSV with its own field names, nothing else on the command line.

Nothing of the shipped demo may leak in (its labels, its validation file, its prompt), and the adapter remembers
the fields, so later commands need no flags again.
"""

import csv
import json

import pytest
from conftest import DATA, read_jsonl

from loratune.errors import LoratuneError

pytestmark = pytest.mark.integration


def write_csv(path, rows, id_start=0):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ticket_id", "body", "category"])
        for i, r in enumerate(rows, id_start):
            w.writerow([f"T-{i}", r["text"], r["label"] if isinstance(r["label"], str) else "|".join(r["label"])])
    return path


@pytest.fixture(scope="module")
def cli():
    from typer.testing import CliRunner

    from loratune.cli import app

    def invoke(*args, ok=True):
        result = CliRunner().invoke(app, [str(a) for a in args])
        if ok:
            assert result.exit_code == 0, (result.output[-3000:], result.exception)
        return result

    return invoke


@pytest.fixture(scope="module")
def own(tmp_path_factory, demo_rows, tiny_t5, cli):
    """Three of the demo's labels, renamed fields, no --val, no --labels: train once."""
    d = tmp_path_factory.mktemp("own")
    keep = {"billing", "shipping", "account"}
    rows = [r for r in demo_rows["train"] if r["label"] in keep][:150]
    test_rows = [r for r in demo_rows["test"] if r["label"] in keep][:12]
    train_csv, test_csv = write_csv(d / "train.csv", rows), write_csv(d / "test.csv", test_rows, 1000)
    out = d / "run"
    result = cli(
        "train",
        "--model",
        tiny_t5,
        "--train",
        train_csv,
        "--text-field",
        "body",
        "--label-field",
        "category",
        "--id-field",
        "ticket_id",
        "--output-dir",
        out,
        "--max-steps",
        8,
        "--batch-size",
        8,
        "--lr",
        0.005,
        "--task",
        "You sort support tickets.",
        "--json",
    )
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    return {"adapter": out / "final", "summary": summary, "output": result.output, "test": test_csv, "dir": d, "rows": test_rows}


def test_labels_and_validation_come_from_the_users_data(own):
    meta = json.loads((own["adapter"] / "loratune.json").read_text())
    assert meta["labels"] == ["account", "billing", "shipping"]  # from the data, sorted; not the demo's five
    assert meta["data"]["val"] == "split from train" and "(val split from train)" in own["output"]
    assert meta["prompt"]["task"] == "You sort support tickets." and meta["prompt"]["input_name"] == "text"
    assert meta["prompt"]["fields"] == {"text_field": "body", "label_field": "category", "id_field": "ticket_id"}


def test_later_commands_reuse_the_remembered_fields_and_pass_ids_through(own, cli):
    result = cli("predict", "--input", own["test"], "--adapter", own["adapter"], "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in rows] == [f"T-{i}" for i in range(1000, 1000 + len(own["rows"]))]
    assert [r["text"] for r in rows] == [r["text"] for r in own["rows"]]
    assert all(r["label"] in {"account", "billing", "shipping"} and r["cut_tokens"] == 0 for r in rows)
    report = json.loads(
        cli("evaluate", "--adapter", own["adapter"], "--test", own["test"], "--json", "--output-dir", own["dir"] / "eval").stdout
    )
    assert report["n"] == len(own["rows"]) and "examples_per_s" in report["results"][0]


def test_abstain_gives_the_fallback_label_below_the_confidence_floor(own, cli):
    # Three labels: a top probability is at least 1/3, so a floor of 0.99 abstains on (nearly) everything here.
    result = cli(
        "predict", "--input", own["test"], "--adapter", own["adapter"], "--json", "--min-confidence", 0.99, "--fallback-label", "ACCOUNT"
    )  # labels compare case-insensitively: ACCOUNT is the label set's "account", and answers are spelled as it is
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        top = max(r["scores"].values())
        assert r["label"] == "account" if top < 0.99 else r["label"] == max(r["scores"], key=r["scores"].get)
    bad = cli("predict", "x", "--adapter", own["adapter"], "--min-confidence", 0.5, "--fallback-label", "oos", ok=False)
    # (main() turns a LoratuneError into one line and exit 2; the app itself raises it.)
    assert isinstance(bad.exception, LoratuneError) and "is not one of the labels" in str(bad.exception)


def test_calibrate_from_python_takes_labels_and_the_fallback_in_any_case(own, demo_rows):
    from loratune.calibrate import calibrate_abstain
    from loratune.data import Example
    from loratune.predict import Classifier

    clf = Classifier.from_pretrained(own["adapter"])
    rows = [r for r in demo_rows["val"] if r["label"] in clf.labels][:12]
    upper = calibrate_abstain(clf, [Example(r["text"], r["label"].upper()) for r in rows], "ACCOUNT")  # was a ValueError
    lower = calibrate_abstain(clf, [Example(r["text"], r["label"]) for r in rows], "account")
    assert upper == lower and upper["n"] == len(rows)
    with pytest.raises(LoratuneError, match="not one of the adapter's labels"):
        calibrate_abstain(clf, [Example("x", "technical")], "account")


def test_a_multi_label_adapter_never_predicts_a_label_its_data_did_not_have(tmp_path, tiny_t5, cli):
    keep = {"billing", "account", "shipping"}
    ml = [r for r in read_jsonl(DATA.parent / "multilabel" / "train.jsonl") if set(r["label"]) <= keep]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ml[:80]))
    cli(
        "train",
        "--model",
        tiny_t5,
        "--train",
        tmp_path / "train.jsonl",
        "--output-dir",
        tmp_path / "run",
        "--max-steps",
        6,
        "--batch-size",
        8,
        "--lr",
        0.005,
    )
    meta = json.loads((tmp_path / "run" / "final" / "loratune.json").read_text())
    assert meta["multi_label"] is True and meta["labels"] == ["account", "billing", "shipping"]
    texts = tmp_path / "texts.txt"
    texts.write_text("my card was charged twice\nthe app crashes\nwhere is my parcel\n")
    for mode in ("score", "generate"):
        rows = [
            json.loads(x)
            for x in cli("predict", "--input", texts, "--adapter", tmp_path / "run" / "final", "--json", "--mode", mode).stdout.splitlines()
            if x.startswith("{")
        ]
        assert rows and all(set(r["labels"]) <= keep for r in rows)
