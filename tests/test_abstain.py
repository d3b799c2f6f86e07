"""Abstain: low-confidence predictions become the fallback label; metrics checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from loratune.calibrate import calibrate_confidence
from loratune.errors import LoratuneError
from loratune.evaluate import abstain_metrics, apply_abstain

LABELS = ["a", "b", "c", "oos"]
GOLD = ["a", "a", "b", "oos", "oos", "c"]
TOP = ["a", "b", "b", "a", "oos", "c"]
CONF = [0.9, 0.4, 0.6, 0.3, 0.8, 0.45]


def probs_for(top, conf):
    """Rows whose argmax is ``top`` with probability ``conf``, the rest spread evenly over the other labels."""
    rows = []
    for label, c in zip(top, conf):
        row = np.full(len(LABELS), (1 - c) / (len(LABELS) - 1))
        row[LABELS.index(label)] = c
        rows.append(row)
    return np.array(rows)


def test_apply_abstain_replaces_only_predictions_below_the_threshold():
    assert apply_abstain(TOP, CONF, 0.5, "oos") == ["a", "oos", "b", "oos", "oos", "oos"]
    assert apply_abstain(TOP, CONF, 0.45, "oos") == ["a", "oos", "b", "oos", "oos", "c"]  # 0.45 is not below 0.45
    assert apply_abstain(TOP, CONF, 0.0, "oos") == TOP


def test_abstain_metrics_match_a_hand_computation():
    # threshold 0.5 -> a, oos, b, oos, oos, oos: 4 of 6 abstain; in scope (a, a, b, c): a and b right -> 2/4;
    # out of scope (rows 3, 4): both oos -> recall 1.
    m = abstain_metrics(GOLD, apply_abstain(TOP, CONF, 0.5, "oos"), "oos")
    assert m["abstain_rate"] == pytest.approx(4 / 6)
    assert m["in_scope_accuracy"] == pytest.approx(2 / 4)
    assert m["oos_recall"] == pytest.approx(1.0)
    assert (m["n_in_scope"], m["n_out_of_scope"]) == (4, 2)
    # No abstaining: in scope a, b(wrong), b, c -> 3/4; out of scope: only row 4 -> 1/2.
    m0 = abstain_metrics(GOLD, TOP, "oos")
    assert (m0["abstain_rate"], m0["in_scope_accuracy"], m0["oos_recall"]) == pytest.approx((1 / 6, 3 / 4, 1 / 2))


def test_abstain_metrics_without_the_fallback_in_gold_report_only_the_rate():
    m = abstain_metrics(["a", "b"], ["oos", "b"], "oos")
    assert m["abstain_rate"] == pytest.approx(0.5)
    assert "in_scope_accuracy" not in m and "oos_recall" not in m


def test_calibrate_for_a_target_in_scope_accuracy_takes_the_highest_threshold_that_keeps_it():
    gold_idx = [LABELS.index(g) for g in GOLD]
    # In-scope accuracy is 3/4 up to 0.45 (row 5, conf 0.45, is kept at 0.45) and 2/4 from 0.46.
    threshold, m = calibrate_confidence(probs_for(TOP, CONF), gold_idx, LABELS, "oos", target_in_scope_accuracy=0.75)
    assert threshold == pytest.approx(0.45)
    assert m["target_met"] and m["in_scope_accuracy"] == pytest.approx(0.75) and m["oos_recall"] == pytest.approx(1.0)
    threshold, m = calibrate_confidence(probs_for(TOP, CONF), gold_idx, LABELS, "oos", target_in_scope_accuracy=0.8)
    assert threshold == 0.0 and not m["target_met"]


def test_calibrate_without_target_maximises_macro_f1():
    # Macro-F1 over a, b, c, oos by hand: t=0 -> (1/2 + 2/3 + 1 + 2/3)/4 = 0.708; t in (0.30, 0.40] -> 0.833;
    # t in (0.40, 0.45] -> (2/3 + 1 + 1 + 0.8)/4 = 0.867 (best; ties go to the lowest, 0.41); above 0.45 c is lost.
    gold_idx = [LABELS.index(g) for g in GOLD]
    threshold, m = calibrate_confidence(probs_for(TOP, CONF), gold_idx, LABELS, "oos")
    assert threshold == pytest.approx(0.41)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 1 + 0.8) / 4)
    assert m["abstain_rate"] == pytest.approx(3 / 6)


def test_calibrate_for_a_target_needs_out_of_scope_examples():
    with pytest.raises(LoratuneError, match="oos"):
        calibrate_confidence(probs_for(TOP[:3], CONF[:3]), [0, 0, 1], LABELS, "oos", target_in_scope_accuracy=0.9)
