"""What loratune prints: no spurious library warnings on load, throttled progress bars, one line per evaluation."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import pytest
from conftest import LABELS, tiny_config


@contextlib.contextmanager
def library_output():
    """Everything transformers logs at warning level and every warning raised, whatever earlier tests set."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger("transformers")
    old_level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lambda: stream.getvalue() + "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(old_level)


def test_plain_transformers_load_reports_the_new_head(tiny_encoder):
    """The control: without loratune, loading the encoder for classification logs the head as MISSING."""
    from transformers import AutoModelForSequenceClassification

    with library_output() as output:
        AutoModelForSequenceClassification.from_pretrained(str(tiny_encoder), num_labels=len(LABELS))
    assert "LOAD REPORT" in output() and "classifier.weight" in output()


def test_loading_an_encoder_and_wrapping_it_with_lora_prints_no_warnings(tiny_encoder):
    from loratune.models import attach_lora, load_base

    with library_output() as output:
        base = load_base(str(tiny_encoder), labels=LABELS)
        attach_lora(base.model, "encoder", r=4, alpha=8, dropout=0.0)
    assert "LOAD REPORT" not in output() and "newly initialized" not in output()
    assert "is_gradient_checkpointing" not in output()


def test_only_a_report_of_the_head_alone_is_dropped():
    from loratune.quiet import head_only_report

    bold, reset = "\x1b[1m", "\x1b[0m"
    head = (
        f"{bold}BertForSequenceClassification LOAD REPORT{reset} from: m\nKey | Status |\n---+---+-\n"
        "classifier.weight | MISSING |\nclassifier.bias | MISSING |\n\nNotes:\n- MISSING: x | y"
    )
    assert head_only_report(head)
    assert not head_only_report(head.replace("classifier.bias | MISSING", "bert.pooler.dense.weight | MISSING"))
    assert not head_only_report(head.replace("classifier.bias | MISSING", "classifier.bias | MISMATCH"))
    assert not head_only_report("Some weights were not used")


@pytest.mark.integration
def test_loading_a_trained_encoder_adapter_through_the_python_api_is_quiet(tiny_encoder, small_data, tmp_path):
    from loratune import Classifier
    from loratune.train import train

    with library_output() as output:
        result = train(tiny_config(tiny_encoder, small_data, tmp_path / "run", max_steps=2), echo=lambda *a, **k: None)
    assert "LOAD REPORT" not in output() and "is_gradient_checkpointing" not in output(), output()
    with library_output() as output:
        clf = Classifier.from_pretrained(result.adapter_dir)
        assert clf.predict(["my card was charged twice"])[0].label in LABELS
    assert "LOAD REPORT" not in output() and "newly initialized" not in output(), output()
    assert "FutureWarning" not in output(), output()
