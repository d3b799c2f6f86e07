"""What many labels cost the seq2seq and encoder families: scoring and a training step at 5, 77 and 151 labels
(issue 15; the causal family's rows are ``benchmarks/causal.py``).

    python -m benchmarks.labels            # 3 interleaved repetitions -> results/labels-<date>.json + docs table
    python -m benchmarks.labels --quick    # 1 repetition, fewer examples: a smoke run

All in one process, interleaved per repetition (every case once, then again), medians over repetitions:
* seq2seq: flan-t5-small's exact shape with random weights (``benchmarks.run.build_model``) and a LoRA adapter
  merged for scoring, reading loratune's canonical prompt (instruction + every label + the text), so the prompt
  grows with the label list; scoring ranks every label over the label trie.
* encoder: the real all-MiniLM-L6-v2 (the dev extra), reading the text alone with a head of one output per label
  (mean pooling); only the head grows with the label list.
Texts are short synthetic messages (6-20 words); labels are synthetic ``word_word`` intents like CLINC150's.
Scoring: ``family.label_logprobs`` over ``n`` texts, batch 32. Training step: forward + backward of one batch of
8 through the LoRA model (no optimizer step). Peak memory: the process's resident high-water mark in the block.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.causal import synthetic_labels, synthetic_texts
from benchmarks.run import PeakMemory, build_model, machine_info, with_adapter
from loratune.atomic import write_text
from loratune.families import EncoderFamily, Seq2SeqFamily
from loratune.models import attach_lora, load_base

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
LABEL_COUNTS = (5, 77, 151)
TARGETS = {"encoder_151_vs_5": 1.2}
MARK = "<!-- labels-benchmark -->"


def seq2seq_case(labels, texts, seed=0):
    stock, tokenizer = build_model(torch.device("cpu"), seed)
    peft_model, merged = with_adapter(stock, seed)
    spec = Seq2SeqFamily.make_spec(tokenizer, labels, max_length=4096)
    return Seq2SeqFamily(merged, tokenizer, spec), Seq2SeqFamily(peft_model.train(), tokenizer, spec), texts


def encoder_case(labels, texts, model_dir):
    base = load_base(model_dir, labels=labels)
    spec = EncoderFamily.make_spec(base.tokenizer, labels, model_config=base.model.config)
    targets, exclude = EncoderFamily.lora_targets(base.model, spec)
    model = attach_lora(base.model, "encoder", 8, 16, 0.0, targets, exclude)
    family = EncoderFamily(model.eval(), base.tokenizer, spec)
    return family, EncoderFamily(model, base.tokenizer, spec), texts


def train_step(family, texts, labels) -> float:
    """Seconds for forward + backward of one batch through the LoRA model."""
    enc = family.encode(texts, [family.spec.target(labels[i % len(labels)]) for i in range(len(texts))])
    batch = family.collator()(enc.features)
    model = family.model.train()
    start = time.perf_counter()
    loss = family.training_loss(model, batch)
    if loss is None:
        loss = model(**batch).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def run(quick: bool = False, echo=print) -> dict:
    from loratune.baseline import default_embedding_model

    torch.manual_seed(0)
    # A 151-label T5 prompt is ~1k tokens: seq2seq scores fewer texts so a repetition stays in minutes.
    n_score = {"seq2seq": 4, "encoder": 32} if quick else {"seq2seq": 16, "encoder": 128}
    repeats, n_train = (1, 4) if quick else (3, 8)  # a 151-label T5 batch of 16 needs ~10 GB to backprop
    texts = synthetic_texts(max(n_score.values()), seed=1)
    minilm = default_embedding_model()
    cases = {}
    for n in LABEL_COUNTS:
        labels = synthetic_labels(n)
        cases[("seq2seq", n)] = seq2seq_case(labels, texts[: n_score["seq2seq"]])
        if minilm:
            cases[("encoder", n)] = encoder_case(labels, texts[: n_score["encoder"]], minilm)
    samples = {key: {"score_s": [], "train_s": [], "peak_rss_mb": 0.0, "prompt_tokens": 0} for key in cases}
    for rep in range(repeats):
        for key, (scorer, trainer, case_texts) in cases.items():
            labels = list(scorer.spec.labels)
            peak = PeakMemory(torch.device("cpu"))
            with peak:
                start = time.perf_counter()
                scorer.label_logprobs(case_texts, batch_size=32)
                samples[key]["score_s"].append(time.perf_counter() - start)
            if peak.peak_rss_mb is not None:
                samples[key]["peak_rss_mb"] = max(samples[key]["peak_rss_mb"], round(peak.peak_rss_mb, 1))
                growth = round(peak.peak_rss_mb - peak.start_rss_mb, 1)
                samples[key]["rss_growth_mb"] = max(samples[key].get("rss_growth_mb", 0.0), growth)
            samples[key]["train_s"].append(train_step(trainer, (case_texts * n_train)[:n_train], labels))
            samples[key]["prompt_tokens"] = round(statistics.mean(len(x) for x in scorer.prompt_ids(case_texts).ids))
            echo(f"rep {rep + 1}/{repeats} {key[0]} {key[1]} labels: score {samples[key]['score_s'][-1]:.2f}s")
    rows = []
    for (family, n), s in samples.items():
        score_s = statistics.median(s["score_s"])
        train_s = statistics.median(s["train_s"])
        rows.append(
            {
                "family": family,
                "labels": n,
                "prompt_tokens_mean": s["prompt_tokens"],
                "scored": n_score[family],
                "score_examples_per_s": round(n_score[family] / score_s, 1),
                "score_ms_per_example": round(1000 * score_s / n_score[family], 2),
                "train_step_s": round(train_s, 3),
                "train_examples_per_s": round(n_train / train_s, 1),
                "peak_rss_mb": s["peak_rss_mb"],
                "score_rss_growth_mb": s.get("rss_growth_mb"),
            }
        )
    result = {
        "date": dt.date.today().isoformat(),
        "quick": quick,
        "machine": machine_info(torch.device("cpu")),
        "settings": {"n_score": n_score, "score_batch": 32, "train_batch": n_train, "repeats": repeats},
        "rows": rows,
        "targets": targets(rows),
    }
    return result


def targets(rows) -> list[dict]:
    def ms(family, n):
        return next((r["score_ms_per_example"] for r in rows if r["family"] == family and r["labels"] == n), None)

    out = []
    if ms("encoder", 151) and ms("encoder", 5):
        ratio = ms("encoder", 151) / ms("encoder", 5)
        name = "encoder: per-example scoring cost at 151 labels / at 5"
        out.append({"target": name, "value": round(ratio, 2), "goal": "<= 1.2", "met": ratio <= TARGETS["encoder_151_vs_5"]})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    scored = " / ".join(f"{v} texts ({k})" for k, v in result["settings"]["n_score"].items())
    lines = [
        MARK,
        f"### Many labels: seq2seq and encoder ({result['date']}, {m.get('cpu', 'CPU')}, {m.get('torch_threads', '?')} torch threads, "
        f"load average at start {m.get('load_average_at_start', '?')})",
        "",
        "`python -m benchmarks.labels` (one process, interleaved, medians of "
        f"{result['settings']['repeats']}; scoring {scored} at batch 32; a training step is "
        f"forward + backward of {result['settings']['train_batch']} examples).",
        "",
        "| family | labels | prompt tokens (mean) | scoring examples/s | ms/example | training examples/s | memory added by scoring, MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        growth = r.get("score_rss_growth_mb")
        lines.append(
            f"| {r['family']} | {r['labels']} | {r['prompt_tokens_mean']} | {r['score_examples_per_s']} | "
            f"{r['score_ms_per_example']} | {r['train_examples_per_s']} | {'-' if growth is None else growth} |"
        )
    peak = max(r["peak_rss_mb"] for r in result["rows"])
    lines += ["", f"Peak resident memory of the whole process (all {len(result['rows'])} models loaded at once): {peak:.0f} MB."]
    lines.append("")
    for t in result["targets"]:
        lines.append(f"- {t['target']}: {t['value']} (target {t['goal']}: {'met' if t['met'] else 'NOT MET'})")
    lines.append(MARK)
    return "\n".join(lines)


def update_docs(table: str, path: Path = DOCS) -> None:
    text = path.read_text(encoding="utf-8")
    if MARK in text:
        head, _, rest = text.partition(MARK)
        _, _, tail = rest.partition(MARK)
        text = head + table + tail
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    write_text(path, text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.quick)
    out = ROOT / "benchmarks" / "results" / f"labels-{result['date']}{'-quick' if args.quick else ''}.json"
    write_text(out, json.dumps(result, indent=2))
    table = markdown(result)
    print(table)
    if not args.quick:
        update_docs(table)


if __name__ == "__main__":
    main()
