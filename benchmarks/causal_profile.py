"""Per-example cost breakdown of the shared-prefix causal scorer (issue 15: cost at 151 labels vs 5 labels).

    OMP_NUM_THREADS=1 python -m benchmarks.causal_profile                 # 30 layers, batch 8, synthetic + CLINC labels
    OMP_NUM_THREADS=1 python -m benchmarks.causal_profile --layers 4 --batch 32
    OMP_NUM_THREADS=1 python -m benchmarks.causal_profile --sdpa --batch 32   # one layer's attention: copy vs GQA

For each label set (the benchmark's synthetic intents and CLINC150's own intent names, at 5 and 151 labels) it
prints the tokens each example puts through the model (suffix, padded suffix width, trie nodes fed, rows the LM
head projects) and where one batch's time goes: the decoder body's linear layers, attention, the prefix KV
concatenation, the LM head and its logsumexp, the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.causal import build_model, load_tokenizer, synthetic_texts, without_gqa, workload
from loratune.causal_scoring import CausalLabelScorer

CLINC = Path("/work/shared/datasets/clinc150/train.jsonl")


def clinc_labels() -> list[str]:
    seen: dict[str, None] = {}
    for line in CLINC.read_text(encoding="utf-8").splitlines():
        seen.setdefault(json.loads(line)["label"], None)
    return list(seen)


def counts(scorer: CausalLabelScorer, suffixes: list[list[int]], batch: int) -> dict:
    t = scorer.trie
    n = len(t.tokens)
    parent = [-1] + [int(torch.nonzero(t.visible[i]).flatten()[-2]) for i in range(1, n)]
    children = [0] * n
    for p in parent[1:]:
        children[p] += 1
    internal = sum(1 for c in children if c)
    fed = getattr(scorer, "n_fed_nodes", n - 1)
    widths = [max(map(len, suffixes[i : i + batch])) for i in range(0, len(suffixes), batch)]
    return dict(
        labels=scorer.n_labels,
        mean_suffix_tokens=round(statistics.mean(map(len, suffixes)), 1),
        mean_padded_suffix_width=round(statistics.mean(widths), 1),
        trie_nodes_with_root=n,
        internal_nodes_with_root=internal,
        leaves=n - internal,
        trie_nodes_fed_per_example=fed,
        tokens_through_body_per_example=round(statistics.mean(widths) + fed, 1),
        lm_head_rows_per_example=getattr(scorer, "n_head_rows", n),
    )


def gflops(cfg, prefix: int, c: dict) -> dict:
    """Floating-point work per example (GFLOP): the decoder's linear layers per token run, attention as the dense
    tree mask computes it (every query against prefix + suffix width + nodes), the LM head per projected row."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    q = c["tokens_through_body_per_example"]
    body = 2 * (2 * h * h + 2 * h * kv + 3 * h * i) * layers * q
    attention = 4 * h * layers * q * (prefix + q)
    head = 2 * h * cfg.vocab_size * c["lm_head_rows_per_example"]
    return {k: round(v / 1e9, 2) for k, v in dict(body=body, attention=attention, lm_head=head, total=body + attention + head).items()}


def profile_batch(scorer: CausalLabelScorer, prefix, suffixes) -> dict:
    from torch.profiler import ProfilerActivity, profile

    head = {"s": 0.0}
    inner = scorer._label_sums

    def timed_sums(*args, **kwargs):
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        head["s"] += time.perf_counter() - t0
        return out

    scorer._label_sums = timed_sums
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        scorer.score_batch(prefix, suffixes)
        total = time.perf_counter() - t0
    del scorer._label_sums
    self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    attention = sum(v for k, v in self_ms.items() if "attention" in k or "flash" in k or k in ("aten::bmm", "aten::baddbmm"))
    return dict(
        batch=len(suffixes),
        total_s=round(total, 2),
        lm_head_and_logsumexp_s=round(head["s"], 2),
        body_linear_s=round((sum(v for k, v in self_ms.items() if k in ("aten::addmm", "aten::mm")) / 1e3) - head["s"], 2),
        attention_s=round(attention / 1e3, 2),
        cat_copy_s=round((self_ms.get("aten::cat", 0) + self_ms.get("aten::copy_", 0)) / 1e3, 2),
        top_ops_self_s={k: round(v / 1e3, 2) for k, v in sorted(self_ms.items(), key=lambda kv: -kv[1])[:8]},
    )


