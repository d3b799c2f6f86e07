"""Multi-label classification: list labels in, several labels out, on the real code path with the tiny T5.

One short CLI training run on a slice of data/multilabel/ is shared by the end-to-end tests: train (CLI) ->
predict (both modes) -> evaluate (metrics re-derived here by hand / scikit-learn) -> calibrate.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import ROOT, read_jsonl, write_jsonl
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support
from sklearn.preprocessing import MultiLabelBinarizer

from loratune.calibrate import calibrate_threshold
from loratune.config import DataConfig
from loratune.data import DataError, load_splits, normalize_label, read_examples
from loratune.evaluate import compute_multilabel_metrics
from loratune.families import Seq2SeqFamily
from loratune.predict import INVALID, Classifier, decide_labels, label_sets
from loratune.prompt import PromptSpec, format_example, format_target

ML = ROOT / "data" / "multilabel"
LABELS = ["billing", "technical", "account", "shipping", "other"]


# ---- data, prompt and decision rule (no model) ---------------------------------------------------


def test_list_labels_make_the_data_multi_label_and_say_so():
    splits = load_splits(DataConfig(train=str(ML / "train.jsonl"), val=str(ML / "val.jsonl"), labels=LABELS))
    assert splits.multi_label
    assert "multi-label data detected" in splits.warnings[0] and "train.jsonl:1" in splits.warnings[0]
    assert all(isinstance(e.label, tuple) and e.label for e in splits.train + splits.val)
    assert max(len(e.label) for e in splits.train) == 3
    explicit = load_splits(DataConfig(train=str(ML / "train.jsonl"), val=str(ML / "val.jsonl"), labels=LABELS, multi_label=True))
    assert explicit.multi_label and not any("detected" in w for w in explicit.warnings)


def test_csv_labels_split_on_the_configured_delimiter(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"Refund, and reset my login","billing; account"\nApp crashed,technical\n', encoding="utf-8")
    examples = read_examples(path, multi_label=True, label_delimiter=";")
    assert [e.label for e in examples] == [("billing", "account"), ("technical",)]
    cfg = DataConfig(train=str(path), val=None, labels=LABELS, label_delimiter=";")
    with pytest.raises(DataError, match=r"t.csv:2: label 'billing; account' is not in the label set"):
        load_splits(cfg)  # a CSV cell is one label unless multi-label is asked for


def test_a_label_containing_the_separator_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a", "label": ["x,y", "z"]}, {"text": "b", "label": ["z"]}])
    with pytest.raises(DataError, match="contain ','"):
        load_splits(DataConfig(train=str(path), val=None, labels=None))


def test_targets_are_what_the_prompt_asks_for_and_parse_back():
    prompt = format_example("x", LABELS, multi_label=True)
    assert "output all of the following labels that apply, comma-separated, in the order listed" in prompt
    clf = Classifier(Seq2SeqFamily(None, None, PromptSpec(LABELS, multi_label=True)))  # parsing needs no model
    for s in label_sets(len(LABELS)):
        chosen = [LABELS[i] for i in s]
        target = format_target(tuple(reversed(chosen)), LABELS)
        assert target == ", ".join(chosen)
        assert clf.parse_labels(target) == (chosen, [])
    assert clf.parse_labels("Shipping,billing , refunds,, billing") == (["billing", "shipping"], ["refunds"])
    assert clf.parse_labels("Customer message: hello") == ([], ["Customer message: hello"])


def test_decision_rule_thresholds_and_keeps_at_least_one_label():
    probs = np.array([[0.9, 0.6, 0.1], [0.3, 0.4, 0.2], [0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(decide_labels(probs), [[1, 1, 0], [0, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(decide_labels(probs, allow_empty=True), [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(decide_labels(probs, 0.95), [[1, 0, 0], [0, 1, 0], [1, 0, 0]])


def test_calibration_picks_the_threshold_with_the_best_micro_f1():
    # Gold labels sit at 0.3, wrong ones at 0.1: any threshold in (0.1, 0.3] is perfect; 0.3 is nearest 0.5.
    gold = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=bool)
    probs = np.where(gold, 0.3, 0.1)
    threshold, best = calibrate_threshold(probs, gold)
    assert threshold == pytest.approx(0.3) and best == pytest.approx(1.0)
    assert f1_score(gold, decide_labels(probs, 0.5), average="micro") < 1.0  # the default was worse


def test_multilabel_metrics_by_hand():
    gold = [("a", "b"), ("b",), ("c",), ("a", "c")]
    pred = [["a"], ["b"], [], ["a", "b", "c"]]
    m = compute_multilabel_metrics(gold, pred, ["a", "b", "c"], n_invalid=1, n_unknown=2)
    tp, fp, fn = 4, 1, 2  # a,b,a,c right; b wrongly added; b and c missed
    assert m["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["subset_accuracy"] == pytest.approx(1 / 4)
    assert m["hamming_loss"] == pytest.approx((fp + fn) / 12)
    assert m["per_label"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["confusion_matrix"]["values"][2] == [[2, 0], [1, 1]]  # c: [[TN, FP], [FN, TP]]
    assert m["invalid_rate"] == 0.25 and m["unknown_labels"] == 2
    assert m["labels_per_example"] == {"gold": 1.5, "pred": 1.25}


def test_calibrate_and_threshold_errors_are_clear():
    from loratune.calibrate import calibrate
    from loratune.config import Config, validate
    from loratune.errors import LoratuneError

    with pytest.raises(LoratuneError, match="is single-label"):
        calibrate(Classifier(Seq2SeqFamily(None, None, PromptSpec(LABELS)), name="adapter-x"), [])
    cfg = Config()
    cfg.predict.threshold = 1.5
    with pytest.raises(LoratuneError, match=r"predict.threshold must be in \[0, 1\]"):
        validate(cfg)


# ---- end to end on the tiny T5 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml-data")
    sizes = {"train": 120, "val": 20, "test": 20}
    return {split: write_jsonl(d / f"{split}.jsonl", read_jsonl(ML / f"{split}.jsonl")[:n]) for split, n in sizes.items()}


@pytest.fixture(scope="module")
def cli():
    """The real typer app, in process (one import of torch for the whole flow instead of one per command)."""
    from typer.testing import CliRunner

    from loratune.cli import app

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (result.output[-3000:], result.exception)
        return result

    return invoke


@pytest.fixture(scope="module")
def ml_trained(cli, tiny_t5, ml_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml-run")
    # No --multi-label: the list labels in the JSONL must switch it on.
    result = cli(
        "train",
        "--model",
        tiny_t5,
        "--train",
        ml_data["train"],
        "--val",
        ml_data["val"],
        "--output-dir",
        out,
        "--labels",
        ",".join(LABELS),
        "--max-steps",
        12,
        "--batch-size",
        8,
        "--lr",
        0.005,
        "--lora-r",
        16,
        "--set",
        "train.eval_steps=12",
        "--json",
    )
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    return out / "final", summary, result.output


@pytest.fixture(scope="module")
def ml_clf(ml_trained):
    return Classifier.from_pretrained(ml_trained[0])


def gold_sets(path):
    return [tuple(r["label"]) for r in read_jsonl(path)]


def test_cli_trains_a_multi_label_adapter_selected_by_micro_f1(cli, ml_trained, ml_clf, ml_data):
    assert "calibrate" in cli("-h").stdout
    adapter, summary, output = ml_trained
    assert "multi-label data detected" in output and "val_micro_f1" in output and "val_subset_accuracy" in output
    meta = json.loads((adapter / "loratune.json").read_text())
    assert meta["multi_label"] and meta["config"]["data"]["multi_label"]  # the saved config records the detection
    assert "Output ONLY the labels." in meta["prompt"]["template_example"]
    m = summary["metrics"]
    assert "best_val_accuracy" not in m and 0.0 <= m["best_val_micro_f1"] <= 1.0 and m["best_step"] == 12
    # The selection metric is the one predict reproduces: default threshold, at least one label.
    clf = ml_clf
    val = read_examples(ml_data["val"], multi_label=True)
    binarizer = MultiLabelBinarizer(classes=clf.labels)
    pred = [p.labels for p in clf.predict([e.text for e in val])]
    y_true, y_pred = binarizer.fit_transform([e.label for e in val]), binarizer.transform(pred)
    assert f1_score(y_true, y_pred, average="micro") == pytest.approx(m["best_val_micro_f1"], abs=1e-9)


def test_label_probabilities_are_marginals_over_label_sets(ml_clf):
    # Independent check: a plain teacher-forced forward pass per label set, softmax, then sum per label.
    import torch

    clf = ml_clf
    text = "I was charged twice and now the app will not let me log in."
    enc = clf.tokenizer([clf.format(text)], return_tensors="pt")
    sets = label_sets(len(clf.labels))
    logps = []
    for s in sets:
        target = clf.tokenizer([format_target([clf.labels[i] for i in s], clf.labels)], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = clf.model(**enc, labels=target).logits
        logps.append(logits.log_softmax(-1).gather(-1, target[..., None]).sum().item())
    p_sets = np.exp(np.array(logps) - max(logps))
    p_sets /= p_sets.sum()
    expected = [sum(p for p, s in zip(p_sets, sets) if j in s) for j in range(len(clf.labels))]
    np.testing.assert_allclose(clf.predict_proba(text)[0], expected, atol=1e-5)


def check_predictions(rows, mode, threshold=0.5):
    """What predict promises for each multi-label row (--json, all scores shown)."""
    for row in rows:
        if mode == "score":
            assert set(row["scores"]) == set(LABELS) and row["labels"]
            scores = row["scores"]
            chosen = [label for label in LABELS if scores[label] >= threshold] or [max(scores, key=scores.get)]
            assert row["labels"] == chosen and row["label"] == ", ".join(chosen)
        else:
            assert row["scores"] is None and isinstance(row["raw"], str) and isinstance(row["unknown"], list)
            assert row["label"] == (", ".join(row["labels"]) if row["labels"] else INVALID)
            pieces = [p.strip() for p in row["raw"].split(",") if p.strip()]
            assert len(pieces) == len(row["unknown"]) + sum(normalize_label(p) in row["labels"] for p in pieces)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_predict_and_evaluate_cli_match_scikit_learn(cli, ml_trained, ml_data, tmp_path, mode):
    adapter = ml_trained[0]
    short = ["--set", "predict.max_new_tokens=16"]  # room for every label; a rambling tiny model stops sooner
    rows = [
        json.loads(x)
        for x in cli(
            "predict", "--input", ml_data["test"], "--adapter", adapter, "--json", "--mode", mode, "--top-k", 5, *short
        ).stdout.splitlines()
    ]
    assert len(rows) == 20
    check_predictions(rows, mode)
    out = tmp_path / "ev"
    report = json.loads(
        cli("evaluate", "--adapter", adapter, "--test", ml_data["test"], "--mode", mode, "--output-dir", out, "--json", *short).stdout
    )
    r = report["results"][0]
    assert report["multi_label"] and r["multi_label"] and r["n"] == 20
    binarizer = MultiLabelBinarizer(classes=LABELS)
    y_true = binarizer.fit_transform(gold_sets(ml_data["test"]))
    y_pred = binarizer.transform([row["labels"] for row in rows])
    assert r["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert r["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert r["subset_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert r["hamming_loss"] == pytest.approx(hamming_loss(y_true, y_pred))
    p, rec, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for i, label in enumerate(LABELS):
        assert r["per_label"][label] == pytest.approx({"precision": p[i], "recall": rec[i], "f1": f[i], "support": s[i]})
        tn, fp, fn, tp = (int(((y_true[:, i] == t) & (y_pred[:, i] == q)).sum()) for t, q in ((0, 0), (0, 1), (1, 0), (1, 1)))
        assert r["confusion_matrix"]["values"][i] == [[tn, fp], [fn, tp]]
    assert r["invalid_rate"] == pytest.approx(sum(row["label"] == INVALID for row in rows) / 20)
    assert r["unknown_labels"] == sum(len(row.get("unknown") or []) for row in rows)
    assert ("threshold" in r) == (mode == "score")
    assert (out / r["confusion_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "micro-F1" in md and "Hamming loss" in md and f"| adapter | {mode} |" in md


def test_calibrate_writes_a_threshold_that_changes_predictions_as_expected(cli, ml_trained, ml_data, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ml_trained[0], adapter)  # calibration edits the adapter; keep the shared one as trained
    assert "threshold" not in json.loads((adapter / "loratune.json").read_text())  # 0.5 until calibrated

    found = json.loads(cli("calibrate", "--adapter", adapter, "--json").stdout)  # val file from the metadata
    t = found["threshold"]
    meta = json.loads((adapter / "loratune.json").read_text())
    assert meta["threshold"] == t and meta["calibration"]["data"] == str(ml_data["val"])
    assert not list(tmp_path.glob(".*"))  # written atomically: no temp files left beside it

    # predict now applies the calibrated threshold (probabilities do not depend on it).
    rows = [
        json.loads(x) for x in cli("predict", "--input", ml_data["val"], "--adapter", adapter, "--json", "--top-k", 5).stdout.splitlines()
    ]
    check_predictions(rows, "score", threshold=t)
    probs = np.array([[row["scores"][label] for label in LABELS] for row in rows])
    y_true = MultiLabelBinarizer(classes=LABELS).fit_transform(gold_sets(ml_data["val"]))
    assert found["micro_f1"] == pytest.approx(f1_score(y_true, decide_labels(probs, t), average="micro"))
    assert found["micro_f1"] >= f1_score(y_true, decide_labels(probs, 0.5), average="micro")
    assert found["micro_f1_at_default"] == pytest.approx(f1_score(y_true, decide_labels(probs, 0.5), average="micro"))
    # Predictions change only where a probability lies between the old and the new threshold.
    between = ((probs >= min(t, 0.5)) & (probs < max(t, 0.5))).any(axis=1)
    changed = (decide_labels(probs, t) != decide_labels(probs, 0.5)).any(axis=1)
    assert not (changed & ~between).any()

    # --threshold overrides the calibrated value; --allow-empty drops the at-least-one fallback.
    few = write_jsonl(tmp_path / "few.jsonl", read_jsonl(ml_data["val"])[:4])
    rows = [
        json.loads(x)
        for x in cli(
            "predict", "--input", few, "--adapter", adapter, "--json", "--top-k", 5, "--threshold", 0.999, "--allow-empty"
        ).stdout.splitlines()
    ]
    assert [row["labels"] for row in rows] == [[label for label in LABELS if row["scores"][label] >= 0.999] for row in rows]


def test_server_returns_every_predicted_label_of_a_multi_label_adapter(ml_trained, ml_clf):
    import time

    from fastapi.testclient import TestClient

    from loratune.serve import create_app, load_pool

    adapter = ml_trained[0]
    texts = [r["text"] for r in read_jsonl(ML / "test.jsonl")[:6]]
    with TestClient(create_app(lambda: load_pool({"default": adapter}))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "model never became ready"
            time.sleep(0.1)
        response = client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = ml_clf.predict(texts)
    for got, want in zip(results, expected, strict=True):
        assert got["labels"] == want.labels and want.labels  # in label-set order; never empty by default
        assert got["label"] == ", ".join(want.labels)
        assert got["scores"] == pytest.approx(want.scores, abs=1e-5)
