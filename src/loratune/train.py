"""Train a LoRA adapter for text classification. One recipe, read top to bottom.

Single process (CPU, one GPU, or Apple MPS):
    loratune train                                  # defaults: flan-t5-small on data/raw/
    loratune train --model tiny --max-steps 50      # offline smoke test (random weights)
Data-parallel, same command under a standard launcher (HF Trainer handles the process group):
    torchrun --nproc-per-node 4 -m loratune train --config configs/default.yaml
    accelerate launch --num-processes 4 -m loratune train --config configs/default.yaml
Resume after a crash or Ctrl-C (continues from the last checkpoint, same result as an uninterrupted run):
    loratune train --resume
From Python, with a 🤗 ``datasets.Dataset`` (or a list of dicts) instead of files:
    loratune.train(load_config(overrides={...}), train_data=ds["train"], val_data=ds["validation"])

Layout of OUTPUT_DIR: ``checkpoints/`` (Trainer checkpoints for --resume, ``best/`` adapter so far) and
``final/`` (the best adapter, tokenizer, ``loratune.json`` and a model card, README.md), written atomically at
the end; ``runs/`` with ``train.report_to=tensorboard``. Every checkpoint
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from .adapter import AdapterMeta
from .atomic import replace_dir, temp_dir_beside
from .callable_module import make_callable
from .callbacks import BestAdapter, InterruptToCheckpoint, ProgressBar, log_tensorboard_to
from .checkpoints import AtomicCheckpoints, discard_checkpoints, disk_full_as_error, latest_checkpoint, prepare_output_dir, space_needed
from .class_weights import WeightedCollator, class_weights
from .config import Config, apply_family_defaults, validate
from .console import progress
from .data import Splits, example_labels, label_counts, load_splits
from .errors import LoratuneError
from .families import family_class
from .families.common import MULTI_LABEL_SEQ2SEQ_ONLY
from .fields import settled
from .gguf import gguf_source
from .guards import FiniteLossStep, NonFiniteGuard, TrainingDiverged
from .model_card import hub_origin, packaged_copy_of, point_config_at_hub, write_card
from .models import attach_lora, count_parameters, load_base, prompt_spec, resolve_model_name
from .predict import Classifier, decide_labels, pick_device
from .prompt import MAX_SCORED_LABELS, PromptSpec
from .report_to import report_to_list
from .tables import source_fingerprint
from .validation_loss import FamilyValidationLoss

__all__ = ["TrainResult", "TrainingDiverged", "train"]

FINAL = "final"
CHECKPOINTS = "checkpoints"
BEST = "best"


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict
    """best_val_accuracy (multi-label: best_val_micro_f1), best_step, val_loss, train_samples_per_second, ..."""
    interrupted: bool = False


def train(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, echo=print, train_data=None, val_data=None, command: str = ""
) -> TrainResult:
    """Train an adapter as configured and write it to ``cfg.train.output_dir/final``.

    ``train_data`` / ``val_data``: a ``datasets.Dataset`` or list of dicts instead of ``cfg.data.train`` / ``val``
    (same validation; without ``val_data`` the validation set is split from ``train_data``). ``command``: the
    command line, for the model card."""
    validate(cfg, training=True)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg = settled(cfg, cfg.data.train if train_data is None else train_data, echo if rank0 else None, name="train_data")
    splits = load_splits(cfg.data, seed=cfg.train.seed, train_data=train_data, val_data=val_data)
    if splits.multi_label and not cfg.data.multi_label:
        cfg = copy.deepcopy(cfg)  # detected from the data: the saved config must say so too
        cfg.data.multi_label = True
    if splits.multi_label and len(splits.labels) > MAX_SCORED_LABELS:
        raise LoratuneError(
            f"multi-label training picks the best adapter by scoring every label set, which allows "
            f"at most {MAX_SCORED_LABELS} labels (got {len(splits.labels)})"
        )
    weights = class_weights(cfg.train.class_weights, splits)  # before any model loads: multi-label is refused
    out = Path(cfg.train.output_dir)
    ckpt_dir = out / CHECKPOINTS
    set_seed(cfg.train.seed)
    say = echo if rank0 else (lambda *a, **k: None)
    resume_from = prepare_output_dir(out, ckpt_dir, resume, overwrite, say)  # crash leftovers cleaned here

    # 1. Model: base weights frozen, LoRA on the attention projections (encoders: plus a new, fully trained
    #    classification head). The family decides how the model reads the prompt spec.
    model_name = resolve_model_name(cfg.model.name, texts=[e.text for e in splits.train], labels=splits.labels)
    base = load_base(
        model_name,
        revision=cfg.model.revision,
        family=cfg.model.family,
        trust_remote_code=cfg.model.trust_remote_code,
        labels=splits.labels,
    )
    family_cls = family_class(base.family)
    if splits.multi_label and not family_cls.supports_multi_label:
        raise LoratuneError(MULTI_LABEL_SEQ2SEQ_ONLY)
    cfg, family_defaults = apply_family_defaults(cfg, family_cls.train_defaults)
    if family_defaults:
        say(f"{base.family} defaults: " + ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in family_defaults.items()))
    spec = prompt_spec(cfg, family_cls, base.tokenizer, splits.labels, splits.multi_label, base.model.config)
    target_modules, exclude_modules = cfg.lora.target_modules, None
    if not target_modules:
        target_modules, exclude_modules = family_cls.lora_targets(base.model, spec)
    lora = cfg.lora
    model = attach_lora(base.model, base.family, lora.r, lora.alpha, lora.dropout, target_modules, exclude_modules, lora.use_dora)
    if cfg.train.gradient_checkpointing:
        # PEFT + frozen embeddings: without this, checkpointed blocks see inputs that do not require grad
        # and backward fails with "element 0 of tensors does not require grad".
        model.enable_input_require_grads()
    family = family_cls(model, base.tokenizer, spec)
    if resume_from is None:  # a resumed run restores everything from its checkpoint
        family.prepare_training([e.text for e in splits.train], [e.label for e in splits.train], say)
    trainable, total = count_parameters(model)
    targets = sorted(model.peft_config["default"].target_modules)
    saved_modules = _saved_modules(model)
    device = pick_device()
    precision = _precision(cfg.train.precision, device)
    say(f"device: {device.type}  precision: {precision}  world size: {os.environ.get('WORLD_SIZE', '1')}")
    kind, leaves = "DoRA" if cfg.lora.use_dora else "LoRA", sorted({t.rsplit(".", 1)[-1] for t in targets})  # all-linear: full paths
    say(
        f"model: {cfg.model.name} ({base.family})  {kind} r={cfg.lora.r} alpha={cfg.lora.alpha} on {', '.join(leaves)}"
        + (f"  trained in full: {', '.join(saved_modules)}" if saved_modules else "")
        + ("  chat template: on" if spec.chat_template else "")
        + ("  input: text alone" if spec.input_only else "")
        + ("  head: mean pooling" if spec.pooling == "mean" else "")
    )
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    # 2. Data: prompts from the spec, tokenized once; padding happens per batch in the collator.
    train_enc = family.encode([e.text for e in splits.train], [spec.target(e.label) for e in splits.train])
    val_enc = family.encode([e.text for e in splits.val], [spec.target(e.label) for e in splits.val])
    if splits.multi_label:
        val_gold = torch.tensor([[label in example_labels(e) for label in splits.labels] for e in splits.val])
    else:
        val_gold = np.array([splits.labels.index(e.label) for e in splits.val])
    say(
        f"data: {len(splits.train)} train / {len(splits.val)} val examples, {len(splits.labels)} labels"
        + (" (val split from train)" if splits.val_is_split else "")
        + (", multi-label" if splits.multi_label else "")
        + f"; max_length {spec.max_length} tokens"
    )
    if train_enc.n_truncated or val_enc.n_truncated:
        say(
            f"note: {train_enc.n_truncated} train / {val_enc.n_truncated} val texts were longer than "
            f"max_length={spec.max_length} and had their middle cut (instruction and labels are never cut)"
        )
    for warning in splits.warnings:
        say(f"warning: {warning}")
    if weights:
        say("class weights (inverse label frequency): " + ", ".join(f"{label} {w:.2f}" for label, w in weights.items()))
        for feature, example in zip(train_enc.features, splits.train):
            feature["weight"] = weights[example.label]

    # 3. Trainer: HF Trainer gives DDP under torchrun/accelerate, checkpoints and exact resume. Validation runs
    #    the prediction code itself (a Classifier over the model being trained), never teacher-forced tokens.
    args = _training_args(cfg, ckpt_dir, precision, device)
    best = BestAdapter(str(ckpt_dir / BEST), _selection_metric(cfg))
    stop = InterruptToCheckpoint()
    callbacks = [NonFiniteGuard(), best, stop, ProgressBar(say)]
    if cfg.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    validator = Classifier(family, cfg.predict, mode="score", name="validation")
    trainer = ClassifierTrainer(
        model=model,
        args=args,
        train_dataset=train_enc.features,
        eval_dataset=val_enc.features,
        data_collator=WeightedCollator(family.collator(pad_to_multiple_of=8 if device.type == "cuda" else None)),
        processing_class=base.tokenizer,
        callbacks=callbacks,
        validation=(validator, [e.text for e in splits.val], val_gold),
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts; ProgressBar shows the same, readably
    log_tensorboard_to(trainer, out / "runs")  # the Trainer's default is inside checkpoints/, discarded at the end
    say("config: " + json.dumps(cfg.to_dict(), separators=(",", ":")))

    # A full disk (checkpoint, best/ or final/) ends in one sentence; the last complete checkpoint stays resumable.
    disk_full = disk_full_as_error(out, lambda: space_needed(ckpt_dir, model), lambda: latest_checkpoint(ckpt_dir) is not None)
    with stop.installed(), disk_full:
        result = trainer.train(resume_from_checkpoint=resume_from)
    # On resume the Trainer rebuilds stateful callbacks from the checkpoint: use the live instance.
    best = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BestAdapter))
    if stop.requested:
        say(f"interrupted at step {trainer.state.global_step}: checkpoint saved in {ckpt_dir}; continue with --resume (same command)")
        return TrainResult(out / FINAL, {}, interrupted=True)
    evaluated = {h.get("step") for h in trainer.state.log_history if "eval_loss" in h}
    if trainer.state.global_step not in evaluated:
        trainer.evaluate()  # the last steps were never evaluated (the Trainer usually does; once is enough)

    # 4. Output: the best adapter + tokenizer + metadata, swapped in atomically.
    metrics = {
        f"best_val_{best.metric}": best.value,
        "best_step": best.step,
        "val_loss": best.loss,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_loss": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "trainable_params": trainable,
        "total_params": total,
        "truncated_prompts": train_enc.n_truncated,
        "truncated_val_prompts": val_enc.n_truncated,
        "loss_history": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    final = out / FINAL
    if rank0:
        meta = _metadata(cfg, splits, base, model_name, spec, targets, saved_modules, metrics, (train_data, val_data), command)
        hub_id, revision = hub_origin(cfg.model.name, model_name)
        packaged = packaged_copy_of(model_name)
        shown = hub_id or (f"{packaged} (the copy at {model_name})" if packaged else model_name)
        example = (splits.train[0].text, splits.train[0].label)

        def finish(tmp: Path) -> None:  # PEFT's files say where the base came from; the card says what this is
            if hub_id:
                point_config_at_hub(tmp, hub_id, cfg.model.revision or revision)
            write_card(tmp, meta, base.tokenizer, example, shown, hub_id or packaged)

        with disk_full_as_error(final, lambda: space_needed(ckpt_dir, model), lambda: True):
            _write_final(ckpt_dir / BEST, final, meta, base.tokenizer, finish)
        discard_checkpoints(out, ckpt_dir)  # a finished run has nothing left to resume
    say(
        f"best val {best.metric.replace('_', '-')} {best.value:.4f} at step {best.step}; "
        f"{metrics['train_samples_per_second'] or 0:.1f} examples/s; adapter: {final}"
    )
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
        report_to=report_to_list(t.report_to),
        log_level_replica="error",  # other ranks would repeat every library warning
        disable_tqdm=True,  # ProgressBar below shows loss and samples/s instead
        restore_callback_states_from_checkpoint=True,
        dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=False,
    )


def _selection_metric(cfg: Config) -> str:
    return "micro_f1" if cfg.data.multi_label else "accuracy"


class ClassifierTrainer(FamilyValidationLoss, FiniteLossStep, AtomicCheckpoints, Trainer):
    """HF Trainer whose evaluation adds end-to-end label accuracy through ``validation``'s Classifier (score mode).

    Multi-label: micro-F1 and subset accuracy instead, from the same thresholded predictions ``predict`` makes.
    Each rank scores its shard of the validation texts; the counts are summed across ranks.
    """

    def __init__(self, *args, validation: tuple[Classifier, list[str], object], **kwargs):
        super().__init__(*args, **kwargs)
        self.validator, self.val_texts, self.val_gold = validation
        # T5 averages its own loss and ignores num_items_in_batch. If the Trainer believes the model uses it, it
        # multiplies the loss by the world size under DDP, which doubles logged losses and gradients on 2 ranks.
        # Per-rank mean losses averaged by DDP are what we want for every family.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("weight", None)  # train.class_weights: one per example
        # The family's own loss calls the model's modules directly, which DistributedDataParallel would not see:
        # single process only; under DDP a weighted loss goes through the model's forward.
        if not return_outputs:
            family = self.validator.family
            single = self.args.world_size == 1
            loss = family.training_loss(model, inputs, weights) if single else family.forward_loss(model, inputs, weights)
            if loss is not None:
                return loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        rank, world = self.args.process_index, self.args.world_size
        texts, gold = self.val_texts[rank::world], self.val_gold[rank::world]
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        self.validator.family.invalidate()  # the weights moved since the last evaluation
        # Scoring hundreds of validation texts takes a while: a bar under the training bar (gone when done).
        bar = progress(len(texts), "validate", self.validator.spec.input_name, leave=False, delay=1.0) if rank == 0 else None
        tick = bar.update if bar is not None else None
        try:
            if self.validator.multi_label:
                pred = torch.from_numpy(decide_labels(self.validator.predict_proba(texts, progress=tick)))
                # True positives, false positives, false negatives, exact sets, examples.
                counts = [
                    float((pred & gold).sum()),
                    float((pred & ~gold).sum()),
                    float((~pred & gold).sum()),
                    float((pred == gold).all(1).sum()),
                    float(len(gold)),
                ]
            else:
                counts = [float((self.validator.score(texts, progress=tick).argmax(1) == gold).sum()), float(len(gold))]
        finally:
            model.train(was_training)
            if bar is not None:
                bar.close()
        total = torch.tensor(counts, dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            total = total.to(self.args.device)
            dist.all_reduce(total)
        values = total.tolist()  # float64: no float32 rounding in the reported metric
        if self.validator.multi_label:
            tp, fp, fn, exact, n = values
            metrics = {"micro_f1": 2 * tp / max(2 * tp + fp + fn, 1.0), "subset_accuracy": exact / n}
        else:
            metrics = {"accuracy": values[0] / values[1]}
        output.metrics.update({f"{prefix}_{k}": v for k, v in metrics.items()})
        return output


def _saved_modules(model) -> list[str]:
    """Modules PEFT trains in full and saves with the adapter (an encoder's classification head)."""
    from peft.utils import ModulesToSaveWrapper

    # The config lists candidates ("classifier", "score"); report the ones this architecture has.
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)})


