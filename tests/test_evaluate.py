import json

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from loratune.data import read_examples
from loratune.evaluate import build_report, compute_metrics, evaluate, write_report
from loratune.predict import INVALID, Classifier


def test_metrics_agree_with_scikit_learn_and_count_invalid():
    labels = ["a", "b", "c"]
    gold = ["a", "a", "b", "c", "c", "b"]
    pred = ["a", "b", "b", INVALID, "c", "a"]
    m = compute_metrics(gold, pred, labels)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["invalid_rate"] == pytest.approx(1 / 6)
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=labels, average="macro"))
    assert m["confusion_matrix"]["columns"] == ["a", "b", "c", INVALID]
    assert m["confusion_matrix"]["values"][2] == [0, 0, 1, 1]  # one "c" came out invalid
    assert m["confusion_matrix"]["row_shares"] == [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]


def test_no_invalid_column_where_no_prediction_can_be_invalid():
    gold, pred = ["a", "a", "a", "a", "b"], ["a", "a", "a", "b", "b"]
    m = compute_metrics(gold, pred, ["a", "b"])  # score mode, the baseline: always a label
    assert m["confusion_matrix"]["columns"] == ["a", "b"]
    assert m["confusion_matrix"]["row_shares"] == [[0.75, 0.25], [0.0, 1.0]]
    assert compute_metrics(gold, pred, ["a", "b"], invalid_column=True)["confusion_matrix"]["columns"] == ["a", "b", INVALID]
    # A label with no examples gets a row of zeros, not NaN.
    assert compute_metrics(gold, pred, ["a", "b", "c"])["confusion_matrix"]["row_shares"][2] == [0.0, 0.0, 0.0]


def test_confusion_figure_shows_counts_beside_row_shares(tmp_path):
    import numpy as np

    from loratune.evaluate import confusion_figure, report_markdown

    # A dominant class: 90 "a", 10 "b", half of the b's wrong.
    gold, pred = ["a"] * 90 + ["b"] * 10, ["a"] * 90 + ["b"] * 5 + ["a"] * 5
    m = compute_metrics(gold, pred, ["a", "b"])
    fig = confusion_figure(m, "t")
    counts, shares = (ax.images[0].get_array() for ax in fig.axes if ax.images)
    assert np.array_equal(counts, [[90, 0], [5, 5]]) and np.allclose(shares, [[1.0, 0.0], [0.5, 0.5]])
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["count", "share of the true label"]
    report = {
        "dataset": "d",
        "n": 100,
        "labels": ["a", "b"],
        "disagreements": {},
        "results": [{"model": "m", "mode": "score", **m, "ms_per_example": 1.0, "examples_per_s": 1.0}],
    }
    md = report_markdown(report)
    assert "| b | 5 (50%) | 5 (50%) |" in md and "invalid" not in md.split("Confusion matrix")[1]


def test_summary_tables_show_invalid_only_where_it_can_occur(capsys):
    from loratune.console import print_summary
    from loratune.evaluate import report_markdown

    gold = ["a", "b", "a", "b"]
    row = {"ms_per_example": 1.0, "examples_per_s": 1.0}
    score = {"model": "adapter", "mode": "score", **compute_metrics(gold, ["a", "b", "a", "a"], ["a", "b"]), **row}
    report = {"dataset": "d", "n": 4, "labels": ["a", "b"], "disagreements": {}, "results": [score]}
    print_summary(report, None)
    assert "invalid" not in capsys.readouterr().out and "invalid" not in report_markdown(report).split("## ")[0]
    generate = {**score, "mode": "generate", **compute_metrics(gold, ["a", INVALID, "a", "b"], ["a", "b"], True)}
    report["results"].append(generate)
    print_summary(report, None)
    table = report_markdown(report).split("## ")[0]
    assert "invalid" in capsys.readouterr().out and "| invalid |" in table and "| 25.0% |" in table


def test_evaluate_and_report_files(trained, small_data, tmp_path):
    examples = read_examples(small_data["test"])
    tuned = Classifier.from_pretrained(trained.adapter_dir)
    base = Classifier.from_pretrained(tuned.meta.base_model, labels=tuned.labels)
    results = [
        evaluate(clf, examples, mode=mode, name=name)
        for mode in ("score", "generate")
        for name, clf in (("base", base), ("adapter", tuned))
    ]
    report = build_report(results, examples, str(small_data["test"]), tuned.labels)
    out = write_report(report, tmp_path / "report")

    saved = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["mode"]) for r in saved["results"]] == [
        ("base", "score"),
        ("adapter", "score"),
        ("base", "generate"),
        ("adapter", "generate"),
    ]
    gold = [e.label for e in examples]
    for r, result in zip(saved["results"], results):
        pred = [p.label for p in result.predictions]
        # Independent scikit-learn computation from the raw predictions.
        assert r["accuracy"] == pytest.approx(accuracy_score(gold, pred))
        assert r["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=tuned.labels, average="macro", zero_division=0))
        assert r["weighted_f1"] == pytest.approx(f1_score(gold, pred, labels=tuned.labels, average="weighted", zero_division=0))
        _p, rec, _f, s = precision_recall_fscore_support(gold, pred, labels=tuned.labels, zero_division=0)
        for i, label in enumerate(tuned.labels):
            assert r["per_label"][label]["recall"] == pytest.approx(rec[i])
            assert r["per_label"][label]["support"] == s[i]
        columns = tuned.labels + ([INVALID] if r["mode"] == "generate" else [])  # score mode cannot miss every label
        assert r["confusion_matrix"]["columns"] == columns
        cm = confusion_matrix(gold, pred, labels=columns)[: len(tuned.labels)]
        assert r["confusion_matrix"]["values"] == cm.tolist()
        assert r["examples_per_s"] > 0 and r["ms_per_example"] > 0
        png = out / r["confusion_png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The random base model echoes instead of answering: all invalid in generate mode.
    assert saved["results"][2]["invalid_rate"] == 1.0
    assert saved["disagreements"]["generate"], "base and adapter must disagree somewhere"
    md = (out / "report.md").read_text()
    assert "| adapter | score |" in md and "Where the models disagree" in md


def test_report_dir_is_replaced_atomically(tmp_path):
    report = {"dataset": "d", "n": 0, "labels": [], "results": [], "disagreements": {}}
    out = tmp_path / "r"
    write_report(report, out)
    (out / "stale.txt").write_text("old")
    write_report(report, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
