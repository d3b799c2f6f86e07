"""CLI commands that use a trained adapter (or a base model alone): predict, evaluate, compare, calibrate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_options as opt
from .config import Config, load_config, validate
from .console import print_calibration, print_predictions, print_summary, progress, quiet_libraries
from .errors import LoratuneError


def predict(
    text: Annotated[Optional[str], typer.Argument(help="Text to classify ('-' reads lines from stdin).")] = None,
    input_path: Annotated[Optional[Path], typer.Option("--input", help="File of texts: .jsonl/.csv (--text-field) or plain lines.")] = None,
    adapter: opt.AdapterOpt = None,
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    labels: opt.LabelsOpt = None,
    text_field: opt.TextFieldOpt = None,
    mode: opt.ModeOpt = None,
    batch_size: opt.BatchOpt = None,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", help="Keep the K most likely labels (score mode; default: 3 in the table, all in --json).")
    ] = None,
    json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None,
    multi_label: opt.MultiLabelOpt = None,
    threshold: opt.ThresholdOpt = None,
    allow_empty: opt.AllowEmptyOpt = None,
    id_field: opt.IdFieldOpt = None,
    task: opt.TaskOpt = None,
    input_name: opt.InputNameOpt = None,
    min_confidence: opt.MinConfidenceOpt = None,
    fallback_label: opt.FallbackOpt = None,
    quantize: opt.QuantizeOpt = None,
):
    """Classify text with an adapter (or a base model prompted alone, with --labels)."""
    cfg = opt.build_config(
        config,
        sets,
        **{
            "model.name": model,
            "data.labels": labels,
            "data.text_field": text_field,
            "predict.mode": mode,
            "predict.batch_size": batch_size,
            "data.multi_label": multi_label,
            "predict.threshold": threshold,
            "predict.allow_empty": allow_empty,
            "data.id_field": id_field,
            "prompt.task": task,
            "prompt.input_name": input_name,
            "predict.min_confidence": min_confidence,
            "predict.fallback_label": fallback_label,
            "predict.quantize": quantize,
        },
    )
    validate(cfg)
    if top_k is not None and top_k < 1:
        raise LoratuneError("--top-k must be at least 1")
    if text is not None and text != "-" and not text.strip():
        raise LoratuneError("TEXT is empty: give the text to classify (or '-' to read lines from stdin)")
    quiet_libraries()
    clf = opt.load_classifier(adapter, cfg, base_override=model)
    from .data import read_inputs
    from .fields import settle_for_model

    settle_for_model(cfg, input_path, labelled=False)
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
            row = ({"id": ids[i]} if ids is not None else {}) | {
                "text": t,
                "label": p.label,
                "scores": scores,
                "raw": p.raw,
                "cut_tokens": p.cut,
            }
            if p.labels is not None:
                row.update(labels=p.labels, unknown=p.unknown)
            print(json.dumps(row, ensure_ascii=False))
        return
    print_predictions(texts, predictions, clf.mode, top_k)


def evaluate(
    adapter: opt.AdapterOpt = None,
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    test: opt.TestOpt = None,
    text_field: opt.TextFieldOpt = None,
    label_field: opt.LabelFieldOpt = None,
    labels: opt.LabelsOpt = None,
    mode: opt.ModeOpt = None,
    batch_size: opt.BatchOpt = None,
    output_dir: opt.EvalOutputOpt = None,
    json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None,
    multi_label: opt.MultiLabelOpt = None,
    threshold: opt.ThresholdOpt = None,
    allow_empty: opt.AllowEmptyOpt = None,
    task: opt.TaskOpt = None,
    input_name: opt.InputNameOpt = None,
    min_confidence: opt.MinConfidenceOpt = None,
    fallback_label: opt.FallbackOpt = None,
    quantize: opt.QuantizeOpt = None,
):
    """Metrics for one model (adapter, or base model prompted alone) on a labelled file.

    With --quantize int8 the fp32 model and its int8 twin are both evaluated, and their agreement reported."""
    from .compare import eval_examples, fp32_for_int8, run_eval

    cfg = opt.build_config(
        config,
        sets,
        **{
            "model.name": model,
            "data.test": test,
            "data.text_field": text_field,
            "data.label_field": label_field,
            "data.labels": labels,
            "predict.batch_size": batch_size,
            "data.multi_label": multi_label,
            "predict.threshold": threshold,
            "predict.allow_empty": allow_empty,
            "prompt.task": task,
            "prompt.input_name": input_name,
            "predict.min_confidence": min_confidence,
            "predict.fallback_label": fallback_label,
            "predict.quantize": quantize,
        },
    )
    validate(cfg)
    modes = opt.parse_modes(mode, (cfg.predict.mode,))
    quiet_libraries()
    if adapter is None and not cfg.data.labels:
        cfg.data.labels = _labels_of(cfg)  # a base model is asked about the labels the test data has
    precision = cfg.predict.quantize
    cfg, device = fp32_for_int8(cfg)
    clf = opt.load_classifier(adapter, cfg, modes[0], base_override=model, device=device)
    path, examples = eval_examples(cfg, clf)
    name = "adapter" if adapter else "base"
    report = run_eval([(name, clf)], examples, modes, path, clf.labels, progress, int8=(name,) if device else (), precision=precision)
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
    from .fields import settle_for_model

    settle_for_model(cfg, path)
    examples = read_examples(path, cfg.data.text_field, cfg.data.label_field, bool(cfg.data.multi_label), cfg.data.label_delimiter)
    return resolve_labels(None, examples)


def _write(report: dict, out_dir) -> Path:
    from .evaluate import write_report

    return write_report(report, Path(out_dir))


def compare(
    adapter: opt.AdaptersOpt = None,
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    test: opt.TestOpt = None,
    text_field: opt.TextFieldOpt = None,
    label_field: opt.LabelFieldOpt = None,
    mode: Annotated[
        Optional[str], typer.Option("--mode", help="score (rank labels), generate (free text) or both.", show_default="both")
    ] = None,
    batch_size: opt.BatchOpt = None,
    output_dir: opt.CompareOutputOpt = None,
    json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None,
    min_confidence: opt.MinConfidenceOpt = None,
    fallback_label: opt.FallbackOpt = None,
    quantize: opt.QuantizeOpt = None,
    baseline: Annotated[
        str,
        typer.Option(
            "--baseline",
            help="auto | embeddings | none: a frozen-embedding + logistic-regression row fit on the "
            "adapter's training data (auto: when an embedding model is installed).",
        ),
    ] = "auto",
):
    """Base model prompted alone vs base + adapter, on the same prompts: metrics, report files, disagreements.

    With several --adapter options, all adapters (and each one's base, once per distinct base) go in one report.
    """
    from .compare import compare as run_compare

    adapters = adapter or [Path(load_config(config).train.output_dir) / "final"]
    cfg = opt.build_config(
        config,
        sets,
        **{
            "model.name": model,
            "data.test": test,
            "data.text_field": text_field,
            "data.label_field": label_field,
            "predict.batch_size": batch_size,
            "predict.min_confidence": min_confidence,
            "predict.fallback_label": fallback_label,
            "predict.quantize": quantize,
        },
    )
    validate(cfg)
    modes = opt.parse_modes(mode, ("score", "generate"))
    quiet_libraries()
    out_dir = Path(output_dir or "outputs/report")
    if baseline not in ("auto", "embeddings", "none"):
        raise LoratuneError(f"--baseline must be auto, embeddings or none, got {baseline!r}")
    report = run_compare(adapters, cfg, modes=modes, out_dir=out_dir, base_override=model, progress=progress, baseline=baseline)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        print_summary(report, out_dir)


def calibrate(
    adapter: opt.AdapterOpt = None,
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    val: opt.ValOpt = None,
    text_field: opt.TextFieldOpt = None,
    label_field: opt.LabelFieldOpt = None,
    batch_size: opt.BatchOpt = None,
    allow_empty: opt.AllowEmptyOpt = None,
    json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None,
    fallback_label: opt.FallbackOpt = None,
    target_in_scope: Annotated[
        Optional[float], typer.Option("--target-in-scope", help="Single-label: the in-scope accuracy to keep (default: best macro-F1).")
    ] = None,
):
    """Tune decisions on validation data and save them with the adapter.

    Multi-label: the threshold that maximises micro-F1. Single-label with --fallback-label (e.g. oos): the
    confidence below which a prediction abstains, for the best macro-F1 or a target in-scope accuracy.
    """
    from .adapter import META_FILE
    from .calibrate import calibrate as run_calibrate
    from .calibrate import split_val_of, write_threshold
    from .data import load_eval_examples
    from .fields import settle_for_model

    if adapter is None:
        raise LoratuneError("calibrate needs --adapter DIR (an adapter trained on multi-label data)")
    if not (adapter / META_FILE).is_file():
        raise LoratuneError(f"{adapter} is not an adapter directory (no {META_FILE}); pass --adapter OUTPUT_DIR/final")
    cfg = opt.build_config(
        config,
        sets,
        **{
            "data.text_field": text_field,
            "data.label_field": label_field,
            "predict.batch_size": batch_size,
            "predict.allow_empty": allow_empty,
        },
    )
    validate(cfg)
    quiet_libraries()
    clf = opt.load_classifier(adapter, cfg, "score", base_override=model)
    # Without --val: the validation file the adapter was trained with (recorded in its metadata).
    recorded = clf.meta.config.get("data", {}) if isinstance(clf.meta.config.get("data"), dict) else {}
    path = val or recorded.get("val")
    if not path or path == "none":  # split from train: the same seeded split of the same (unchanged) file
        path, examples = split_val_of(clf, cfg)
    else:
        settle_for_model(cfg, path)
        examples = load_eval_examples(path, cfg.data, clf.labels, clf.multi_label)
    if not clf.multi_label:
        return _calibrate_abstain(clf, adapter, examples, path, fallback_label or clf.meta.fallback_label, target_in_scope, json_out)
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