def _metadata(
    cfg: Config, splits: Splits, base, model_name: str, spec: PromptSpec, targets, saved_modules, metrics: dict, tables, command: str
) -> AdapterMeta:
    import peft
    import transformers

    counts = label_counts(splits.train)

    from . import __version__

    return AdapterMeta(
        base_model=model_name,
        family=base.family,
        spec=spec,
        base_model_requested=cfg.model.name,
        base_revision=cfg.model.revision,
        base_config_fingerprint=base.config_fingerprint,
        base_gguf=gguf_source(model_name),
        lora_target_modules=targets,
        lora_modules_to_save=saved_modules,
        config=cfg.to_dict(),
        metrics=metrics,
        data={
            "train": source_fingerprint(cfg.data.train if tables[0] is None else tables[0]),
            "val": "split from train" if splits.val_is_split else source_fingerprint(cfg.data.val if tables[1] is None else tables[1]),
            "train_examples": len(splits.train),
            "val_examples": len(splits.val),
            "label_counts": {label: counts.get(label, 0) for label in splits.labels},
        },
        command=command,
        versions={
            "loratune": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _write_final(best_dir: Path, final: Path, meta: AdapterMeta, tokenizer, finish) -> None:
    tmp = temp_dir_beside(final)
    try:
        for item in best_dir.iterdir():
            if item.name != "best.json":
                shutil.copyfile(item, tmp / item.name)  # copyfile: new files get normal permissions
        tokenizer.save_pretrained(tmp)
        finish(tmp)
        # loratune.json is written last: its presence marks a complete adapter.
        meta.write(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


make_callable(__name__, "train")  # loratune.train(cfg) works even once this module is imported
