"""Trainer callbacks of the training recipe: best adapter, Ctrl-C to checkpoint, progress bar."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .atomic import replace_dir, temp_dir_beside


class BestAdapter(TrainerCallback, ExportableState):
    """Keep the adapter with the best validation ``metric`` (accuracy; multi-label: micro_f1) in ``best/``
    (atomically); state survives --resume.

    The Trainer re-creates this callback from ``state()["args"]`` on resume, so they must be JSON values.
    """

    def __init__(self, path: str, metric: str = "accuracy"):
        self.path = Path(path)
        self.metric = metric
        self.value, self.step, self.loss = -1.0, -1, float("nan")

    def state(self) -> dict:
        return {
            "args": {"path": str(self.path), "metric": self.metric},
            "attributes": {"value": self.value, "step": self.step, "loss": self.loss},
        }

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}", float("nan"))
        if state.global_step == self.step:
            return
        if not (value > self.value) and self.step >= 0:
            return
        self.value, self.step, self.loss = value, state.global_step, metrics.get("eval_loss", float("nan"))
        if state.is_world_process_zero:
            tmp = temp_dir_beside(self.path)
            model.save_pretrained(tmp)
            (tmp / "best.json").write_text(json.dumps(self.state()["attributes"]), encoding="utf-8")
            replace_dir(tmp, self.path)


class InterruptToCheckpoint(TrainerCallback):
    """First Ctrl-C (or SIGTERM) saves a checkpoint at the end of the current step and stops; a second one kills."""

    def __init__(self):
        self.requested = False

    def installed(self):
        import contextlib

        @contextlib.contextmanager
        def handlers():
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

            def handle(signum, frame):
                if self.requested:
                    signal.signal(signum, previous[signum])
                    raise KeyboardInterrupt
                self.requested = True

            try:
                for sig in previous:
                    signal.signal(sig, handle)
            except ValueError:  # not the main thread: leave signals alone
                previous = {}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        return handlers()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


def postfix(loss: float, lr: float, examples_per_s: float) -> str:
    return f"loss {loss:.4f} lr {lr:.1e} {examples_per_s:.1f} ex/s"


class ProgressBar(TrainerCallback):
    """A tqdm bar with the running loss, learning rate and samples/s; evaluation results on their own line."""

    def __init__(self, say):
        self.say, self.bar, self.start = say, None, 0.0
        self.samples_per_step = 1

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from .console import progress

            self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.bar = progress(state.max_steps, "train", "step", initial=state.global_step, rate=False)
            self.start, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (state.global_step - self.first_step) * self.samples_per_step / elapsed
        # Shown at the bar's next redraw: redrawing here would bypass the bar's throttle (one log line per log).
        self.bar.set_postfix_str(postfix(logs["loss"], logs.get("learning_rate", 0.0), rate), refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None and metrics:
            scores = " ".join(
                f"val_{name} {metrics[f'eval_{name}']:.4f}"
                for name in ("accuracy", "micro_f1", "subset_accuracy")
                if f"eval_{name}" in metrics
            )
            # Beside the bar on stderr, so stdout stays clean for --json.
            self.bar.write(
                f"step {state.global_step} epoch {state.epoch or 0:.2f}: val_loss {metrics.get('eval_loss', float('nan')):.4f} {scores}",
                file=sys.stderr,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def log_tensorboard_to(trainer, logging_dir) -> None:
    """Point the Trainer's TensorBoard callback (``train.report_to=tensorboard``) at ``logging_dir``, unless the
    TENSORBOARD_LOGGING_DIR environment variable already chose one."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(logging_dir)
