"""Train a LoRA adapter for text classification. One recipe, read top to bottom.

Single process (CPU, one GPU, or Apple MPS):
    loratune train                                  # defaults: flan-t5-small on data/raw/
    loratune train --model tiny --max-steps 50      # offline smoke test (random weights)
Data-parallel, same command under a standard launcher (HF Trainer handles the process group):
    torchrun --nproc-per-node 4 -m loratune train --config configs/default.yaml
    accelerate launch --num-processes 4 -m loratune train --config configs/default.yaml
Resume after a crash or Ctrl-C (continues from the last checkpoint, same result as an uninterrupted run):
    loratune train --resume

Layout of OUTPUT_DIR: ``checkpoints/`` (Trainer checkpoints for --resume, ``best/`` adapter so far) and
``final/`` (the best adapter, tokenizer and ``loratune.json``), written atomically at the end. Every checkpoint
is renamed into place only when complete, so a kill -9 or a full disk never leaves one --resume would trip on
(checkpoints.py); a NaN/inf loss or weight stops the run before anything of it is saved (guards.py).

The best adapter is the one with the highest end-to-end validation accuracy; for multi-label data, the
highest micro-F1 (score mode, threshold 0.5, at least one label per text, as ``predict`` does by default).
Micro-F1 rather than subset accuracy: it credits partly right label sets, so it still moves while a small
model is getting whole sets right only rarely. Subset accuracy is logged beside it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ExportableState, PrinterCallback

from .atomic import replace_dir, temp_dir_beside
from .checkpoints import AtomicCheckpoints, discard_checkpoints, disk_full_as_error, latest_checkpoint, prepare_output_dir, space_needed
from .config import Config, validate
from .data import Splits, example_labels, fingerprint, load_splits
from .errors import LoratuneError
from .guards import FiniteLossStep, NonFiniteGuard, TrainingDiverged  # noqa: F401 (TrainingDiverged: re-exported)
from .models import META_FILE, attach_lora, count_parameters, load_base, resolve_model_name
from .predict import (
    MAX_SCORED_LABELS,
    MULTI_LABEL_SEQ2SEQ_ONLY,
    decide_labels,
    label_logprobs,
    pick_device,
    seq2seq_label_marginals,
)
from .prompt import format_example, format_target
from .tokenize import collator_for_family, encode_for_family, render_causal_prompt, resolve_chat_template

FINAL = "final"
CHECKPOINTS = "checkpoints"
BEST = "best"


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict
    """best_val_accuracy (multi-label: best_val_micro_f1), best_step, val_loss, train_samples_per_second, ..."""
    interrupted: bool = False


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, echo=print) -> TrainResult:
    """Train an adapter as configured and write it to ``cfg.train.output_dir/final``."""
    validate(cfg, training=True)
    splits = load_splits(cfg.data, seed=cfg.train.seed)
    if splits.multi_label and not cfg.data.multi_label:
        cfg = copy.deepcopy(cfg)  # detected from the data: the saved config must say so too
        cfg.data.multi_label = True
    if splits.multi_label and len(splits.labels) > MAX_SCORED_LABELS:
        raise LoratuneError(f"multi-label training picks the best adapter by scoring every label set, which allows "
                            f"at most {MAX_SCORED_LABELS} labels (got {len(splits.labels)})")
    out = Path(cfg.train.output_dir)
    ckpt_dir = out / CHECKPOINTS
    set_seed(cfg.train.seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    say = echo if rank0 else (lambda *a, **k: None)
    resume_from = prepare_output_dir(out, ckpt_dir, resume, overwrite, say)  # crash leftovers cleaned here

    # 1. Model: base weights frozen, LoRA on the attention projections (encoders: plus a new, fully trained
    #    classification head).
    model_name = resolve_model_name(cfg.model.name, texts=[e.text for e in splits.train], labels=splits.labels)
    base = load_base(model_name, revision=cfg.model.revision, family=cfg.model.family,
                     trust_remote_code=cfg.model.trust_remote_code, labels=splits.labels)
    if base.family != "seq2seq" and splits.multi_label:
        raise LoratuneError(MULTI_LABEL_SEQ2SEQ_ONLY)
    tokenizer = base.tokenizer
    chat_template = base.family == "causal" and resolve_chat_template(tokenizer, cfg.prompt.chat_template)
    model = attach_lora(base.model, base.family, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                        cfg.lora.target_modules)
    if cfg.train.gradient_checkpointing:
        # PEFT + frozen embeddings: without this, checkpointed blocks see inputs that do not require grad
        # and backward fails with "element 0 of tensors does not require grad".
        model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    targets = sorted(model.peft_config["default"].target_modules)
    saved_modules = _saved_modules(model)
    device = pick_device()
    precision = _precision(cfg.train.precision, device)
    say(f"device: {device.type}  precision: {precision}  world size: {os.environ.get('WORLD_SIZE', '1')}")
    say(f"model: {cfg.model.name} ({base.family})  LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {', '.join(targets)}"
        + (f"  trained in full: {', '.join(saved_modules)}" if saved_modules else "")
        + ("  chat template: on" if chat_template else ""))
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    # 2. Data: canonical prompts, tokenized once; padding happens per batch in the collator.
    def encode(examples):
        prompts = [format_example(e.text, splits.labels, cfg.prompt.task, cfg.prompt.input_name,
                                  splits.multi_label) for e in examples]
        targets_ = [format_target(e.label, splits.labels) for e in examples]
        return prompts, encode_for_family(base.family, tokenizer, prompts, targets_, labels=splits.labels,
                                          max_length=cfg.data.max_length, max_target_length=cfg.data.max_target_length,
                                          chat_template=chat_template)

    _, train_enc = encode(splits.train)
    val_prompts, val_enc = encode(splits.val)
    if splits.multi_label:
        val_gold = torch.tensor([[label in example_labels(e) for label in splits.labels] for e in splits.val])
    else:
        val_gold = [splits.labels.index(e.label) for e in splits.val]
    say(f"data: {len(splits.train)} train / {len(splits.val)} val examples, {len(splits.labels)} labels"
        + (" (val split from train)" if splits.val_is_split else "") + (", multi-label" if splits.multi_label else ""))
    if train_enc.n_truncated or val_enc.n_truncated:
        say(f"warning: {train_enc.n_truncated + val_enc.n_truncated} prompts longer than "
            f"data.max_length={cfg.data.max_length} were truncated")
    for warning in splits.warnings:
        say(f"warning: {warning}")

    # 3. Trainer: HF Trainer gives DDP under torchrun/accelerate, checkpoints and exact resume.
    args = _training_args(cfg, ckpt_dir, precision, device)
    best = BestAdapter(str(ckpt_dir / BEST), _selection_metric(cfg))
    stop = InterruptToCheckpoint()
    callbacks = [NonFiniteGuard(), best, stop, ProgressBar(say)]
    if cfg.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = ClassifierTrainer(
        model=model, args=args, train_dataset=train_enc.features, eval_dataset=val_enc.features,
        data_collator=collator_for_family(base.family, tokenizer, pad_to_multiple_of=8 if device.type == "cuda" else None),
        processing_class=tokenizer, callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts; ProgressBar shows the same, readably
    trainer.accuracy_inputs = (val_prompts, splits.labels, val_gold, cfg.data.max_length, cfg.predict.batch_size)
    trainer.multi_label = splits.multi_label
    trainer.family, trainer.chat_template = base.family, chat_template
    say("config: " + json.dumps(cfg.to_dict(), separators=(",", ":")))

    # A full disk (checkpoint, best/ or final/) ends in one sentence; the last complete checkpoint stays resumable.
    disk_full = disk_full_as_error(out, lambda: space_needed(ckpt_dir, model), lambda: latest_checkpoint(ckpt_dir) is not None)
    with stop.installed(), disk_full:
        result = trainer.train(resume_from_checkpoint=resume_from)
    # On resume the Trainer rebuilds stateful callbacks from the checkpoint: use the live instance.
    best = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BestAdapter))
    if stop.requested:
        say(f"interrupted at step {trainer.state.global_step}: checkpoint saved in {ckpt_dir}; "
            f"continue with --resume (same command)")
        return TrainResult(out / FINAL, {}, interrupted=True)
    if best.step != trainer.state.global_step:
        trainer.evaluate()  # the last steps were never evaluated (e.g. --max-steps inside an epoch)

    # 4. Output: the best adapter + tokenizer + metadata, swapped in atomically.
    metrics = {
        f"best_val_{best.metric}": best.value, "best_step": best.step, "val_loss": best.loss,
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "trainable_params": trainable, "total_params": total, "truncated_prompts": train_enc.n_truncated,
        "loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    final = out / FINAL
    if rank0:
        meta = _metadata(cfg, splits, base, model_name, targets, metrics)
        meta["prompt"]["chat_template"] = chat_template
        if base.family == "causal":
            meta["prompt"]["model_input_example"] = render_causal_prompt(tokenizer, meta["prompt"]["template_example"],
                                                                         chat_template)
        meta["lora_modules_to_save"] = saved_modules
        with disk_full_as_error(final, lambda: space_needed(ckpt_dir, model), lambda: True):
            _write_final(ckpt_dir / BEST, final, meta, tokenizer)
        discard_checkpoints(out, ckpt_dir)  # a finished run has nothing left to resume
    say(f"best val {best.metric.replace('_', '-')} {best.value:.4f} at step {best.step}; "
        f"{metrics['train_samples_per_second'] or 0:.1f} samples/s; adapter: {final}")
    return TrainResult(final, metrics)


# --------------------------------------------------------------------------------------------------
# Helpers, in the order the recipe uses them.

def _precision(requested: str, device) -> str:
    if requested != "auto":
        if requested in ("bf16", "fp16") and device.type != "cuda":
            raise LoratuneError(f"train.precision={requested} needs a CUDA GPU; this run is on {device.type}")
        return requested
    if device.type == "cuda":
        # T5 overflows in fp16 (NaN loss); FLAN-T5 was trained in bf16, so prefer it where supported.
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _training_args(cfg: Config, ckpt_dir: Path, precision: str, device) -> TrainingArguments:
    t = cfg.train
    eval_by_steps = t.eval_steps > 0
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.predict.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        lr_scheduler_type="linear",
        seed=t.seed,
        eval_strategy="steps" if eval_by_steps else "epoch",
        eval_steps=t.eval_steps if eval_by_steps else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        metric_for_best_model=_selection_metric(cfg),
        greater_is_better=True,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        activation_checkpointing=t.gradient_checkpointing,
        report_to="none",
        log_level_replica="error",  # other ranks would repeat every library warning
        disable_tqdm=True,  # ProgressBar below shows loss and samples/s instead
        restore_callback_states_from_checkpoint=True,
        dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=False,
    )


def _selection_metric(cfg: Config) -> str:
    return "micro_f1" if cfg.data.multi_label else "accuracy"


class ClassifierTrainer(FiniteLossStep, AtomicCheckpoints, Trainer):
    """HF Trainer whose evaluation adds end-to-end label accuracy (score mode, never teacher-forced tokens).

    Multi-label: micro-F1 and subset accuracy instead, from the same thresholded predictions ``predict`` makes.
    """

    accuracy_inputs: tuple = ()
    multi_label: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # T5 averages its own loss and ignores num_items_in_batch. If the Trainer believes the model uses it, it
        # multiplies the loss by the world size under DDP, which doubles logged losses and gradients on 2 ranks.
        # Per-rank mean losses averaged by DDP are what we want for every family.
        self.model_accepts_loss_kwargs = False
    family: str = "seq2seq"
    chat_template: bool = False

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self.multi_label:
            output.metrics.update({f"{prefix}_{k}": v for k, v in self._multi_label_scores().items()})
        else:
            output.metrics[f"{prefix}_accuracy"] = self._label_accuracy()
        return output

    def _multi_label_scores(self) -> dict[str, float]:
        prompts, labels, gold, max_length, batch_size = self.accuracy_inputs
        rank, world = self.args.process_index, self.args.world_size
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        probs = seq2seq_label_marginals(model, self.processing_class, prompts[rank::world], labels,
                                        batch_size=batch_size, max_length=max_length)
        model.train(was_training)
        pred, gold = torch.from_numpy(decide_labels(probs)), gold[rank::world]
        # True positives, false positives, false negatives, exact sets, examples: summed across ranks.
        counts = torch.tensor([float((pred & gold).sum()), float((pred & ~gold).sum()), float((~pred & gold).sum()),
                               float((pred == gold).all(1).sum()), float(len(gold))], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            counts = counts.to(self.args.device)
            dist.all_reduce(counts)
        tp, fp, fn, exact, n = counts.tolist()
        return {"micro_f1": 2 * tp / max(2 * tp + fp + fn, 1.0), "subset_accuracy": exact / n}

    def _label_accuracy(self) -> float:
        prompts, labels, gold, max_length, batch_size = self.accuracy_inputs
        # Each rank scores its shard; the counts are summed across ranks.
        rank, world = self.args.process_index, self.args.world_size
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        scores = label_logprobs(self.family, model, self.processing_class, prompts[rank::world], labels,
                                batch_size=batch_size, max_length=max_length, chat_template=self.chat_template)
        model.train(was_training)
        counts = torch.tensor([float((scores.argmax(1) == gold[rank::world]).sum()), float(len(scores))])
        if world > 1 and dist.is_initialized():
            counts = counts.to(self.args.device)
            dist.all_reduce(counts)
        return counts[0].item() / counts[1].item()  # float64: no float32 rounding in the reported metric


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
        return {"args": {"path": str(self.path), "metric": self.metric},
                "attributes": {"value": self.value, "step": self.step, "loss": self.loss}}

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


class ProgressBar(TrainerCallback):
    """A tqdm bar with the running loss, learning rate and samples/s; evaluation results on their own line."""

    def __init__(self, say):
        self.say, self.bar, self.start = say, None, 0.0
        self.samples_per_step = 1

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)
            self.start, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (state.global_step - self.first_step) * self.samples_per_step / elapsed
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                             samples_s=f"{rate:.1f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.bar is not None and metrics:
            scores = " ".join(f"val_{name} {metrics[f'eval_{name}']:.4f}"
                              for name in ("accuracy", "micro_f1", "subset_accuracy") if f"eval_{name}" in metrics)
            # Beside the bar on stderr, so stdout stays clean for --json.
            self.bar.write(f"step {state.global_step} epoch {state.epoch or 0:.2f}: "
                           f"val_loss {metrics.get('eval_loss', float('nan')):.4f} {scores}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def _saved_modules(model) -> list[str]:
    """Modules PEFT trains in full and saves with the adapter (an encoder's classification head)."""
    from peft.utils import ModulesToSaveWrapper

    # The config lists candidates ("classifier", "score"); report the ones this architecture has.
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, ModulesToSaveWrapper)})


