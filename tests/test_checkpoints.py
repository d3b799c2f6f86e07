"""Crash-proof training: NaN guard, atomic checkpoints, resume after kill -9, disk full as one sentence."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_main, tiny_config, write_jsonl

from loratune.checkpoints import DiskFull, clean_leftovers, latest_checkpoint, prepare_output_dir
from loratune.errors import LoratuneError

REQUIRED = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt")


def error_lines(stderr: str) -> list[str]:
    # tqdm redraws with \r: split on it too, so the error is found even after a progress bar.
    return [line for part in stderr.splitlines() for line in part.split("\r") if line.startswith("error:")]


def fake_checkpoint(path: Path, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    for name in REQUIRED if complete else REQUIRED[1:3]:
        (path / name).write_text("{}")
    return path


def test_leftovers_are_cleaned_and_a_cut_swap_is_undone(tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpt / "checkpoint-2")
    fake_checkpoint(ckpt / "checkpoint-4")
    fake_checkpoint(ckpt / "checkpoint-6", complete=False)  # torn: must never be resumed from
    (ckpt / ".staging" / "checkpoint-8").mkdir(parents=True)
    (ckpt / ".best-abc").mkdir()
    (ckpt / ".best.old-1-2").mkdir()  # killed between replace_dir's two renames: best/ is missing
    (ckpt / ".best.old-1-2" / "best.json").write_text("{}")
    (out / ".final-xyz").mkdir()
    (out / ".final-xyz" / "adapter_model.safetensors").write_bytes(b"trunc")
    (out / ".checkpoints-done-9").mkdir()
    (out / ".trash-checkpoints-9").mkdir()  # an --overwrite cut off mid-delete

    removed = clean_leftovers(out, ckpt)

    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "checkpoint-2", "checkpoint-4"]
    assert (ckpt / "best" / "best.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    assert {Path(p).name for p in removed} >= {".staging", ".best-abc", ".final-xyz", "checkpoint-6"}
    assert latest_checkpoint(ckpt) == ckpt / "checkpoint-4"


def test_resume_names_the_newest_complete_checkpoint(tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpt / "checkpoint-10")
    fake_checkpoint(ckpt / "checkpoint-12", complete=False)
    said = []
    assert prepare_output_dir(out, ckpt, resume=True, overwrite=False, say=said.append) == str(ckpt / "checkpoint-10")
    assert "checkpoint-10" in said[-1] and "step 10" in said[-1]
    with pytest.raises(LoratuneError, match="--resume to continue"):
        prepare_output_dir(out, ckpt, resume=False, overwrite=False, say=said.append)


def test_resume_before_the_first_checkpoint_starts_over_and_says_so(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".staging" / "checkpoint-1").mkdir(parents=True)  # killed inside the first save
    said = []
    assert prepare_output_dir(out, out / "checkpoints", resume=True, overwrite=False, say=said.append) is None
    assert any("starting from step 0" in line for line in said)
    assert not (out / "checkpoints" / ".staging").exists()


def test_resume_after_a_finished_run_says_so(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "loratune.json").write_text("{}")
    with pytest.raises(LoratuneError, match="already finished"):
        prepare_output_dir(out, out / "checkpoints", resume=True, overwrite=False, say=lambda *a: None)


@pytest.mark.integration
def test_nan_run_exits_1_with_one_sentence_and_no_adapter(tiny_t5, small_data, tmp_path, capsys):
    out = tmp_path / "nan"
    code, _, err = run_main(
        [
            "train",
            "--model",
            tiny_t5,
            "--train",
            small_data["train"],
            "--val",
            small_data["val"],
            "--output-dir",
            out,
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--set",
            "train.weight_decay=nan",
            "--set",
            "train.logging_steps=100",
        ],
        capsys,
    )
    assert code == 1, err[-2000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "training diverged" in lines[0] and "not finite" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not (out / "final").exists()
    assert not (out / "checkpoints" / "best").exists()


def small_run_config(tiny_t5, small_data, out, **train):
    return tiny_config(tiny_t5, small_data, out, **{"max_steps": 8, "save_steps": 2, "eval_steps": 4, "batch_size": 8, **train})


@pytest.mark.integration
@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_disk_full_is_one_sentence_and_the_run_stays_resumable(tiny_t5, small_data, tmp_path, monkeypatch, where):
    import shutil

    import torch

    from loratune.train import train

    out = tmp_path / "full"
    cfg = small_run_config(tiny_t5, small_data, out)

    def full(real, when):
        def fake(*args, **kwargs):
            target = str(args[1] if len(args) > 1 else kwargs.get("f"))
            if when(target):
                raise OSError(errno.ENOSPC, "No space left on device", target)
            return real(*args, **kwargs)

        return fake

    if where == "checkpoint":  # the second checkpoint hits a full disk; the first one is complete
        monkeypatch.setattr(torch, "save", full(torch.save, lambda target: "checkpoint-4" in target))
    else:  # copying best/ into final/
        monkeypatch.setattr(shutil, "copyfile", full(shutil.copyfile, lambda target: True))
    with pytest.raises(DiskFull) as info:
        train(cfg, echo=lambda *a, **k: None)
    message = str(info.value)
    assert "\n" not in message and "disk full while writing" in message and "MB free is needed" in message
    assert str(out) in message and "--resume" in message
    assert info.value.exit_code == 1
    assert not (out / "final").exists()
    monkeypatch.undo()  # space freed
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None
    assert not (out / "checkpoints" / ".staging").exists()
    result = train(cfg, resume=True, echo=lambda *a, **k: None)
    assert (result.adapter_dir / "loratune.json").is_file()
    assert not (out / "checkpoints").exists()


@pytest.mark.integration
def test_kill_9_at_20_random_moments_then_resume_equals_an_uninterrupted_run(tiny_t5, demo_rows, tmp_path):
    """A forked run is SIGKILLed at 20 seeded moments (10 random times, 10 random file-system events: inside
    checkpoint writes, best/ and final/ swaps, the final cleanup); each then resumes to the same adapter."""
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows["train"][:48])
    val = write_jsonl(tmp_path / "val.jsonl", demo_rows["val"][:20])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "kill_harness.py"),
        "--root",
        str(tmp_path / "runs"),
        "--trials",
        "20",
        "--seed",
        "16",
        "--",
        "--model",
        str(tiny_t5),
        "--train",
        str(train),
        "--val",
        str(val),
        "--max-steps",
        "6",
        "--save-steps",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "0.005",
        "--seed",
        "7",
        "--set",
        "train.logging_steps=2",
        "--set",
        "train.eval_steps=3",
        "--set",
        "train.early_stopping_patience=0",
        "--set",
        "data.test=none",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    trials = report["trials"]
    assert len(trials) == 20
    failed = [t for t in trials if t["exit"] != 0 or t["max_abs_diff"] is None or t["max_abs_diff"] > 1e-6]
    assert not failed, json.dumps(failed, indent=1)
    assert sum(t["killed"] for t in trials) >= 15, "most kills must land before the run ends"
    # Some kills cut a write in half: proof the moments include checkpoint/final writes, not only training steps.
    assert any(t["leftovers"] for t in trials), json.dumps(trials, indent=1)
    # Most trials must exercise --resume; time-based kills land earlier or later with the machine's load
    # (14 of 20 on a loaded 2-core run), so the floor leaves room for that.
    assert sum(t["then"] == "--resume" for t in trials) >= 12


@pytest.mark.integration
def test_a_real_full_disk_ends_in_one_sentence_and_resumes_after_space_is_freed(tiny_t5, demo_rows, tmp_path):
    """An 800 kB tmpfs fills up at the third checkpoint (needs mount rights: root in a container; skipped otherwise)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        train = write_jsonl(tmp_path / "train.jsonl", demo_rows["train"][:48])
        val = write_jsonl(tmp_path / "val.jsonl", demo_rows["val"][:20])
        cmd = [
            sys.executable,
            "-m",
            "loratune",
            "train",
            "--model",
            str(tiny_t5),
            "--train",
            str(train),
            "--val",
            str(val),
            "--max-steps",
            "8",
            "--save-steps",
            "1",
            "--batch-size",
            "4",
            "--seed",
            "7",
            "--set",
            "train.eval_steps=4",
            "--set",
            "train.early_stopping_patience=0",
            "--output-dir",
            str(mnt / "run"),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        full = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert full.returncode == 1, full.stderr[-3000:]
        assert "Traceback" not in full.stderr
        lines = error_lines(full.stderr)
        assert len(lines) == 1 and "disk full while writing" in lines[0] and str(mnt) in lines[0], full.stderr[-3000:]
        assert "--resume" in lines[0] and "MB is free" in lines[0]
        assert latest_checkpoint(mnt / "run" / "checkpoints") is not None
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)  # space freed
        resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming from" in resumed.stdout
        assert (mnt / "run" / "final" / "loratune.json").is_file()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
