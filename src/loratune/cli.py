"""The ``loratune`` command: a thin shell over the Python API.

Same flag, same meaning on every command (``--config``, ``--model``, ``--train``, ``--adapter``, ...).
Exit codes: 0 ok, 2 bad input or usage (one line naming the file/line or flag), 1 unexpected failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import Config, load_config, parse_set_options, validate
from .errors import LoratuneError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Teach a small language model to classify text with LoRA, and measure what it learned.",
)

# Shared options: one declaration each, so every command spells and documents them the same way.
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML config file (see configs/default.yaml).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="Base model: hub id, local path, or tiny / tiny-causal / tiny-encoder (random weights, offline).")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="Override model family detection: seq2seq, causal or encoder.")]
TrainOpt = Annotated[Optional[str], typer.Option("--train", help="Training file (.jsonl or .csv).")]
ValOpt = Annotated[Optional[str], typer.Option("--val", help="Validation file; 'none' splits it from --train.")]
TestOpt = Annotated[Optional[str], typer.Option("--test", help="Labelled evaluation file.")]
TextFieldOpt = Annotated[Optional[str], typer.Option("--text-field", help="Field/column holding the text.")]
LabelFieldOpt = Annotated[Optional[str], typer.Option("--label-field", help="Field/column holding the label.")]
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="Label set in prompt order, comma-separated.")]
MultiLabelOpt = Annotated[Optional[bool], typer.Option("--multi-label", help="Examples may carry several labels.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output-dir", help="Where outputs are written.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="Adapter directory (OUTPUT_DIR/final of a run).")]
AdaptersOpt = Annotated[Optional[list[Path]], typer.Option("--adapter", metavar="DIR", help="Adapter directory; repeat to compare.")]
ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="score (rank labels) or generate (free text).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Examples per batch.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: section.key=value (repeatable).")]
ThresholdOpt = Annotated[Optional[float], typer.Option(
    "--threshold", help="Multi-label score mode: predict labels with probability >= this (default: calibrated, else 0.5).")]
AllowEmptyOpt = Annotated[Optional[bool], typer.Option(
    "--allow-empty", help="Multi-label score mode: allow no label (default: always at least the most probable one).")]


def _config(config: Path | None, sets: list[str] | None, **flags) -> Config:
    """Defaults < --config file < --set < explicit flags."""
    overrides = parse_set_options(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


def _data_flags(model, family, train, val, test, text_field, label_field, labels, multi_label) -> dict:
    return {"model.name": model, "model.family": family, "data.train": train, "data.val": val,
            "data.test": test, "data.text_field": text_field, "data.label_field": label_field,
            "data.labels": labels, "data.multi_label": multi_label}


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars; our own bars show real progress


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ticket", dynamic_ncols=True, file=sys.stderr)


@app.command()
def inspect(
    config: ConfigOpt = None, model: ModelOpt = None, family: FamilyOpt = None, train: TrainOpt = None,
    val: ValOpt = None, text_field: TextFieldOpt = None, label_field: LabelFieldOpt = None,
    labels: LabelsOpt = None, multi_label: MultiLabelOpt = None, seed: SeedOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="Formatted prompt/target pairs to show.")] = 3,
    json_out: JsonOpt = False, sets: SetOpt = None,
):
    """Label counts, token-length percentiles, truncation and sample prompts for a dataset."""
    from .inspect_data import inspect_dataset, render

    cfg = _config(config, sets, **_data_flags(model, family, train, val, None, text_field, label_field, labels,
                                             multi_label), **{"train.seed": seed})
    validate(cfg)
    _quiet_libraries()
    report = inspect_dataset(cfg, n_examples=examples)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        render(report)


@app.command("train")
def train_cmd(
    config: ConfigOpt = None, model: ModelOpt = None, family: FamilyOpt = None, train: TrainOpt = None,
    val: ValOpt = None, text_field: TextFieldOpt = None, label_field: LabelFieldOpt = None,
    labels: LabelsOpt = None, multi_label: MultiLabelOpt = None, output_dir: OutputOpt = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    batch_size: BatchOpt = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha (scale = alpha/r).")] = None,
    seed: SeedOpt = None,
    save_steps: Annotated[Optional[int], typer.Option("--save-steps", help="Checkpoint every N steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --output-dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard checkpoints of an unfinished run.")] = False,
    json_out: JsonOpt = False, sets: SetOpt = None,
):
    """Train a LoRA adapter; the best one (by validation accuracy) goes to OUTPUT_DIR/final."""
    cfg = _config(config, sets, **_data_flags(model, family, train, val, None, text_field, label_field, labels,
                                             multi_label),
                  **{"train.output_dir": output_dir, "train.epochs": epochs, "train.max_steps": max_steps,
                     "train.batch_size": batch_size, "train.lr": lr, "lora.r": lora_r, "lora.alpha": lora_alpha,
                     "train.seed": seed, "train.save_steps": save_steps})
    validate(cfg, training=True)
    _quiet_libraries()
    from .train import train as run_train  # after validation: a bad flag is reported without loading torch

    result = run_train(cfg, resume=resume, overwrite=overwrite,
                       echo=(lambda *a, **k: print(*a, file=sys.stderr, **k)) if json_out else print)
    if json_out and int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per process
        print(json.dumps({"adapter": str(result.adapter_dir), "interrupted": result.interrupted,
                          "metrics": result.metrics}, indent=2))
    if result.interrupted:
        raise typer.Exit(130)


def _load_classifier(adapter: Path | None, cfg: Config, mode: str | None = None, base_override: str | None = None):
    """An adapter (its base from its metadata unless --model overrides it), or the base model alone."""
    from .predict import Classifier

    mode = mode or cfg.predict.mode
    decision = dict(threshold=cfg.predict.threshold, allow_empty=cfg.predict.allow_empty)
    if adapter is not None:
        return Classifier.from_pretrained(adapter, mode=mode, base_model=base_override,
                                          batch_size=cfg.predict.batch_size, merge=cfg.predict.merge,
                                          max_new_tokens=cfg.predict.max_new_tokens, **decision)
    return Classifier.from_pretrained(cfg.model.name, mode=mode, labels=cfg.data.labels, task=cfg.prompt.task,
                                      input_name=cfg.prompt.input_name, batch_size=cfg.predict.batch_size,
                                      max_new_tokens=cfg.predict.max_new_tokens, revision=cfg.model.revision,
                                      multi_label=cfg.data.multi_label, chat_template=cfg.prompt.chat_template,
                                      **decision)


def _read_inputs(text: str | None, input_path: Path | None, cfg: Config) -> list[str]:
    """Texts from the argument, a file (JSONL/CSV with --text-field, or plain lines) or stdin."""
    if text is not None and input_path is not None:
        raise LoratuneError("give either a TEXT argument or --input FILE, not both")
    if text is not None and text != "-":
        if not text.strip():
            raise LoratuneError("TEXT is empty: give the text to classify (or '-' to read lines from stdin)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise LoratuneError("TEXT is not valid text (undecodable bytes or a lone surrogate); pass UTF-8") from None
        return [text]
    if input_path is None:
        if sys.stdin.isatty() and text != "-":
            raise LoratuneError("nothing to classify: pass TEXT, --input FILE, or pipe lines on stdin")
        return [line.strip() for line in sys.stdin if line.strip()]
    from .data import read_texts

    return read_texts(input_path, cfg.data.text_field)


@app.command()
def predict(
    text: Annotated[Optional[str], typer.Argument(help="Text to classify ('-' reads lines from stdin).")] = None,
    input_path: Annotated[Optional[Path], typer.Option("--input", help="File of texts: .jsonl/.csv (--text-field) or plain lines.")] = None,
    adapter: AdapterOpt = None, config: ConfigOpt = None, model: ModelOpt = None, labels: LabelsOpt = None,
    text_field: TextFieldOpt = None, mode: ModeOpt = None, batch_size: BatchOpt = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Keep the K most likely labels (score mode; default: 3 in the table, all in --json).")] = None,
    json_out: JsonOpt = False, sets: SetOpt = None, multi_label: MultiLabelOpt = None,
    threshold: ThresholdOpt = None, allow_empty: AllowEmptyOpt = None,
):
    """Classify text with an adapter (or a base model prompted alone)."""
    cfg = _config(config, sets, **{"model.name": model, "data.labels": labels, "data.text_field": text_field,
                                   "predict.mode": mode, "predict.batch_size": batch_size,
                                   "data.multi_label": multi_label, "predict.threshold": threshold,
                                   "predict.allow_empty": allow_empty})
    validate(cfg)
    if top_k is not None and top_k < 1:
        raise LoratuneError("--top-k must be at least 1")
    if adapter is not None and labels is not None:
        raise LoratuneError("--labels cannot be combined with --adapter: an adapter classifies into the labels it "
                            "was trained on (its loratune.json); drop --labels")
    texts = _read_inputs(text, input_path, cfg)
    if not texts:
        raise LoratuneError("nothing to classify: the input is empty")
    _quiet_libraries()
    clf = _load_classifier(adapter, cfg, base_override=model)
    bar = _progress(len(texts), "predict") if len(texts) > clf.batch_size else None
    predictions = clf.predict(texts, progress=bar.update if bar else None)
    if bar:
        bar.close()
    if json_out:
        for t, p in zip(texts, predictions):
            scores = p.scores
            if scores is not None and top_k is not None and top_k < len(scores):
                scores = dict(sorted(scores.items(), key=lambda kv: -kv[1])[:top_k])
            row = {"text": t, "label": p.label, "scores": scores, "raw": p.raw}
            if p.labels is not None:
                row.update(labels=p.labels, unknown=p.unknown)
            print(json.dumps(row, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("text", "label", "top scores" if clf.mode == "score" else "raw output")
    for t, p in zip(texts, predictions):
        if p.scores is not None:
            best = sorted(p.scores.items(), key=lambda kv: -kv[1])[: top_k or 3]
            detail = ", ".join(f"{label} {prob:.3f}" for label, prob in best)
        else:
            detail = p.raw or ""
        table.add_row(t if len(t) <= 80 else t[:77] + "...", p.label, detail)
    Console().print(table)


def _eval_examples(cfg: Config, labels, multi_label: bool | None = None):
    from .data import load_eval_examples

    path = cfg.data.test or cfg.data.val
    if not path:
        raise LoratuneError("no evaluation data: pass --test FILE")
    return path, load_eval_examples(path, cfg.data, labels, multi_label)


def _modes(mode: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if mode is None or mode == "both":
        return default
    if mode not in ("score", "generate"):
        raise LoratuneError(f"--mode must be score, generate or both, got {mode!r}")
    return (mode,)


def _print_summary(report: dict, out_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    if report.get("multi_label"):
        return _print_multilabel_summary(report, out_dir)
    table = Table("model", "mode", "accuracy", "macro-F1", "weighted-F1", "invalid", "tickets/s",
                  title=f"{report['dataset']} ({report['n']} examples)")
    for r in report["results"]:
        table.add_row(r["model"], r["mode"], f"{100 * r['accuracy']:.1f}%", f"{100 * r['macro_f1']:.1f}%",
                      f"{100 * r['weighted_f1']:.1f}%", f"{100 * r['invalid_rate']:.1f}%", f"{r['tickets_per_s']:.1f}")
    console = Console()
    console.print(table)
    if out_dir is not None:
        console.print(f"report: {out_dir / 'report.md'} (also report.json and confusion_*.png)")


def _print_multilabel_summary(report: dict, out_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "mode", "micro-F1", "macro-F1", "subset acc.", "Hamming", "invalid", "tickets/s",
                  title=f"{report['dataset']} ({report['n']} examples, multi-label)")
    for r in report["results"]:
        table.add_row(r["model"], r["mode"] + (f" @{r['threshold']:.2f}" if "threshold" in r else ""),
                      f"{100 * r['micro_f1']:.1f}%", f"{100 * r['macro_f1']:.1f}%", f"{100 * r['subset_accuracy']:.1f}%",
                      f"{r['hamming_loss']:.3f}", f"{100 * r['invalid_rate']:.1f}%", f"{r['tickets_per_s']:.1f}")
    console = Console()
    console.print(table)
    if out_dir is not None:
        console.print(f"report: {out_dir / 'report.md'} (also report.json and confusion_*.png)")


def _run_eval(models: list[tuple[str, object]], examples, modes, dataset: str, labels) -> dict:
    from .evaluate import build_report
    from .evaluate import evaluate as run_evaluate
    from .predict import GENERATE_NOT_FOR_ENCODERS

    results = []
    for mode in modes:
        for name, clf in models:
            if mode == "generate" and clf.family == "encoder":
                continue  # a classification head has no text to generate; "both" means score only here
            bar = _progress(len(examples), f"{name} {mode}")
            results.append(run_evaluate(clf, examples, mode=mode, name=name, progress=bar.update))
            bar.close()
    if not results:
        raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)
    return build_report(results, examples, dataset, labels)


@app.command("evaluate")
def evaluate_cmd(
    adapter: AdapterOpt = None, config: ConfigOpt = None, model: ModelOpt = None, test: TestOpt = None,
    text_field: TextFieldOpt = None, label_field: LabelFieldOpt = None, labels: LabelsOpt = None,
    mode: ModeOpt = None, batch_size: BatchOpt = None, output_dir: OutputOpt = None, json_out: JsonOpt = False,
    sets: SetOpt = None, multi_label: MultiLabelOpt = None, threshold: ThresholdOpt = None,
    allow_empty: AllowEmptyOpt = None,
):
    """Metrics for one model (adapter, or base model prompted alone) on a labelled file."""
    from .evaluate import write_report

    cfg = _config(config, sets, **{"model.name": model, "data.test": test, "data.text_field": text_field,
                                   "data.label_field": label_field, "data.labels": labels,
                                   "predict.batch_size": batch_size, "data.multi_label": multi_label,
                                   "predict.threshold": threshold, "predict.allow_empty": allow_empty})
    validate(cfg)
    modes = _modes(mode, (cfg.predict.mode,))
    _quiet_libraries()
    clf = _load_classifier(adapter, cfg, modes[0], base_override=model)
    path, examples = _eval_examples(cfg, clf.labels, clf.multi_label)
    name = "adapter" if adapter else "base"
    report = _run_eval([(name, clf)], examples, modes, path, clf.labels)
    out = Path(output_dir or "outputs/evaluate")
    write_report(report, out)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report, out)


@app.command()
def compare(
    adapter: AdaptersOpt = None, config: ConfigOpt = None, model: ModelOpt = None, test: TestOpt = None,
    text_field: TextFieldOpt = None, label_field: LabelFieldOpt = None, mode: ModeOpt = None,
    batch_size: BatchOpt = None, output_dir: OutputOpt = None, json_out: JsonOpt = False, sets: SetOpt = None,
):
    """Base model prompted alone vs base + adapter, on the same prompts: metrics, report files, disagreements.

    With several --adapter options, all adapters (and each one's base, once per distinct base) go in one report.
    """
    adapters = adapter or [Path(load_config(config).train.output_dir) / "final"]
    cfg = _config(config, sets, **{"model.name": model, "data.test": test, "data.text_field": text_field,
                                   "data.label_field": label_field, "predict.batch_size": batch_size})
    validate(cfg)
    modes = _modes(mode, ("score", "generate"))
    _quiet_libraries()
    out_dir = Path(output_dir or "outputs/report")
    if len(adapters) == 1:
        report, out = run_compare(adapters[0], cfg, modes, out_dir, base_override=model)
    else:
        report, out = run_compare_many(adapters, cfg, modes, out_dir, base_override=model)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report, out)


def run_compare(adapter: Path, cfg: Config, modes, out: Path, base_override: str | None = None) -> tuple[dict, Path]:
    """Evaluate base alone and base + adapter on the same prompts, write the report, return (report, dir)."""
    from .evaluate import write_report

    tuned = _load_classifier(adapter, cfg, modes[0], base_override)
    meta = tuned.metadata
    base_name = base_override or meta["base_model"]
    base = _base_of(tuned, cfg, modes[0], base_override)
    path, examples = _eval_examples(cfg, tuned.labels, tuned.multi_label)
    report = _run_eval([("base", base), ("adapter", tuned)], examples, modes, path, tuned.labels)
    report["base_model"] = meta.get("base_model_requested", base_name)
    report["adapter"] = str(adapter)
    write_report(report, out)
    return report, out


def _base_of(tuned, cfg: Config, mode: str, base_override: str | None = None):
    """The adapter's base model prompted alone, reading prompts exactly as the adapter does."""
    from .predict import Classifier

    meta = tuned.metadata
    return Classifier.from_pretrained(base_override or meta["base_model"], mode=mode, labels=tuned.labels,
                                      task=tuned.task, input_name=tuned.input_name, batch_size=tuned.batch_size,
                                      max_new_tokens=cfg.predict.max_new_tokens, revision=meta.get("base_revision"),
                                      chat_template="on" if tuned.chat_template else "off",
                                      multi_label=tuned.multi_label, threshold=cfg.predict.threshold,
                                      allow_empty=cfg.predict.allow_empty)


def _short_name(path_or_id: str, taken: set[str], prefix: str = "") -> str:
    """A table-friendly unique name: the directory name (its parent's for OUTPUT_DIR/final), or the hub id."""
    path = Path(path_or_id)
    name = prefix + (path.parent.name if path.name == "final" and path.parent.name else (path.name or path_or_id))
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}-{i}", i + 1
    taken.add(unique)
    return unique


