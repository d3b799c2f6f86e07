"""Training-step rows of the causal benchmark (``python -m benchmarks.causal``): SmolLM2-135M's shape, random weights.

One step = loss + backward through a LoRA adapter (no optimizer step: it costs the same for every method). Methods,
interleaved per repetition in one process:

* ``model loss (naive)``: ``model(**batch).loss`` on the whole prompts, what an HF Trainer computes by default;
* ``label-position loss``: ``causal_lm_loss``, the LM head only at label positions;
* ``training_loss (shared prefix)``: ``CausalFamily.training_loss`` on the same collated batch, the path
  ``loratune train`` takes (the shared prefix once per batch, graph kept; LM head at label positions).

Cases: synthetic ``word_word`` labels (5, 77, ...) with synthetic texts and loratune's default causal adapter
(r=8 on q_proj, v_proj), and ``demo``: the shipped tickets (data/raw/train.jsonl, a seeded sample), the demo's
prompt and its SmolLM2 LoRA modules (``demo.SMOLLM2_BUDGET``). LoRA dropout is 0 so the losses can be compared.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loratune.causal_scoring import causal_lm_loss
from loratune.demo import SMOLLM2_BUDGET
from loratune.families import CausalFamily
from loratune.prompt import DEFAULT_LABELS

ROOT = Path(__file__).resolve().parents[1]
TRAIN_MICRO_BATCH = 8
"""Full-prompt methods run in micro-batches of this many rows (weighted so the gradient equals the batch's)."""
NAIVE = "model loss (naive)"
OURS = "training_loss (shared prefix)"
TARGETS = {"train_77_vs_naive": 5.0, "train_demo_vs_naive": 3.0}


@dataclass
class Case:
    name: str
    n_labels: int
    lora: str
    model: object
    family: CausalFamily
    batch: dict


def with_lora(model, seed: int, targets=("q_proj", "v_proj"), r: int = 8, alpha: int = 16):
    """A LoRA adapter with non-zero weights (so it changes outputs) and no dropout (so losses compare exactly)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(copy.deepcopy(model), config)


def _family(model, tokenizer, labels, max_length, **prompt) -> CausalFamily:
    spec = CausalFamily.make_spec(tokenizer, labels, chat_template="on", max_length=max_length, **prompt)
    return CausalFamily(model, tokenizer, spec)


def synthetic_case(lora, tokenizer, n_labels: int, labels, texts, batch: int, max_length: int) -> Case:
    """``lora``: the model with loratune's default causal adapter (``with_lora(model, seed)``), shared by the cases."""
    fam = _family(lora, tokenizer, labels, max_length)
    targets = [labels[i % n_labels] for i in range(batch)]
    collated = fam.collator()(fam.encode(texts[:batch], targets).features)
    return Case(f"{n_labels} labels (synthetic)", n_labels, "r=8 q,v", lora, fam, collated)


def demo_case(model, tokenizer, batch: int, seed: int) -> Case:
    """The demo's settings on SmolLM2's shape: shipped tickets, demo prompt, SMOLLM2_BUDGET's LoRA modules."""
    targets = SMOLLM2_BUDGET["lora.target_modules"]
    lora = with_lora(model, seed, targets, r=8, alpha=32).train()
    fam = _family(lora, tokenizer, list(DEFAULT_LABELS), 512, task="You are a support ticket classifier.", input_name="customer message")
    rows = [json.loads(line) for line in (ROOT / "data" / "raw" / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    features = fam.encode([r["text"] for r in rows], [r["label"] for r in rows]).features
    # A batch as train.group_by_length (the default) forms them: the Trainer sorts a random megabatch of 50 batches
    # by length and cuts it into batches; this is the batch at the megabatch's median length.
    mega = np.random.default_rng(seed).permutation(len(rows))[: 50 * batch]
    mega = sorted(mega, key=lambda i: -len(features[i]["input_ids"]))
    middle = len(mega) // 2 - batch // 2
    collated = fam.collator()([features[i] for i in mega[middle : middle + batch]])
    short = ",".join(t.removesuffix("_proj") for t in targets)
    return Case("demo: 5 labels, shipped tickets", len(DEFAULT_LABELS), f"r=8 {short}", lora, fam, collated)


METHODS = {
    NAIVE: lambda c, b: c.model(**b).loss,
    "label-position loss": lambda c, b: causal_lm_loss(c.model, b["input_ids"], b["attention_mask"], b["labels"]),
    OURS: lambda c, b: c.family.training_loss(c.model, b),
}


def step(case: Case, name: str) -> float:
    """One loss + backward over the case's batch; full-prompt methods in micro-batches, each weighted by its label
    tokens so the gradient equals the whole batch's (16 rows x 400+ tokens would not fit beside other jobs)."""
    case.model.zero_grad(set_to_none=True)
    full = case.batch
    rows = len(full["input_ids"])
    parts = [slice(0, rows)] if name == OURS else [slice(i, i + TRAIN_MICRO_BATCH) for i in range(0, rows, TRAIN_MICRO_BATCH)]
    n_tokens = int((full["labels"][:, 1:] != -100).sum())
    total = 0.0
    for part in parts:
        sub = {k: v[part] for k, v in full.items()}
        loss = METHODS[name](case, sub) * (int((sub["labels"][:, 1:] != -100).sum()) / n_tokens)
        loss.backward()
        total += loss.item()
    return total


def training_rows(cases: list[Case], repeats: int, peak_memory, echo) -> list[dict]:
    for case in cases:  # warm-up: the first backward allocates
        step(case, OURS)
    samples: dict[tuple[str, str], list[dict]] = {}
    losses: dict[tuple[str, str], float] = {}
    for rep in range(repeats):
        for case in cases:
            for name in METHODS:
                with peak_memory() as mem:
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss = step(case, name)
                    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
                losses.setdefault((case.name, name), loss)
                samples.setdefault((case.name, name), []).append(dict(s=sec, cpu=cpu, mem=mem))
                b = len(case.batch["input_ids"])
                echo(f"  rep {rep + 1}/{repeats} train {case.name}, {name}: {b / sec:.2f} ex/s (loss {loss:.5f})")
    rows = []
    for case in cases:
        b = len(case.batch["input_ids"])
        prefix = len(case.family.shared_prefix())
        for name in METHODS:
            runs = samples[(case.name, name)]
            row = dict(
                case=case.name,
                n_labels=case.n_labels,
                lora=case.lora,
                method=name,
                batch=b,
                prompt_tokens=round(float(case.batch["attention_mask"].sum(1).float().mean()), 1),
                prefix_tokens=prefix,
                examples_per_s=round(statistics.median(b / r["s"] for r in runs), 3),
                step_s=round(statistics.median(r["s"] for r in runs), 2),
                # CPU seconds of this process: with one thread, the step's work whatever else shares the machine.
                cpu_s=round(statistics.median(r["cpu"] for r in runs), 2),
                loss=losses[(case.name, name)],
                loss_diff_vs_naive=abs(losses[(case.name, name)] - losses[(case.name, NAIVE)]),
            )
            for r in runs:
                r["mem"].merge_into(row)
            rows.append(row)
    return rows


def training_targets(training: list[dict]) -> list[dict]:
    def rate(case_start, method):
        return next((r["examples_per_s"] for r in training if r["case"].startswith(case_start) and r["method"] == method), None)

    out = []
    for key, case, label in (("train_77_vs_naive", "77 labels", "77 labels"), ("train_demo_vs_naive", "demo", "demo settings (issue 14)")):
        new, naive = rate(case, OURS), rate(case, NAIVE)
        if new and naive:
            need = TARGETS[key]
            cpu = {r["method"]: r["cpu_s"] for r in training if r["case"].startswith(case)}
            got = f"{new / naive:.1f}x wall ({cpu[NAIVE] / cpu[OURS]:.1f}x CPU s)"
            out.append(dict(target=f"{label}: training step vs naive", need=f">= {need}x", got=got, met=new / naive >= need))
    return out


def training_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| case | LoRA | training step (loss + backward) | batch | prompt tok (prefix) | ex/s | step s | CPU s | "
        "peak RSS MB | loss diff vs naive | ratio (wall) | ratio (CPU s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["case"]: r for r in rows if r["method"] == NAIVE}
    for x in rows:
        lines.append(
            f"| {x['case']} | {x['lora']} | {x['method']} | {x['batch']} | {x['prompt_tokens']} ({x['prefix_tokens']}) | "
            f"{x['examples_per_s']} | {x['step_s']} | {x['cpu_s']} | {x.get('peak_rss_mb', '')} | "
            f"{x['loss_diff_vs_naive']:.1e} | {x['examples_per_s'] / base[x['case']]['examples_per_s']:.1f}x | "
            f"{base[x['case']]['cpu_s'] / x['cpu_s']:.1f}x |"
        )
    return lines
