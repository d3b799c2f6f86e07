"""A deployer's engine beside loratune: CTranslate2 on the same T5 model, same tickets, same threads.

    python -m benchmarks.deployer [--quick]         # -> benchmarks/results/deployer_{quick,full}.json/.md
    loratune bench --deployer [--quick]             # the same through the CLI
    pip install -e '.[bench]'                       # CTranslate2 (without it the CTranslate2 rows are skipped)

The model is ``benchmarks.run``'s: flan-t5-small's exact shape, random weights, a LoRA adapter merged in. It is
saved as a transformers directory and converted with CTranslate2's own transformers converter, once with
``quantization="int8"`` and once with ``"float32"``. Rows, all in this one process, interleaved, ``repeats``
times (tables quote the median), 32 tickets per batch, every engine on the same number of threads:

* loratune score mode (``Classifier`` with ``--quantize none`` / ``int8``: ``quantize.quantize_int8``), which
  returns a calibrated probability for every label; and the same scorer on the model cast to bfloat16 (an
  evaluation of CPU bf16, not a product option: see docs/BENCHMARKS.md);
* the encoder alone (fp32 / int8): the floor any T5 scorer pays;
* CTranslate2 ``translate_batch``, greedy, int8 / float32, capped at the label's tokens + EOS (what a tuned
  adapter emits; random weights never stop earlier) and at 4 tokens (the issue's setting). Greedy text is the
  top label only, with no probabilities;
* CTranslate2 ``score_batch`` of every (prompt, label) pair, int8 / float32, on a stratified subset (it runs
  the encoder once per pair), with top-1 and full-ranking agreement against loratune's scores.

Conversion note: CTranslate2 4.8.5's T5 converter reads ``config.tie_word_embeddings`` to decide whether to
scale the decoder output by d_model^-0.5. transformers 5 always sets that flag on T5 configs and keeps the old
meaning in ``scale_decoder_outputs``, so the stock conversion of an untied flan-t5 scales its logits wrongly
(scores off by up to ~200 nats here, top-1 agreement 84%). :class:`_Converter` restores the old meaning before
conversion; the float32 engine then matches loratune's scores to fp32 rounding (see ``agreement``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.run import DEFAULT_OUT, LABELS, agreement, build_model, encoder_only, machine_info, stratified, synth_tickets, with_adapter
from loratune.atomic import write_text
from loratune.families.seq2seq import label_token_ids, seq2seq_label_logprobs
from loratune.quantize import quantize_int8

BATCH = 32
ISSUE_GREEDY_TOKENS = 4
"""The issue's CTranslate2 greedy rows decoded 4 tokens."""
MISSING = "ctranslate2 is not installed (pip install -e '.[bench]'): its rows are skipped"


@dataclass
class Settings:
    quick: bool
    n_tickets: int
    n_pairs: int
    """Tickets for score_batch (every (prompt, label) pair re-runs the encoder: ~10x slower per ticket)."""
    repeats: int
    seed: int = 0

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        return cls(quick, 32, 8, 1) if quick else cls(False, 256, 64, 3)


@dataclass
class Row:
    name: str
    engine: str
    precision: str
    run: object
    prompts: list[str]
    notes: str = ""
    times: list[float] = field(default_factory=list)
    outputs: object = None


def _converter():
    from ctranslate2.converters import TransformersConverter

    class _Converter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if hasattr(model.config, "scale_decoder_outputs"):  # see the module docstring
                model.config.tie_word_embeddings = model.config.scale_decoder_outputs
            return model

    return _Converter


def convert(merged, tokenizer, where: Path) -> dict[str, Path]:
    """The merged model saved as a transformers directory, converted by CTranslate2: {"int8": dir, "float32": dir}."""
    hf = where / "hf"
    merged.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    out = {}
    for quantization in ("int8", "float32"):
        out[quantization] = where / f"ct2-{quantization}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _converter()(str(hf)).convert(str(out[quantization]), quantization=quantization)
    return out