def run_compare_many(adapters: list[Path], cfg: Config, modes, out: Path,
                     base_override: str | None = None) -> tuple[dict, Path]:
    """Several adapters side by side on the same examples, each after its base model prompted alone (a base
    shared by several adapters is evaluated once). Writes the report; returns (report, dir)."""
    from .evaluate import write_report

    tuned = [_load_classifier(a, cfg, modes[0], base_override) for a in adapters]
    labels = tuned[0].labels
    for a, clf in zip(adapters, tuned):
        if clf.labels != labels:
            raise LoratuneError(f"adapter {a} was trained on labels {', '.join(clf.labels)} but {adapters[0]} on "
                                f"{', '.join(labels)}; compare needs one label set")
    taken: set[str] = set()
    models, bases, names = [], {}, {}
    for a, clf in zip(adapters, tuned):
        meta = clf.metadata
        base_name = base_override or meta["base_model"]
        key = (base_name, clf.family, clf.chat_template, clf.task, clf.input_name)
        if key not in bases:
            bases[key] = _short_name(meta.get("base_model_requested", base_name), taken, prefix="base ")
            models.append((bases[key], _base_of(clf, cfg, modes[0], base_override)))
        names[_short_name(str(a), taken)] = str(a)
        models.append((list(names)[-1], clf))
    if len({clf.multi_label for clf in tuned}) > 1:
        raise LoratuneError("compare needs adapters of one kind: all single-label or all multi-label")
    path, examples = _eval_examples(cfg, labels, tuned[0].multi_label)
    report = _run_eval(models, examples, modes, path, labels)
    report["adapters"] = names
    report["base_models"] = sorted({key[0] for key in bases})
    write_report(report, out)
    return report, out