def _metadata(cfg: Config, splits: Splits, base, model_name: str, targets, metrics: dict) -> dict:
    import peft
    import transformers

    from . import __version__

    return {
        "format": 1,
        "base_model": model_name,
        "base_model_requested": cfg.model.name,
        "base_revision": cfg.model.revision,
        "base_config_fingerprint": base.config_fingerprint,
        "family": base.family,
        "labels": splits.labels,
        "multi_label": splits.multi_label,
        "prompt": {"task": cfg.prompt.task, "input_name": cfg.prompt.input_name,
                   "template_example": format_example("{text}", splits.labels, cfg.prompt.task,
                                                      cfg.prompt.input_name, splits.multi_label)},
        "max_length": cfg.data.max_length,
        "lora_target_modules": targets,
        "config": cfg.to_dict(),
        "metrics": metrics,
        "data": {"train": fingerprint(cfg.data.train),
                 "val": fingerprint(cfg.data.val) if cfg.data.val else "split from train"},
        "versions": {"loratune": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_final(best_dir: Path, final: Path, meta: dict, tokenizer) -> None:
    tmp = temp_dir_beside(final)
    try:
        for item in best_dir.iterdir():
            if item.name != "best.json":
                shutil.copyfile(item, tmp / item.name)  # copyfile: new files get normal permissions
        tokenizer.save_pretrained(tmp)
        # loratune.json is written last: its presence marks a complete adapter.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
