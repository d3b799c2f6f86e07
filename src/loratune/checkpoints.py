"""Crash-proof run directories: atomic Trainer checkpoints, resume from the newest complete one, leftovers cleaned.

Layout under OUTPUT_DIR/checkpoints (the Trainer's output_dir):

* ``checkpoint-N/``: only ever complete. The Trainer writes into ``.staging/checkpoint-N`` and the directory is
  renamed into place once every file is on disk, so a kill -9 or a full disk mid-save leaves at worst
  ``.staging/``, which the next start removes. Old checkpoints are renamed to ``.trash-*`` before deletion, so a
  half-deleted checkpoint never looks like a real one either.
* ``best/``: swapped in with :func:`loratune.atomic.replace_dir`; a kill between its two renames leaves the
  previous ``best`` as ``.best.old-*``, which :func:`clean_leftovers` puts back.

A finished run's checkpoints directory is renamed away before it is deleted (:func:`discard_checkpoints`), so a
kill during that cleanup leaves either the whole directory (``--resume`` finishes at once) or none of it.

Disk full (ENOSPC/EDQUOT, or torch's "file write failed" with the disk nearly full) becomes one sentence naming the
path and the free space needed (:class:`DiskFull`); the last complete checkpoint stays, so the run is resumable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LoratuneError

STAGING = ".staging"
TRASH_PREFIX = ".trash-"
DONE_PREFIX = ".checkpoints-done-"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
REQUIRED_FILES = ("trainer_state.json", "adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt")
"""What a Trainer checkpoint of a PEFT model must hold for an exact resume."""
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(LoratuneError):
    """The disk filled up while writing: one sentence with the path and the space needed. Exit 1: not bad input."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Which checkpoints count, and cleaning up after a crash.


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """True when ``path`` is a checkpoint directory holding every file an exact resume needs."""
    if not path.is_dir() or checkpoint_step(path) is None:
        return False
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        import json

        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories in ``ckpt_dir``, oldest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _remove(path: Path) -> None:
    """Delete a directory so that no half-deleted copy keeps its real name: rename aside first, then delete."""
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _restore_swapped(target: Path) -> None:
    """Undo a :func:`~loratune.atomic.replace_dir` cut between its two renames: put the old copy back."""
    if target.exists():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], target)


def clean_leftovers(out: Path, ckpt_dir: Path, best_name: str = "best", final_name: str = "final") -> list[str]:
    """Remove what a killed run leaves behind; return the names removed (for one line of output).

    Temp dirs of ``final``/``best`` (``.final-*``, ``.best-*``), their ``.old-*`` swaps (after restoring one that
    was cut off mid-swap), ``.staging``, ``.trash-*``, a renamed-away checkpoints dir, and incomplete
    ``checkpoint-N`` dirs (written by an older loratune, or torn by hand).
    """
    removed: list[str] = []
    for parent, name in ((out, final_name), (ckpt_dir, best_name)):
        if not parent.is_dir():
            continue
        _restore_swapped(parent / name)
        for p in list(parent.glob(f".{name}-*")) + list(parent.glob(f".{name}.old-*")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    if out.is_dir():
        for p in [*out.glob(f"{DONE_PREFIX}*"), *out.glob(f"{TRASH_PREFIX}*")]:  # cut-off finish or --overwrite
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    if ckpt_dir.is_dir():
        for p in [ckpt_dir / STAGING, *ckpt_dir.glob(f"{TRASH_PREFIX}*")]:
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p))
        for p in ckpt_dir.iterdir():
            if checkpoint_step(p) is not None and not is_complete(p):
                _remove(p)
                removed.append(str(p))
    return removed


def prepare_output_dir(out: Path, ckpt_dir: Path, resume: bool, overwrite: bool, say=print) -> str | None:
    """Clean crash leftovers and settle what ``--resume`` continues from; returns the checkpoint path or None.

    Refuses to start over silently on top of an unfinished run, and says which checkpoint a resume uses.
    """
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if out.exists() and not out.is_dir():
        raise LoratuneError(f"--output-dir {out} is a file, not a directory")
    if rank0:
        _check_writable(out)
        removed = clean_leftovers(out, ckpt_dir)
        if removed:
            say(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(Path(p).name for p in removed)}")
    latest = latest_checkpoint(ckpt_dir)
    if resume:
        if latest is not None:
            say(f"resuming from {latest} (step {checkpoint_step(latest)}, the newest complete checkpoint)")
            return str(latest)
        if not ckpt_dir.is_dir():
            finished = (out / "final" / "loratune.json").is_file()
            hint = f"; the run already finished: its adapter is {out / 'final'}" if finished else ""
            raise LoratuneError(f"--resume: no complete checkpoint in {ckpt_dir} to continue from{hint}")
        # A run started here and was stopped before its first checkpoint: nothing to lose by starting over.
        say(f"--resume: the run in {out} stopped before its first complete checkpoint; starting from step 0")
        return None
    if latest is not None and not overwrite and rank0:
        raise LoratuneError(f"{ckpt_dir} holds checkpoints of an unfinished run; pass --resume to continue it or --overwrite to start over")
    if overwrite and rank0:
        _remove(ckpt_dir)
    if rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # marks a started run: --resume before its first checkpoint restarts it
    return None