@app.command()
def calibrate(
    adapter: AdapterOpt = None, config: ConfigOpt = None, model: ModelOpt = None, val: ValOpt = None,
    text_field: TextFieldOpt = None, label_field: LabelFieldOpt = None, batch_size: BatchOpt = None,
    allow_empty: AllowEmptyOpt = None, json_out: JsonOpt = False, sets: SetOpt = None,
):
    """Multi-label: pick the decision threshold that maximises micro-F1 on validation data; save it with the adapter."""
    from .data import load_eval_examples
    from .evaluate import calibrate as run_calibrate
    from .evaluate import write_threshold
    from .models import META_FILE

    if adapter is None:
        raise LoratuneError("calibrate needs --adapter DIR (an adapter trained on multi-label data)")
    if not (adapter / META_FILE).is_file():
        raise LoratuneError(f"{adapter} is not an adapter directory (no {META_FILE}); pass --adapter OUTPUT_DIR/final")
    cfg = _config(config, sets, **{"data.text_field": text_field, "data.label_field": label_field,
                                   "predict.batch_size": batch_size, "predict.allow_empty": allow_empty})
    validate(cfg)
    _quiet_libraries()
    clf = _load_classifier(adapter, cfg, "score", base_override=model)
    # Without --val: the validation file the adapter was trained with (recorded in its metadata).
    path = val or clf.metadata.get("config", {}).get("data", {}).get("val")
    if not path or path == "none":
        raise LoratuneError("no validation data recorded with the adapter: pass --val FILE")
    examples = load_eval_examples(path, cfg.data, clf.labels, clf.multi_label)
    bar = _progress(len(examples), "calibrate")
    found = run_calibrate(clf, examples, progress=bar.update)
    bar.close()
    meta_path = write_threshold(adapter, found, str(path))
    if json_out:
        print(json.dumps({**found, "data": str(path), "written": str(meta_path)}, indent=2))
        return
    print(f"threshold {found['threshold']:.2f}: micro-F1 {found['micro_f1']:.4f} on {path} ({found['n']} examples); "
          f"at 0.50: {found['micro_f1_at_default']:.4f}; was {found['previous_threshold']:.2f}")
    print(f"written to {meta_path} (override with --threshold)")


