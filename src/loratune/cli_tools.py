"""CLI commands beside the main flow: ``serve`` (HTTP), ``export`` (merged model / GGUF), ``bench`` (speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_options as opt
from .config import validate
from .console import print_targets, quiet_libraries
from .errors import LoratuneError


def serve(
    adapter: Annotated[
        Optional[list[str]],
        typer.Option(
            "--adapter",
            help="Adapter directory, or NAME=DIR; repeat to serve several adapters of one base model (default: OUTPUT_DIR/final).",
        ),
    ] = None,
    config: opt.ConfigOpt = None,
    model: opt.ModelOpt = None,
    mode: opt.ModeOpt = None,
    batch_size: opt.BatchOpt = None,
    host: Annotated[
        Optional[str],
        typer.Option(
            "--host", help="Interface to bind: 127.0.0.1 stays local, 0.0.0.0 exposes the server.", show_default=opt.default("serve.host")
        ),
    ] = None,
    port: Annotated[
        Optional[int], typer.Option("--port", help="Port (0 picks a free one).", show_default=opt.default("serve.port"))
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="LORATUNE_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on all routes but /healthz and /readyz (prefer the env var: flags show in ps).",
        ),
    ] = None,
    max_chars: Annotated[
        Optional[int],
        typer.Option(
            "--max-chars", help="Longest text accepted, in characters (longer: 422).", show_default=opt.default("serve.max_chars")
        ),
    ] = None,
    max_batch: Annotated[
        Optional[int],
        typer.Option("--max-batch", help="Most texts accepted in one request (more: 422).", show_default=opt.default("serve.max_batch")),
    ] = None,
    max_wait_ms: Annotated[
        Optional[float],
        typer.Option(
            "--max-wait-ms",
            help="How long a request waits for others to share its forward pass.",
            show_default=opt.default("serve.max_wait_ms"),
        ),
    ] = None,
    max_queue: Annotated[
        Optional[int],
        typer.Option(
            "--max-queue",
            help="Most texts waiting for a forward pass; beyond it: 503 with Retry-After.",
            show_default=opt.default("serve.max_queue"),
        ),
    ] = None,
    quantize: opt.QuantizeOpt = None,
    sets: opt.SetOpt = None,
):
    """Serve adapters over HTTP (FastAPI): POST /v1/classify, GET /v1/labels, /healthz, /readyz, docs at /docs."""
    from .serve import parse_adapter_specs, run

    cfg = opt.build_config(
        config,
        sets,
        **{
            "model.name": model,
            "predict.mode": mode,
            "predict.batch_size": batch_size,
            "predict.quantize": quantize,
            "serve.host": host,
            "serve.port": port,
            "serve.max_chars": max_chars,
            "serve.max_batch": max_batch,
            "serve.max_wait_ms": max_wait_ms,
            "serve.max_queue": max_queue,
        },
    )
    validate(cfg)
    adapters = parse_adapter_specs(adapter or [str(Path(cfg.train.output_dir) / "final")])
    quiet_libraries()
    run(adapters, cfg, base_model=model, api_key=api_key or None)


# Tools beside the main flow, declared in cli_tools.py.
def export(
    adapter: opt.AdapterOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="merged (HF model directory) or gguf (Llama bases: llama.cpp, Ollama).")] = "merged",
    quant: Annotated[str, typer.Option("--quant", help="GGUF weights: f16 or q8_0.")] = "f16",
    output: Annotated[Optional[Path], typer.Option("--output", help="Output directory (merged) or .gguf file (gguf).")] = None,
):
    """Merge an adapter into its base model and save it as an HF directory or a GGUF file."""
    from .export import export_gguf, export_merged

    if adapter is None or output is None:
        raise LoratuneError("export needs --adapter DIR and --output PATH")
    if fmt not in ("merged", "gguf"):
        raise LoratuneError(f"--format must be merged or gguf, got {fmt!r}")
    quiet_libraries()
    out = export_merged(adapter, output) if fmt == "merged" else export_gguf(adapter, output, quant)
    print(f"wrote {out}")


def _benchmarks_run():
    """benchmarks/run.py of this source checkout (the benchmarks are not part of the installed package)."""
    return _benchmarks_module("run")


def _benchmarks_module(module: str):
    """``benchmarks.<module>`` of this source checkout."""
    import importlib

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "run.py").is_file():
        raise LoratuneError(
            "loratune bench runs benchmarks/run.py from a source checkout; none is beside this "
            f"installation ({root}): clone the repository and pip install -e . there"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{module}")


def bench(
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Smoke run: fewer tickets and sizes, no OpenMP A/B (about 50 s of CPU time).", metavar=opt.NO_VALUE),
    ] = False,
    output_dir: Annotated[
        Optional[str], typer.Option("--output-dir", "--out", help="Results directory (default: benchmarks/results).")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or mps (default: the best available).")] = None,
    deployer: Annotated[
        bool,
        typer.Option(
            "--deployer",
            help="loratune score (fp32, int8) against CTranslate2 on one model (pip install -e '.[bench]').",
            metavar=opt.NO_VALUE,
        ),
    ] = False,
    json_out: opt.JsonOpt = False,
):
    """Speed and memory on flan-t5-small's shape (random weights, offline): training and prediction, with targets.

    Exit 1, with one line naming them, when a target is not met. --deployer measures loratune against
    CTranslate2 instead and reports its targets without failing on them (a third-party engine on a shared machine).
    """
    run = _benchmarks_module("deployer") if deployer else _benchmarks_run()
    quiet_libraries()
    if deployer:
        if device not in (None, "cpu"):
            raise LoratuneError("--deployer runs on the CPU (int8 and CTranslate2's CPU engine): drop --device")
        results = run.run(quick=quick, out=output_dir, echo=lambda *a: print(*a, file=sys.stderr, flush=True))
    else:
        results = run.run(quick=quick, out=output_dir, device=device, echo=lambda *a: print(*a, file=sys.stderr, flush=True))
    if json_out:
        print(json.dumps(results, indent=2))
    else:
        print_targets(results)
    if not deployer and run.missed_targets(results):  # a performance gate: a missed target fails the command (exit 1), in one line
        print(run.missed_line(results), file=sys.stderr)
        raise typer.Exit(1)