def ct2_rows(dirs: dict[str, Path], tokenizer, prompts, pair_prompts, label_len: int, threads: int) -> list[Row]:
    import ctranslate2

    label_tokens = [tokenizer.convert_ids_to_tokens(ids[:-1]) for ids in label_token_ids(tokenizer, LABELS)]  # CT2 adds EOS

    def tokens(texts):
        return [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(list(texts))["input_ids"]]

    rows = []
    for precision in ("int8", "float32"):
        engine = ctranslate2.Translator(str(dirs[precision]), device="cpu", compute_type=precision, intra_threads=threads, inter_threads=1)

        def greedy(texts, engine=engine, steps=label_len):
            return engine.translate_batch(tokens(texts), max_batch_size=BATCH, beam_size=1, max_decoding_length=steps)

        def greedy4(texts, engine=engine):
            return greedy(texts, engine, ISSUE_GREEDY_TOKENS)

        def score(texts, engine=engine):
            src = [s for s in tokens(texts) for _ in LABELS]
            tgt = [t for _ in texts for t in label_tokens]
            results = engine.score_batch(src, tgt, max_batch_size=BATCH * len(LABELS))
            return np.array([sum(r.log_probs) for r in results]).reshape(len(texts), len(LABELS))

        rows += [
            Row(f"CTranslate2 greedy, {label_len} tokens", "ctranslate2", precision, greedy, prompts, "label + EOS (tuned)"),
            Row(f"CTranslate2 greedy, {ISSUE_GREEDY_TOKENS} tokens", "ctranslate2", precision, greedy4, prompts, "the issue's setting"),
            Row("CTranslate2 score_batch, every (prompt, label)", "ctranslate2", precision, score, pair_prompts, "ranks labels"),
        ]
    return rows


def loratune_rows(merged, int8, bf16, tokenizer, prompts) -> list[Row]:
    def score(model):
        return lambda texts: seq2seq_label_logprobs(model, tokenizer, texts, LABELS, batch_size=BATCH)

    return [
        Row("loratune score", "loratune", "fp32", score(merged), prompts, "a probability for every label"),
        Row("loratune score", "loratune", "int8", score(int8), prompts, "--quantize int8"),
        Row("loratune score", "loratune", "bf16", score(bf16), prompts, "model.to(bfloat16), not a target"),
        Row("encoder only (floor)", "loratune", "fp32", encoder_only(merged, tokenizer, BATCH), prompts),
        Row("encoder only (floor)", "loratune", "int8", encoder_only(int8, tokenizer, BATCH), prompts),
    ]


def interleaved(rows: list[Row]) -> list[Row]:
    """Each target's pair adjacent (loratune fp32 then CTranslate2 float32 4-token greedy, the same for int8),
    then the other rows alternating between the engines."""
    find = {(r.name, r.precision): r for r in rows}
    first = [
        find.get(key)
        for key in (
            ("loratune score", "fp32"),
            (f"CTranslate2 greedy, {ISSUE_GREEDY_TOKENS} tokens", "float32"),
            ("loratune score", "int8"),
            (f"CTranslate2 greedy, {ISSUE_GREEDY_TOKENS} tokens", "int8"),
        )
    ]
    first = [r for r in first if r is not None]
    rest = [r for r in rows if r not in first]
    ours, theirs = [r for r in rest if r.engine == "loratune"], [r for r in rest if r.engine != "loratune"]
    return first + [r for pair in itertools.zip_longest(ours, theirs) for r in pair if r is not None]


def measure(rows: list[Row], repeats: int, echo) -> None:
    for row in rows:  # warm-up: thread pools, allocators, kernel selection
        row.run(row.prompts[:BATCH])
    for rep in range(repeats):
        for row in rows:
            t0 = time.perf_counter()
            out = row.run(row.prompts)
            row.times.append(time.perf_counter() - t0)
            if rep == 0:
                row.outputs = out
            echo(f"  [{rep + 1}/{repeats}] {row.name:<48} {row.precision:<7}: {len(row.prompts) / row.times[-1]:7.2f} tickets/s")