@app.command()
def demo(
    model: ModelOpt = None, config: ConfigOpt = None, output_dir: OutputOpt = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    sets: SetOpt = None,
):
    """The main job on the shipped data: inspect -> train -> compare -> sample predictions."""
    from .inspect_data import inspect_dataset, render
    from .train import train as run_train

    out_root = Path(output_dir or "outputs/demo")
    cfg = _config(config, sets, **{"model.name": model, "train.output_dir": str(out_root / "lora"),
                                   "train.epochs": epochs, "train.max_steps": max_steps})
    validate(cfg, training=True)
    _quiet_libraries()
    print("== 1/4 inspect the data")
    render(inspect_dataset(cfg, n_examples=1))
    print("\n== 2/4 train a LoRA adapter")
    result = run_train(cfg, overwrite=True)
    if result.interrupted:
        raise typer.Exit(130)
    print("\n== 3/4 compare the base model with base + adapter")
    report, report_dir = run_compare(result.adapter_dir, cfg, ("score", "generate"), out_root / "report")
    _print_summary(report, report_dir)
    print("\n== 4/4 sample predictions")
    from .predict import Classifier

    clf = Classifier.from_pretrained(result.adapter_dir)
    samples = ["I was charged twice for my subscription.", "The app crashes every time I open settings.",
               "Where is my parcel? Tracking hasn't moved in a week."]
    for text, p in zip(samples, clf.predict(samples)):
        print(f"  {p.label:<10} {p.scores[p.label]:.2f}  {text}")
    print(f"\nadapter: {result.adapter_dir}\nreport:  {report_dir / 'report.md'}")


