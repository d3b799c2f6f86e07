"""CLI commands beside the main flow: ``export`` (merged model / GGUF) and ``bench`` (speed and memory)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_options as opt
from .console import print_targets, quiet_libraries
from .errors import LoratuneError


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
    import importlib

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "run.py").is_file():
        raise LoratuneError("loratune bench runs benchmarks/run.py from a source checkout; none is beside this "
                            f"installation ({root}): clone the repository and pip install -e . there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.run")


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run: fewer tickets and sizes (< 2 min on 2 CPU cores).")] = False,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "--out",
                                                      help="Results directory (default: benchmarks/results).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or mps (default: the best available).")] = None,
    json_out: opt.JsonOpt = False,
):
    """Speed and memory on flan-t5-small's shape (random weights, offline): training and prediction, with targets."""
    run = _benchmarks_run()
    quiet_libraries()
    results = run.run(quick=quick, out=output_dir, device=device, echo=lambda *a: print(*a, file=sys.stderr, flush=True))
    if json_out:
        print(json.dumps(results, indent=2))
        return
    print_targets(results)
