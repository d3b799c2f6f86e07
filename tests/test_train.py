import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_config

from loratune.errors import LoratuneError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loratune.json"]

pytestmark = pytest.mark.integration  # every test here trains a model


def adapter_tensors(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_training_lowers_loss_and_writes_a_complete_adapter(trained):
    m = trained.metrics
    assert m["loss_history"][-1] < 0.5 * m["loss_history"][0]
    assert 0.0 <= m["best_val_accuracy"] <= 1.0 and m["best_step"] > 0
    assert m["train_samples_per_second"] > 0
    for name in ADAPTER_FILES:
        assert (trained.adapter_dir / name).is_file(), name
    run_dir = trained.adapter_dir.parent
    assert not (run_dir / "checkpoints").exists()  # a finished run leaves no resumable state behind
    assert sorted(p.name for p in run_dir.iterdir()) == ["final"]  # no temp dirs left


def test_metadata_records_what_is_needed_to_reproduce(trained):
    meta = json.loads((trained.adapter_dir / "loratune.json").read_text())
    assert meta["labels"] == ["billing", "technical", "account", "shipping", "other"]
    assert meta["family"] == "seq2seq" and meta["lora_target_modules"] == ["q", "v"]
    assert meta["prompt"]["task"] == "You are a support ticket classifier."
    assert meta["config"]["lora"]["r"] == 16
    assert len(meta["data"]["train"]["sha256"]) == 64
    assert {"torch", "transformers", "peft", "loratune"} <= set(meta["versions"])
    assert meta["metrics"]["best_val_accuracy"] == pytest.approx(meta["metrics"]["best_val_accuracy"])
    # A plain PEFT user can load it without loratune.
    adapter_config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 16


def test_adapter_changes_the_models_outputs(trained, small_data):
    from loratune.data import read_examples
    from loratune.predict import Classifier

    meta = json.loads((trained.adapter_dir / "loratune.json").read_text())
    val = read_examples(small_data["val"])
    texts, gold = [e.text for e in val], [e.label for e in val]
    tuned = Classifier.from_pretrained(trained.adapter_dir)
    base = Classifier.from_pretrained(meta["base_model"], labels=tuned.labels)
    p_tuned, p_base = tuned.predict_proba(texts), base.predict_proba(texts)
    assert abs(p_tuned - p_base).max() > 0.05

    def acc(probs):
        return sum(tuned.labels[i] == g for i, g in zip(probs.argmax(1), gold)) / len(gold)

    assert acc(p_tuned) == pytest.approx(meta["metrics"]["best_val_accuracy"], abs=1e-9)
    assert acc(p_tuned) > acc(p_base)


def test_gradient_checkpointing_trains_with_peft(tiny_t5, small_data, tmp_path):
    # The classic PEFT + T5 + checkpointing failure: "element 0 of tensors does not require grad".
    from loratune.train import train

    cfg = tiny_config(tiny_t5, small_data, tmp_path, max_steps=4, gradient_checkpointing=True, epochs=1)
    result = train(cfg, echo=lambda *a, **k: None)
    assert result.metrics["steps"] == 4 and math.isfinite(result.metrics["train_loss"])


def test_divergence_stops_with_a_clear_message():
    from types import SimpleNamespace

    from loratune.guards import NonFiniteGuard, TrainingDiverged

    guard = NonFiniteGuard()
    guard.on_log(SimpleNamespace(fp16=True), SimpleNamespace(global_step=3), None, logs={"loss": 1.5})
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3 .*fp16"):
        guard.on_log(SimpleNamespace(fp16=True), SimpleNamespace(global_step=3), None, logs={"loss": float("nan")})


def cli_train_args(tiny_t5, small_data, out, *extra):
    return [
        sys.executable,
        "-m",
        "loratune",
        "train",
        "--model",
        str(tiny_t5),
        "--train",
        small_data["train"],
        "--val",
        small_data["val"],
        "--output-dir",
        out,
        "--max-steps",
        "24",
        "--save-steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "0.005",
        "--seed",
        "7",
        "--set",
        "train.logging_steps=2",
        "--set",
        "train.eval_steps=8",
        *map(str, extra),
    ]


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_and_resume_matches_an_uninterrupted_run(tiny_t5, small_data, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(cli_train_args(tiny_t5, small_data, straight), check=True, capture_output=True, env=env, timeout=300)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(cli_train_args(tiny_t5, small_data, crashed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = crashed / "checkpoints" / "checkpoint-12" / "trainer_state.json"
    try:
        assert wait_for(ckpt.is_file), "no checkpoint appeared"
        proc.kill()  # SIGKILL: no chance to clean up, like a crash or an OOM kill
    finally:
        proc.wait(timeout=60)
    assert not (crashed / "final").exists()

    # Starting again without --resume must not silently discard the unfinished run.
    again = subprocess.run(cli_train_args(tiny_t5, small_data, crashed), capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(cli_train_args(tiny_t5, small_data, crashed, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = adapter_tensors(straight / "final"), adapter_tensors(crashed / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key
    ma = json.loads((straight / "final" / "loratune.json").read_text())["metrics"]
    mb = json.loads((crashed / "final" / "loratune.json").read_text())["metrics"]
    assert ma["best_val_accuracy"] == mb["best_val_accuracy"] and ma["best_step"] == mb["best_step"]
    assert ma["val_loss"] == pytest.approx(mb["val_loss"], abs=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_t5, small_data, tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cli_train_args(tiny_t5, small_data, out, "--set", "train.save_steps=1000"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "ex/s" in line or "step 8" in line:
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-2000:]
    assert "continue with --resume" in output
    assert list((out / "checkpoints").glob("checkpoint-*")), "Ctrl-C must leave a checkpoint"
    resumed = subprocess.run(cli_train_args(tiny_t5, small_data, out, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_resume_without_checkpoint_is_a_clear_error(tiny_t5, small_data, tmp_path):
    from loratune.train import train

    with pytest.raises(LoratuneError, match="no complete checkpoint"):
        train(tiny_config(tiny_t5, small_data, tmp_path), resume=True)


def test_two_process_data_parallel_training_with_torchrun(tiny_t5, small_data, tmp_path):
    out = tmp_path / "ddp"
    train_args = [
        "-m",
        "loratune",
        "train",
        "--model",
        tiny_t5,
        "--train",
        small_data["train"],
        "--val",
        small_data["val"],
        "--max-steps",
        "8",
        "--batch-size",
        "8",
        "--lr",
        "0.005",
        "--json",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *train_args, "--output-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size: 2" in result.stderr
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["metrics"]["steps"] == 8
    # 8 steps x 8 per device x 2 processes = 128 samples seen: both ranks did real work.
    meta = json.loads((out / "final" / "loratune.json").read_text())
    assert meta["metrics"]["epochs"] == pytest.approx(128 / 240, abs=0.01)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # The logged loss is a per-example mean in both set-ups, not scaled by the number of processes.
    single = subprocess.run(
        [str(c) for c in [sys.executable, *train_args, "--output-dir", tmp_path / "one"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
        check=True,
    )
    one = json.loads(single.stdout[single.stdout.index("{") : single.stdout.rindex("}") + 1])
    ratio = summary["metrics"]["loss_history"][0] / one["metrics"]["loss_history"][0]
    assert 0.67 < ratio < 1.5, ratio