@app.command()
def serve(
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", help="Adapter directory, or NAME=DIR; repeat to serve several adapters of one base model "
                          "(default: OUTPUT_DIR/final).")] = None,
    config: ConfigOpt = None, model: ModelOpt = None, mode: ModeOpt = None, batch_size: BatchOpt = None,
    host: Annotated[Optional[str], typer.Option(
        "--host", help="Interface to bind: 127.0.0.1 (default) stays local, 0.0.0.0 exposes the server.")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (default 8000; 0 picks a free one).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LORATUNE_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on all routes but /healthz and /readyz "
             "(prefer the env var: flags show in ps).")] = None,
    max_chars: Annotated[Optional[int], typer.Option("--max-chars", help="Longest text accepted, in characters.")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Most texts accepted in one request.")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(
        "--max-wait-ms", help="How long a request waits for others to share its forward pass.")] = None,
    sets: SetOpt = None,
):
    """Serve adapters over HTTP (FastAPI): POST /v1/classify, GET /v1/labels, /healthz, /readyz, docs at /docs."""
    from .serve import parse_adapter_specs, run

    cfg = _config(config, sets, **{"model.name": model, "predict.mode": mode, "predict.batch_size": batch_size,
                                   "serve.host": host, "serve.port": port, "serve.max_chars": max_chars,
                                   "serve.max_batch": max_batch, "serve.max_wait_ms": max_wait_ms})
    validate(cfg)
    adapters = parse_adapter_specs(adapter or [str(Path(cfg.train.output_dir) / "final")])
    _quiet_libraries()
    run(adapters, cfg, base_model=model, api_key=api_key or None)
