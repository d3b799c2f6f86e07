"""kill -9 a tiny training run at seeded random moments, resume it, and compare with an uninterrupted run.

Run by tests/test_checkpoints.py as a subprocess. One parent process imports loratune and torch once (and runs
no torch computation, so forking it is safe) and forks every training run, which saves ~8 s of start-up per run.

Half the kills land at a random time in the run; the other half at a random file-system event of the run (a
file opened for writing, a rename, a deletion under OUTPUT_DIR), seen through an audit hook: these hit checkpoint
writes, best/ and final/ swaps and the final cleanup on purpose. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

EVENTS = ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree")


def _watch(out: str, kill_at: int | None, counter: list[int]) -> None:
    """Count file-system events under ``out``; SIGKILL this process at event number ``kill_at``."""

    def hook(event, args):
        if event not in EVENTS:
            return
        if event == "open":
            path, mode = args[0], args[1]
            if not isinstance(path, str) or not path.startswith(out) or not mode or not any(c in mode for c in "wax+"):
                return
        elif event in ("os.remove", "os.rmdir") and args[1] is not None:
            pass  # rmtree deletes by a name relative to a directory fd: under OUTPUT_DIR in this process
        elif not str(args[0]).startswith(out):
            return
        counter[0] += 1
        if kill_at is not None and counter[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _fork(argv: list[str], out: str, kill_at: int | None = None) -> tuple[int, int, float]:
    """Fork and run ``loratune train ARGV`` in the child; returns (pid, pipe for its event count, start time)."""
    read, write = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        counter = [0]
        _watch(out, kill_at, counter)
        code = 0
        try:
            sys.argv = ["loratune", "train", *argv]
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from loratune.cli import main

            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = 1
        os.write(write, str(counter[0]).encode())
        os._exit(code)
    os.close(write)
    return pid, read, start


def run_and_wait(argv, out, kill_at=None, kill_after=None):
    """Run one training; SIGKILL it at event ``kill_at`` or after ``kill_after`` s. Returns (exit, killed, events, s)."""
    pid, read, start = _fork(argv, out, kill_at)
    if kill_after is None:
        _, status = os.waitpid(pid, 0)
    else:
        deadline, status = start + kill_after, None
        while time.perf_counter() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.005)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    events = os.read(read, 64).decode()
    os.close(read)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    return code, killed, int(events) if events else None, time.perf_counter() - start


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if ta.keys() != tb.keys():
        return float("inf")
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="work directory")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="loratune train arguments after --")
    opts = parser.parse_args()
    base = [a for a in opts.train_args if a != "--"]
    root = Path(opts.root).resolve()
    import loratune.train  # noqa: F401  (import torch/transformers/peft once, before forking; no computation)

    reference = root / "reference"
    code, _, total_events, seconds = run_and_wait([*base, "--output-dir", str(reference)], str(reference))
    assert code == 0, f"reference run failed with exit {code}"
    rng = random.Random(opts.seed)
    trials = []
    for i in range(opts.trials):
        out = root / f"trial-{i}"
        argv = [*base, "--output-dir", str(out)]
        if i % 2 == 0:
            plan = {"kill": "time", "after_s": round(rng.uniform(0.05, seconds), 3)}
            _, killed, _, _ = run_and_wait(argv, str(out), kill_after=plan["after_s"])
        else:
            plan = {"kill": "event", "event": rng.randint(1, total_events)}
            _, killed, _, _ = run_and_wait(argv, str(out), kill_at=plan["event"])
        ckpt = out / "checkpoints"
        left = sorted(p.name for p in [*out.glob(".*"), *ckpt.glob(".*")]) if out.exists() else []
        partial = sorted(p.name for p in ckpt.glob("checkpoint-*") if not (p / "trainer_state.json").is_file()) if ckpt.exists() else []
        if not killed and (out / "final" / "loratune.json").is_file():
            how, code = "finished before the kill", 0
        elif ckpt.exists():
            how = "--resume"
            code, _, _, _ = run_and_wait([*argv, "--resume"], str(out))
        elif (out / "final" / "loratune.json").is_file():
            how, code = "killed after final/ and the cleanup", 0
        else:
            how = "killed before the run started writing: ran again"
            code, _, _, _ = run_and_wait(argv, str(out))
        diff = max_diff(reference / "final", out / "final") if code == 0 else None
        trials.append(
            {**plan, "killed": killed, "leftovers": left, "partial_checkpoints": partial, "then": how, "exit": code, "max_abs_diff": diff}
        )
    print(json.dumps({"reference_s": round(seconds, 2), "reference_events": total_events, "trials": trials}))


if __name__ == "__main__":
    main()