def run(quick: bool = False, out: str | Path | None = None, echo=print) -> dict:
    """Run the comparison, write ``deployer_{quick,full}.json`` and ``.md`` into ``out``; return the results."""
    started = time.perf_counter()
    s = Settings.for_mode(quick)
    out = Path(out) if out else DEFAULT_OUT
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dev = torch.device("cpu")
    info = machine_info(dev)
    threads = torch.get_num_threads()
    stock, tokenizer = build_model(dev, s.seed)
    merged = with_adapter(stock, s.seed)[1]
    int8 = quantize_int8(copy.deepcopy(merged))
    bf16 = copy.deepcopy(merged).to(torch.bfloat16)
    prompts = synth_tickets(tokenizer, s.n_tickets, s.seed)
    lengths = [len(x) for x in tokenizer(prompts)["input_ids"]]
    pair_prompts = stratified(prompts, lengths, s.n_pairs)[0]
    label_len = max(len(x) for x in label_token_ids(tokenizer, LABELS))
    echo(f"deployer benchmark ({'quick' if quick else 'full'}): {info['cpu']}, {threads} threads, torch {info['torch']}")
    rows = loratune_rows(merged, int8, bf16, tokenizer, prompts)
    skipped, versions = None, {}
    try:
        import ctranslate2
    except ImportError:
        skipped = MISSING
        echo(MISSING)
    with tempfile.TemporaryDirectory() as tmp:
        if skipped is None:
            versions["ctranslate2"] = ctranslate2.__version__
            # bfloat16 / int8_bfloat16 rows need CPU support in CTranslate2's build; listed so the report says why not.
            versions["ctranslate2_cpu_compute_types"] = sorted(ctranslate2.get_supported_compute_types("cpu"))
            rows += ct2_rows(convert(merged, tokenizer, Path(tmp)), tokenizer, prompts, pair_prompts, label_len, threads)
        # Interleave the engines so drift and load hit them alike; the rows a target compares run back to back.
        measure(interleaved(rows), s.repeats, echo)
    results = {
        "mode": "quick" if quick else "full",
        "command": "python -m benchmarks.deployer" + (" --quick" if quick else ""),
        "machine": info | versions,
        "settings": s.__dict__ | {"batch": BATCH, "threads": threads, "label_tokens_with_eos": label_len},
        "model": "flan-t5-small (fixtures.FLAN_T5_SMALL), random weights, LoRA r=8 on q,v merged",
        "prompt_tokens_mean": round(float(np.mean(lengths)), 1),
        "skipped": skipped,
        "rows": [_summary(r) for r in rows],
        "agreement": _agreement(rows, prompts, pair_prompts),
    }
    results["targets"] = _targets(results["rows"])
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - started, 1)
    stem = f"deployer_{results['mode']}"
    write_text(out / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    write_text(out / f"{stem}.md", markdown(results))
    echo(f"done in {results['wall_s']:.0f} s: {out / stem}.md and .json")
    return results


def _summary(r: Row) -> dict:
    rates = [len(r.prompts) / t for t in r.times]
    return {
        "name": r.name,
        "engine": r.engine,
        "precision": r.precision,
        "n": len(r.prompts),
        "tickets_per_s": round(statistics.median(rates), 3),
        "runs_tickets_per_s": [round(x, 3) for x in rates],
        "notes": r.notes,
    }


def _agreement(rows: list[Row], prompts, pair_prompts) -> dict:
    """CTranslate2 score_batch against loratune's scores on the same tickets (top-1, full ranking, max |diff|)."""
    find = {(r.name, r.precision): r for r in rows}
    index = [prompts.index(p) for p in pair_prompts]
    out = {}
    for precision in ("int8", "bf16"):
        key = f"{precision} vs fp32 (loratune)"
        out[key] = agreement(find["loratune score", precision].outputs, find["loratune score", "fp32"].outputs) | {"n": len(prompts)}
    for precision, against in (("float32", "fp32"), ("int8", "fp32"), ("int8", "int8")):
        ct2 = find.get(("CTranslate2 score_batch, every (prompt, label)", precision))
        if ct2 is not None:
            key = f"CTranslate2 {precision} vs loratune {against}"
            out[key] = agreement(ct2.outputs, find["loratune score", against].outputs[index]) | {"n": len(index)}
    return out


def _targets(rows: list[dict]) -> list[dict]:
    rate = {(r["name"], r["precision"]): r["tickets_per_s"] for r in rows}
    checks = [
        ("T5 score >= 75% of the encoder-only floor (fp32)", ("loratune score", "fp32"), ("encoder only (floor)", "fp32"), 0.75),
        ("T5 score >= 75% of the encoder-only floor (int8)", ("loratune score", "int8"), ("encoder only (floor)", "int8"), 0.75),
    ]
    for tokens in sorted({r["name"] for r in rows if r["name"].startswith("CTranslate2 greedy")}, key=lambda n: -int(n.split()[-2])):
        checks += [
            (f"loratune int8 score >= {tokens} int8", ("loratune score", "int8"), (tokens, "int8"), 1.0),
            (f"loratune fp32 score >= {tokens} float32", ("loratune score", "fp32"), (tokens, "float32"), 1.0),
        ]
    out = []
    for name, a, b, threshold in checks:
        if a in rate and b in rate:
            ratio = rate[a] / rate[b]
            out.append({"target": name, "value": round(ratio, 3), "threshold": threshold, "unit": "x", "met": ratio >= threshold})
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# loratune vs a deployer's engine ({r['mode']})",
        "",
        f"`{r['command']}`, {m['date']}, {r['wall_s']:.0f} s. {m['cpu']} ({m['cpu_flags']}), {r['settings']['threads']} threads "
        f"for every engine; torch {m['torch']}, CTranslate2 {m.get('ctranslate2', '-')} (CPU compute types here: "
        f"{', '.join(m.get('ctranslate2_cpu_compute_types', ['-']))}); load average at start / end "
        f"{m['load_average_at_start']} / {m['load_average_at_end']}.",
        "",
        f"Model: {r['model']}. {r['settings']['n_tickets']} tickets (mean {r['prompt_tokens_mean']} prompt tokens), "
        f"batch {r['settings']['batch']}, {len(LABELS)} labels ({r['settings']['label_tokens_with_eos']} tokens with EOS); "
        f"median of {r['settings']['repeats']} interleaved runs.",
        "",
    ]
    if r["skipped"]:
        lines += [f"**{r['skipped']}.**", ""]
    lines += ["| target | value | threshold | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {t['value']}x | {t['threshold']}x | {'met' if t['met'] else '**not met**'} |")
    lines += ["", "| engine | method | precision | tickets | tickets/s | runs | notes |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        runs = ", ".join(f"{x:.1f}" for x in row["runs_tickets_per_s"])
        lines.append(
            f"| {row['engine']} | {row['name']} | {row['precision']} | {row['n']} | {row['tickets_per_s']:.2f} | {runs} | {row['notes']} |"
        )
    lines += ["", "| agreement | tickets | top-1 | full ranking | max abs diff (nats) |", "|---|---|---|---|---|"]
    for key, a in r["agreement"].items():
        lines.append(f"| {key} | {a['n']} | {a['top1_agreement']:.3f} | {a['ranking_agreement']:.3f} | {a['max_abs_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployer", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 tickets, one repeat")
    parser.add_argument("--out", "--output-dir", dest="out", default=None, help=f"results directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        # The loratune CLI's OpenMP default (cli.py), read when torch and CTranslate2 (its own libgomp) load:
        # both engines run under the same bounded spin (`loratune bench --deployer` has it already).
        os.environ["GOMP_SPINCOUNT"] = "10000"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.deployer", *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(quick=args.quick, out=args.out, echo=lambda *a: print(*a, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