def _benchmarks_run():
    """benchmarks/run.py of this source checkout (the benchmarks are not part of the installed package)."""
    import importlib

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "run.py").is_file():
        raise LoratuneError("loratune bench runs benchmarks/run.py from a source checkout; none is beside this "
                            f"installation ({root}): clone the repository and pip install -e . there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.run")


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: fewer tickets and sizes (< 2 min on 2 CPU cores).")] = False,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "--out",
                                                      help="Results directory (default: benchmarks/results).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or mps (default: the best available).")] = None,
    json_out: JsonOpt = False,
):
    """Speed and memory on flan-t5-small's shape (random weights, offline): training and prediction, with targets."""
    run = _benchmarks_run()
    _quiet_libraries()
    results = run.run(quick=quick, out=output_dir, device=device, echo=lambda *a: print(*a, file=sys.stderr, flush=True))
    if json_out:
        print(json.dumps(results, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("target", "value", "threshold", "met", title=f"benchmark targets ({results['mode']} run)")
    for t in results["targets"]:
        table.add_row(t["target"], f"{t['value']} {t['unit']}", str(t["threshold"]), "met" if t["met"] else "NOT MET")
    Console().print(table)


def openmp_defaults() -> None:
    """Bound how long idle OpenMP threads spin before sleeping, unless the user chose; only effective before torch loads.

    GNU OpenMP (PyTorch's CPU threading) spins ~300k rounds between parallel ops. When other processes share
    the cores, a spinning thread burns its time slice waiting for a descheduled sibling: on a shared 2-core
    machine batched scoring ran 2-3x and per-ticket generation up to 15x slower. Sleeping at once
    (OMP_WAIT_POLICY=PASSIVE) cured that but cost a quiet machine ~35% on small ops; 10k rounds kept the quiet
    speed and most of the cure (A/B in docs/BENCHMARKS.md).
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"


def main() -> None:
    """Entry point: user errors print one line and exit 2; usage errors exit 2; anything else keeps its traceback."""
    openmp_defaults()
    try:
        app()  # standalone mode: usage errors and --help are handled by typer and exit 2 / 0
    except LoratuneError as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _close_progress_bars() -> None:
    """End a progress bar cut off by an error, so the error gets a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


if __name__ == "__main__":
    main()