def _sdpa_case(p: int, q: int, batch: int, repeats: int) -> dict:
    import torch.nn.functional as F

    qs, k, v = torch.randn(batch, 9, q, 64), torch.randn(batch, 3, p + q, 64), torch.randn(batch, 3, p + q, 64)
    mask = torch.zeros(batch, 1, q, p + q)
    mask[..., p:] = torch.where(torch.rand(q, q) < 0.5, 0.0, torch.finfo(torch.float32).min).fill_diagonal_(0.0)

    def copied():
        kk, vv = (x[:, :, None].expand(batch, 3, 3, p + q, 64).reshape(batch, 9, p + q, 64) for x in (k, v))
        return F.scaled_dot_product_attention(qs, kk, vv, attn_mask=mask)

    def grouped():
        return F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)

    assert torch.allclose(copied(), grouped(), atol=1e-5)
    times = {"kv_copied_s": [], "enable_gqa_s": []}
    for _ in range(repeats):
        for key, fn in (("kv_copied_s", copied), ("enable_gqa_s", grouped)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {"prefix": p, "queries": q, "batch": batch} | {key: round(statistics.median(x), 4) for key, x in times.items()}


def sdpa_kernels(shapes=((84, 43), (444, 155), (814, 228)), batch: int = 32, repeats: int = 5) -> None:
    """One layer's attention at the scorer's shapes (prefix P, queries Q; SmolLM2's 9 query / 3 KV heads, a tree
    mask): KV heads copied per query head and SDPA (transformers' path with a mask) vs SDPA's ``enable_gqa``.
    Interleaved, medians of ``repeats``."""
    torch.manual_seed(0)
    for p, q in shapes:
        print(json.dumps(_sdpa_case(p, q, batch, repeats)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--label-counts", type=int, nargs="+", default=[5, 151])
    parser.add_argument("--sets", nargs="+", default=["synthetic", "clinc"])
    parser.add_argument("--variants", nargs="+", default=["copy-kv", "gqa"], help="copy-kv: without the grouped-query switch")
    parser.add_argument("--sdpa", action="store_true", help="only one layer's attention, KV heads copied vs enable_gqa")
    args = parser.parse_args(argv)
    if args.sdpa:
        with torch.inference_mode():
            sdpa_kernels(batch=args.batch)
        return
    tokenizer, name = load_tokenizer()
    model = build_model(args.layers, 0)
    texts = synthetic_texts(args.batch, 2)
    print(f"tokenizer {name}, {args.layers} layers, batch {args.batch}, torch threads {torch.get_num_threads()}")
    import benchmarks.causal as bc

    original = bc.synthetic_labels
    for label_set in args.sets:
        bc.synthetic_labels = original if label_set == "synthetic" else (lambda n: clinc_labels()[:n])
        for n in args.label_counts:
            w = workload(tokenizer, n, texts)
            scorer = CausalLabelScorer(model, w.label_ids)
            scorer.prefix_kv(w.prefix)
            scorer.score_batch(w.prefix, w.suffixes[:2])  # warm-up
            row = {"set": label_set, "prefix_tokens": len(w.prefix), **counts(scorer, w.suffixes, args.batch)}
            row["gflop_per_example"] = gflops(model.config, len(w.prefix), row)
            print(json.dumps(row))
            for variant in args.variants:
                with without_gqa() if variant == "copy-kv" else contextlib.nullcontext():
                    timing = profile_batch(scorer, w.prefix, w.suffixes[: args.batch])
                timing["s_per_example"] = round(timing["total_s"] / timing["batch"], 3)
                print(json.dumps({"set": label_set, "labels": n, "variant": variant, **timing}))
    bc.synthetic_labels = original


if __name__ == "__main__":
    main()