def _check_writable(out: Path) -> None:
    """Fail before any training if OUTPUT_DIR cannot be created or written (a file on its path, read-only, ...)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LoratuneError(f"--output-dir {out} is not a writable directory ({exc.strerror or exc})") from None


def discard_checkpoints(out: Path, ckpt_dir: Path) -> None:
    """Delete a finished run's checkpoints: renamed away first, so a kill mid-delete leaves nothing half there."""
    if not ckpt_dir.exists():
        return
    done = out / f"{DONE_PREFIX}{os.getpid()}"
    os.replace(ckpt_dir, done)
    shutil.rmtree(done, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Disk full.


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _is_disk_full(exc: BaseException, where: Path, need: int) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
        return True
    # torch.save reports a full disk as RuntimeError("... file write failed") without an errno.
    return "write failed" in text and _free_bytes(where) < need


def _free_bytes(where: Path) -> int:
    for p in (where, *where.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _mb(n: int) -> str:
    return f"{max(n, 0) / 1e6:.1f} MB"


@contextlib.contextmanager
def disk_full_as_error(where: Path, need: Callable[[], int], resumable: Callable[[], bool]) -> Iterator[None]:
    """Turn a full disk while writing under ``where`` into one DiskFull sentence; other errors pass through.

    ``need`` estimates the bytes the write needs; ``resumable`` says whether a complete checkpoint is left.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:  # torch: RuntimeError, tokenizers/safetensors (Rust): plain Exception; others re-raised
        needed = need()
        if not _is_disk_full(exc, where, needed):
            raise
        path = getattr(exc, "filename", None) or where
        then = "run the same command with --resume" if resumable() else "run the same command again"
        raise DiskFull(
            f"disk full while writing {path}: about {_mb(needed)} free is needed there and "
            f"{_mb(_free_bytes(where))} is free; free some space, then {then}"
        ) from None


def space_needed(ckpt_dir: Path, model=None) -> int:
    """Bytes one more checkpoint needs: the newest complete one's size, else ~4 copies of the trainable weights
    (adapter, two Adam moments, slack) plus 2 MB for the tokenizer and state files."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        return dir_size(latest)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) if model else 0
    return 4 * trainable + 2_000_000


# --------------------------------------------------------------------------------------------------
# The Trainer side.


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is written to ``.staging/`` and renamed into place when complete.

    Keeps at most ``args.save_total_limit`` checkpoints (the newest always), deleting old ones rename-first.
    """

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        # Data-parallel: every rank writes its own RNG state into the staging dir, so no rank may write before it
        # is fresh, and rank 0 may not rename it before all have written (no-ops in a single process).
        self.accelerator.wait_for_everyone()
        need = space_needed(run_dir, self.model)
        # Point the Trainer's save (model, optimizer, scheduler, RNG, state, its own rotation) at the staging dir.
        self._get_output_dir = lambda trial=None: str(staging)
        try:
            with disk_full_as_error(staging / name, lambda: need, lambda: latest_checkpoint(run_dir) is not None):
                try:
                    super()._save_checkpoint(model, trial)
                except BaseException:
                    if self.args.should_save:
                        shutil.rmtree(staging, ignore_errors=True)  # give the space back; resume uses the last one
                    raise
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            self.accelerator.wait_for_everyone()  # rank 0 renames; the next save must not start before
            return
        _fsync_tree(staging / name)
        target = run_dir / name
        _remove(target)  # the same step saved again (e.g. Ctrl-C right after a scheduled save)
        os.replace(staging / name, target)
        _fsync_dir(run_dir)
        shutil.rmtree(staging, ignore_errors=True)
        self.state.best_model_checkpoint = None  # it pointed into .staging; loratune keeps its own best/
        limit = self.args.save_total_limit
        if limit and limit > 0:
            for old in complete_checkpoints(run_dir)[:-limit]:
                _remove(old)
        self.accelerator.wait_for_everyone()


def _fsync_tree(path: Path) -> None:
    """Flush every file of a checkpoint before it is renamed in, so the rename never publishes unwritten data."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)
