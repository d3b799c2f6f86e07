"""Bad input corpus: every case exits 2 with one sentence naming the file:line or the flag, never a traceback.

Runs the real CLI entry point (``loratune.cli.main``) in-process: the same code path as the console script,
without a Python start-up per case. Data and flag cases fail before a model is loaded; adapter cases use a
2-step adapter trained once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_main, tiny_config

NESTED = "[" * 100_000 + "]" * 100_000
BIG_INT = "9" * 5000


class Ctx:
    """Builds the files a case needs under one tmp dir."""

    def __init__(self, tmp: Path, model: Path, data: dict, adapter: Path | None):
        self.tmp, self.model, self.data, self._adapter = tmp, model, data, adapter

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        return path

    def jsonl(self, *lines: str, name: str = "bad.jsonl") -> Path:
        good = '{"text": "my card was charged twice", "label": "billing"}\n{"text": "app crashes", "label": "technical"}\n'
        return self.file(name, good + "".join(line + "\n" for line in lines))

    def train(self, *extra, train: Path | None = None) -> list:
        return [
            "train",
            "--model",
            self.model,
            "--train",
            train or self.data["train"],
            "--val",
            self.data["val"],
            "--output-dir",
            self.tmp / "out",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            *extra,
        ]

    def adapter(self, **files) -> Path:
        """A copy of the trained adapter; each keyword replaces a file (``loratune_json`` -> loratune.json) with a
        dict of changes to merge (for loratune.json), or raw text."""
        dst = self.tmp / "adapter"
        shutil.copytree(self._adapter, dst)
        for key, change in files.items():
            name = {"loratune_json": "loratune.json", "adapter_config": "adapter_config.json", "tokenizer": "tokenizer.json"}[key]
            path = dst / name
            if isinstance(change, dict):
                meta = json.loads(path.read_text())
                meta.update(change)
                path.write_text(json.dumps(meta))
            elif callable(change):
                path.write_text(change(path.read_text()))
            else:
                path.write_text(change)
        return dst

    def predict(self, *extra, adapter: Path | None = None) -> list:
        return ["predict", "--adapter", adapter or self.adapter(), *extra]


# (id, case builder, what the message must contain: a file:line, a file or a flag/key). "{file}" is replaced by
# the path of the file the case wrote (bad.jsonl / bad.csv / the adapter dir).
DATA_CASES = [
    ("deeply-nested-json", lambda c: c.train(train=c.jsonl(NESTED)), "bad.jsonl:3"),
    ("deeply-nested-json-value", lambda c: c.train(train=c.jsonl('{"text": ' + NESTED + ', "label": "x"}')), "bad.jsonl:3"),
    ("lone-surrogate-text", lambda c: c.train(train=c.jsonl('{"text": "bad \\ud800 text", "label": "billing"}')), "bad.jsonl:3"),
    ("lone-surrogate-label", lambda c: c.train(train=c.jsonl('{"text": "hello", "label": "bill\\udfffing"}')), "bad.jsonl:3"),
    ("lone-surrogate-field-name", lambda c: c.train(train=c.jsonl('{"text": "hi", "label": "billing", "\\ud800": 1}')), "bad.jsonl:3"),
    ("5000-digit-int-label", lambda c: c.train(train=c.jsonl('{"text": "hello", "label": ' + BIG_INT + "}")), "bad.jsonl:3"),
    ("huge-float-label", lambda c: c.train(train=c.jsonl('{"text": "hello", "label": 1e999}')), "bad.jsonl:3"),
    ("nan-label", lambda c: c.train(train=c.jsonl('{"text": "hello", "label": NaN}')), "bad.jsonl:3"),
    ("invalid-json", lambda c: c.train(train=c.jsonl('{"text": "hello", "label": ')), "bad.jsonl:3"),
    ("json-array-line", lambda c: c.train(train=c.jsonl('["hello", "billing"]')), "bad.jsonl:3"),
    ("json-string-line", lambda c: c.train(train=c.jsonl('"hello"')), "bad.jsonl:3"),
    ("missing-text-field", lambda c: c.train(train=c.jsonl('{"body": "hello", "label": "billing"}')), "bad.jsonl:3"),
    ("missing-label-field", lambda c: c.train(train=c.jsonl('{"text": "hello"}')), "bad.jsonl:3"),
    ("text-is-number", lambda c: c.train(train=c.jsonl('{"text": 5, "label": "billing"}')), "bad.jsonl:3"),
    ("text-is-empty", lambda c: c.train(train=c.jsonl('{"text": "   ", "label": "billing"}')), "bad.jsonl:3"),
    ("label-is-object", lambda c: c.train(train=c.jsonl('{"text": "hi", "label": {"a": 1}}')), "bad.jsonl:3"),
    ("label-is-bool", lambda c: c.train(train=c.jsonl('{"text": "hi", "label": true}')), "bad.jsonl:3"),
    ("label-is-null", lambda c: c.train(train=c.jsonl('{"text": "hi", "label": null}')), "bad.jsonl:3"),
    ("label-is-empty", lambda c: c.train(train=c.jsonl('{"text": "hi", "label": " "}')), "bad.jsonl:3"),
    (
        "label-outside-label-set",
        lambda c: c.train("--labels", "billing,technical", train=c.jsonl('{"text": "hi", "label": "shipping"}')),
        "bad.jsonl:3",
    ),
    ("not-utf8", lambda c: c.train(train=c.file("bad.jsonl", b'{"text": "caf\xe9", "label": "billing"}\n')), "bad.jsonl:1"),
    ("empty-file", lambda c: c.train(train=c.file("bad.jsonl", "")), "bad.jsonl"),
    ("only-blank-lines", lambda c: c.train(train=c.file("bad.jsonl", "\n \n\n")), "bad.jsonl"),
    (
        "one-label-only",
        lambda c: c.train("--labels", "", train=c.file("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')),
        "bad.jsonl",
    ),
    ("no-such-file", lambda c: c.train(train=c.tmp / "missing.jsonl"), "missing.jsonl"),
    ("directory-as-file", lambda c: c.train(train=c.tmp), "is a directory"),
    ("unsupported-suffix", lambda c: c.train(train=c.file("bad.txt", "hello\n")), "bad.txt"),
    ("csv-duplicate-label-column", lambda c: c.train(train=c.file("bad.csv", "text,label,label\nhi,billing,technical\n")), "bad.csv:1"),
    ("csv-duplicate-text-column", lambda c: c.train(train=c.file("bad.csv", "text,text,label\nhi,yo,billing\n")), "bad.csv:1"),
    ("csv-more-cells-than-header", lambda c: c.train(train=c.file("bad.csv", "text,label\nhi,billing,extra\n")), "bad.csv:2"),
    ("csv-missing-label-column", lambda c: c.train(train=c.file("bad.csv", "text,note,author\nhi,billing,x\n")), "bad.csv:2"),
    ("csv-empty-header", lambda c: c.train(train=c.file("bad.csv", "\nhi,billing\n")), "bad.csv"),
    (
        "csv-lone-surrogate",
        lambda c: c.train(train=c.file("bad.csv", "text,label\n\\ud800,billing\n".replace("\\ud800", "\ud800"))),
        "bad.csv",
    ),
    (
        "val-file-bad-line",
        lambda c: [
            "train",
            "--model",
            c.model,
            "--train",
            c.data["train"],
            "--val",
            c.jsonl('{"text": 1, "label": "billing"}'),
            "--output-dir",
            c.tmp / "out",
        ],
        "bad.jsonl:3",
    ),
]

FLAG_CASES = [
    ("batch-size-huge", lambda c: c.train("--batch-size", "99999999999999999999"), "batch_size"),
    ("batch-size-zero", lambda c: c.train("--batch-size", "0"), "batch_size"),
    ("epochs-nan", lambda c: c.train("--epochs", "nan", "--max-steps", "-1"), "epochs"),
    ("epochs-inf", lambda c: c.train("--epochs", "inf", "--max-steps", "-1"), "epochs"),
    ("epochs-1e300", lambda c: c.train("--epochs", "1e300", "--max-steps", "-1"), "epochs"),
    ("max-steps-huge", lambda c: c.train("--max-steps", "99999999999999999999"), "max_steps"),
    ("logging-steps-zero", lambda c: c.train("--set", "train.logging_steps=0"), "train.logging_steps"),
    ("lr-nan", lambda c: c.train("--lr", "nan"), "train.lr"),
    ("lr-zero", lambda c: c.train("--lr", "0"), "train.lr"),
    ("lr-not-a-number", lambda c: c.train("--set", "train.lr=fast"), "train.lr"),
    ("seed-negative", lambda c: c.train("--seed", "-1"), "seed"),
    ("seed-too-big", lambda c: c.train("--seed", str(2**40)), "seed"),
    ("lora-r-zero", lambda c: c.train("--lora-r", "0"), "lora.r"),
    ("lora-alpha-negative", lambda c: c.train("--lora-alpha", "-1"), "lora.alpha"),
    ("lora-dropout-one", lambda c: c.train("--set", "lora.dropout=1"), "lora.dropout"),
    ("target-modules-nonexistent", lambda c: c.train("--set", "lora.target_modules=nonexistent"), "lora.target_modules"),
    ("warmup-ratio-two", lambda c: c.train("--set", "train.warmup_ratio=2"), "train.warmup_ratio"),
    ("save-steps-zero", lambda c: c.train("--save-steps", "0"), "save_steps"),
    ("eval-steps-negative", lambda c: c.train("--set", "train.eval_steps=-1"), "train.eval_steps"),
    ("grad-accum-zero", lambda c: c.train("--set", "train.grad_accum=0"), "train.grad_accum"),
    ("max-length-text", lambda c: c.train("--set", "data.max_length=abc"), "data.max_length"),
    ("max-length-tiny", lambda c: c.train("--set", "data.max_length=2"), "data.max_length"),
    ("precision-unknown", lambda c: c.train("--set", "train.precision=fp64"), "train.precision"),
    ("family-unknown", lambda c: c.train("--family", "rnn"), "model.family"),
    ("labels-duplicate", lambda c: c.train("--labels", "a,a"), "labels"),
    ("labels-one", lambda c: c.train("--labels", "a"), "labels"),
    ("unknown-config-key", lambda c: c.train("--set", "train.learning_rate=1"), "train.learning_rate"),
    ("set-without-equals", lambda c: c.train("--set", "train.lr"), "--set"),
    ("config-missing", lambda c: c.train("--config", c.tmp / "nope.yaml"), "nope.yaml"),
    ("config-invalid-yaml", lambda c: c.train("--config", c.file("bad.yaml", "train: [\n")), "bad.yaml"),
    ("config-top-level-list", lambda c: c.train("--config", c.file("bad.yaml", "- a\n")), "bad.yaml"),
    ("config-section-scalar", lambda c: c.train("--config", c.file("bad.yaml", "train: 5\n")), "bad.yaml"),
    ("config-lone-surrogate", lambda c: c.train("--config", c.file("bad.yaml", b"train:\n  lr: \xff\n")), "bad.yaml"),
    ("output-dir-is-a-file", lambda c: c.train("--output-dir", c.file("afile", "x")), "--output-dir"),
    ("output-dir-read-only", lambda c: c.train("--output-dir", "/proc/loratune-out"), "--output-dir"),
    ("output-dir-under-a-file", lambda c: c.train("--output-dir", c.file("afile", "x") / "sub"), "--output-dir"),
    ("model-missing-dir", lambda c: c.train("--model", c.tmp / "no-model"), "no-model"),
    ("resume-without-checkpoint", lambda c: c.train("--resume"), "--resume"),
    ("seed-not-int", lambda c: c.train("--seed", "abc"), "--seed"),
    ("unknown-flag", lambda c: c.train("--epochz", "1"), "--epochz"),
]

PREDICT_CASES = [
    ("predict-empty-text", lambda c: c.predict(""), "TEXT"),
    ("predict-blank-text", lambda c: c.predict("   "), "TEXT"),
    ("predict-lone-surrogate-text", lambda c: c.predict("bad \ud800 text"), "TEXT"),
    ("predict-labels-with-adapter", lambda c: c.predict("hello", "--labels", "a,b"), "--labels"),
    ("predict-input-lone-surrogate", lambda c: c.predict("--input", c.jsonl('{"text": "x \\ud800"}')), "bad.jsonl:3"),
    ("predict-input-nested", lambda c: c.predict("--input", c.jsonl(NESTED)), "bad.jsonl:3"),
    ("predict-input-missing", lambda c: c.predict("--input", c.tmp / "none.jsonl"), "none.jsonl"),
    ("predict-input-not-utf8", lambda c: c.predict("--input", c.file("bad.txt", b"caf\xe9\n")), "bad.txt:1"),
    ("predict-input-empty", lambda c: c.predict("--input", c.file("bad.txt", "\n\n")), "empty"),
    ("predict-text-and-input", lambda c: c.predict("x", "--input", c.file("in.txt", "a\n")), "--input"),
    ("predict-top-k-zero", lambda c: c.predict("x", "--top-k", "0"), "--top-k"),
    ("predict-batch-size-huge", lambda c: c.predict("x", "--batch-size", "99999999999999999999"), "batch_size"),
    ("predict-threshold-nan", lambda c: c.predict("x", "--threshold", "nan"), "threshold"),
    ("predict-mode-unknown", lambda c: c.predict("x", "--mode", "vote"), "predict.mode"),
    ("adapter-missing", lambda c: c.predict("x", adapter=c.tmp / "gone"), "gone"),
    ("adapter-incomplete", lambda c: c.predict("x", adapter=_emptydir(c)), "empty-adapter"),
]

ADAPTER_CASES = [
    ("meta-labels-int", {"loratune_json": {"labels": 5}}, "labels"),
    ("meta-labels-empty", {"loratune_json": {"labels": []}}, "labels"),
    ("meta-labels-one", {"loratune_json": {"labels": ["a"]}}, "labels"),
    ("meta-labels-not-strings", {"loratune_json": {"labels": [1, 2]}}, "labels"),
    ("meta-labels-duplicate", {"loratune_json": {"labels": ["a", "a"]}}, "labels"),
    ("meta-base-model-int", {"loratune_json": {"base_model": 123}}, "base_model"),
    ("meta-base-model-empty", {"loratune_json": {"base_model": ""}}, "base_model"),
    ("meta-prompt-empty", {"loratune_json": {"prompt": {}}}, "prompt"),
    ("meta-prompt-list", {"loratune_json": {"prompt": []}}, "prompt"),
    ("meta-prompt-task-int", {"loratune_json": {"prompt": {"task": 5, "input_name": "x"}}}, "prompt"),
    ("meta-max-length-text", {"loratune_json": {"max_length": "abc"}}, "max_length"),
    ("meta-max-length-negative", {"loratune_json": {"max_length": -5}}, "max_length"),
    ("meta-family-unknown", {"loratune_json": {"family": "rnn"}}, "family"),
    ("meta-multi-label-text", {"loratune_json": {"multi_label": "yes"}}, "multi_label"),
    ("meta-threshold-two", {"loratune_json": {"threshold": 2}}, "threshold"),
    ("meta-not-an-object", {"loratune_json": "[]"}, "loratune.json"),
    ("meta-truncated", {"loratune_json": lambda text: text[: len(text) // 2]}, "loratune.json"),
    ("meta-lone-surrogate", {"loratune_json": {"labels": ["bill\ud800", "tech"]}}, "labels"),
    ("adapter-config-list", {"adapter_config": "[]"}, "adapter_config.json"),
    ("adapter-config-truncated", {"adapter_config": lambda text: text[:20]}, "adapter_config.json"),
    ("tokenizer-truncated", {"tokenizer": lambda text: text[: len(text) // 3]}, "tokenizer.json"),
    ("tokenizer-not-json", {"tokenizer": "hello"}, "tokenizer.json"),
]


def _emptydir(c: Ctx) -> Path:
    path = c.tmp / "empty-adapter"
    path.mkdir()
    (path / "loratune.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory, tiny_t5, small_data) -> Path:
    """A real adapter (2 training steps) to tamper with."""
    from loratune.train import train

    out = tmp_path_factory.mktemp("bad-input-adapter")
    return train(tiny_config(tiny_t5, small_data, out, max_steps=2), echo=lambda *a, **k: None).adapter_dir


def check(code, err, expect):
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    message = " ".join(lines)
    if lines and lines[-1].startswith("error:"):
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1, err
        message = errors[0]
    assert expect in message, f"{expect!r} not in: {message}"


@pytest.mark.parametrize("build,expect", [pytest.param(b, e, id=i) for i, b, e in DATA_CASES + FLAG_CASES])
def test_bad_training_input_exits_2_with_one_sentence(build, expect, tiny_t5, small_data, tmp_path, capsys):
    ctx = Ctx(tmp_path, tiny_t5, small_data, None)
    code, _, err = run_main(build(ctx), capsys)
    check(code, err, expect)


@pytest.mark.integration
@pytest.mark.parametrize("build,expect", [pytest.param(b, e, id=i) for i, b, e in PREDICT_CASES])
def test_bad_predict_input_exits_2_with_one_sentence(build, expect, tiny_t5, small_data, small_adapter, tmp_path, capsys):
    ctx = Ctx(tmp_path, tiny_t5, small_data, small_adapter)
    code, _, err = run_main(build(ctx), capsys)
    check(code, err, expect)


@pytest.mark.integration
@pytest.mark.parametrize("files,expect", [pytest.param(f, e, id=i) for i, f, e in ADAPTER_CASES])
def test_tampered_adapter_exits_2_with_one_sentence(files, expect, tiny_t5, small_data, small_adapter, tmp_path, capsys):
    ctx = Ctx(tmp_path, tiny_t5, small_data, small_adapter)
    adapter = ctx.adapter(**files)
    code, _, err = run_main(ctx.predict("hello", adapter=adapter), capsys)
    check(code, err, expect)
    assert "adapter" in err


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_jsonl_strings_are_accepted(separator, tmp_path):
    from loratune.data import read_examples

    rows = [{"text": f"first{separator}second", "label": "billing"}, {"text": "ok", "label": "technical"}]
    path = tmp_path / "sep.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = read_examples(path)
    assert [e.text for e in examples] == [f"first{separator}second", "ok"]
    assert [e.line for e in examples] == [1, 2]


def test_the_corpus_has_at_least_60_cases():
    assert len(DATA_CASES) + len(FLAG_CASES) + len(PREDICT_CASES) + len(ADAPTER_CASES) >= 60
