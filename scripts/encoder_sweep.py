"""Find encoder-family defaults: MiniLM + LoRA + classification head on the input text alone, vs the frozen baseline.

Plain transformers + PEFT (no loratune training code), so the numbers say what the recipe can reach, not what
today's loratune does. Every run prints one JSON line and appends it to scripts/encoder_sweep_results.jsonl.

    PYTHONPATH=src python scripts/encoder_sweep.py baseline
    PYTHONPATH=src python scripts/encoder_sweep.py lora --lr 5e-4 --epochs 1 --r 8 --alpha 16 --targets query,value
    PYTHONPATH=src python scripts/encoder_sweep.py lora --train-limit 1500 --epochs 1      # gauge speed first

Metrics on clinc150/test.jsonl: in-scope accuracy and out-of-scope (``oos``) recall at confidence threshold 0
(never abstain) and at thresholds picked on val.jsonl (best macro-F1; highest threshold keeping val in-scope
accuracy >= a target). ``test_frontier`` is for information only: the best oos recall any threshold reaches
while test in-scope accuracy stays >= 96% (it looks at test labels, so it is not a calibrated result).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from loratune.baseline import EmbeddingBaseline, default_embedding_model, embed_texts
from loratune.evaluate import CONFIDENCE_GRID, abstain_metrics, apply_abstain, calibrate_confidence

DATA = Path("/work/shared/datasets/clinc150")
RESULTS = Path(__file__).with_name("encoder_sweep_results.jsonl")
CACHE = Path("/tmp/encoder_sweep_cache")
FALLBACK = "oos"
VAL_TARGETS = (0.96, 0.97, 0.98)


def load(split: str, limit: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return [r["text"] for r in rows], [r["label"] for r in rows]


def score(labels: list[str], val_probs, val_gold, test_probs, test_gold) -> dict:
    """Test metrics at threshold 0 and at val-calibrated thresholds, plus the (uncalibrated) test frontier."""
    index = {label: i for i, label in enumerate(labels)}
    val_idx = [index[g] for g in val_gold]
    top = [labels[j] for j in test_probs.argmax(1)]
    conf = test_probs.max(1)

    def at(t: float) -> dict:
        m = abstain_metrics(test_gold, apply_abstain(top, conf, t, FALLBACK), FALLBACK)
        return {"t": round(float(t), 2), "in_scope": round(m["in_scope_accuracy"], 4), "oos_recall": round(m["oos_recall"], 4)}

    out = {
        "val_acc": round(float(np.mean([labels[j] == g for j, g in zip(val_probs.argmax(1), val_gold)])), 4),
        "test_acc": round(float(np.mean([p == g for p, g in zip(top, test_gold)])), 4),
        "test_t0": at(0.0),
    }
    t, _ = calibrate_confidence(val_probs, val_idx, labels, FALLBACK)
    out["test_at_val_best_f1"] = at(t)
    for target in VAL_TARGETS:
        t, _ = calibrate_confidence(val_probs, val_idx, labels, FALLBACK, target_in_scope_accuracy=target)
        out[f"test_at_val_insc_{target}"] = at(t)
    frontier = [at(t) for t in CONFIDENCE_GRID]
    ok = [f for f in frontier if f["in_scope"] >= 0.96]
    out["test_frontier_insc96"] = max(ok, key=lambda f: f["oos_recall"]) if ok else None
    return out


def cached_embeddings(split: str, texts: list[str], model_path: str) -> np.ndarray:
    path = CACHE / f"minilm_{split}_{len(texts)}.npy"
    if path.exists():
        return np.load(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    x = embed_texts(texts, model_path, batch_size=128, max_length=64)
    np.save(path, x)
    return x


def run_baseline(args) -> dict:
    model_path = default_embedding_model()
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = load("train"), load("val"), load("test")
    t0 = time.perf_counter()
    embs = {s: cached_embeddings(s, x, model_path) for s, x in (("train", tr_x), ("val", va_x), ("test", te_x))}
    embed_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    base = EmbeddingBaseline(C=args.C, class_weight=args.class_weight).fit_vectors(embs["train"], tr_y)
    fit_s = time.perf_counter() - t1
    return {
        "config": f"frozen MiniLM mean-pool + LogisticRegression C={args.C} class_weight={args.class_weight}",
        "embed_s_all_splits": round(embed_s, 1),
        "fit_s": round(fit_s, 1),
        **score(base.labels, base.predict_proba_vectors(embs["val"]), va_y, base.predict_proba_vectors(embs["test"]), te_y),
    }


class MeanPoolClassifier(torch.nn.Module):
    """Encoder (LoRA inside) -> attention-mask mean pooling -> optional L2 norm * scale -> Linear head."""

    def __init__(self, encoder, n_labels: int, normalize: bool, scale: float):
        super().__init__()
        self.encoder, self.normalize, self.scale = encoder, normalize, scale
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_labels)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, input_ids, attention_mask, **_):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1) * self.scale
        return self.head(self.dropout(pooled))


def build_model(args, labels: list[str], model_path: str):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification

    targets = args.targets.split(",")
    if args.pooling == "cls":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)}
        )
        save = ["classifier"] + (["pooler"] if args.train_pooler else [])
        cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=args.r,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=targets,
            modules_to_save=save,
        )
        return get_peft_model(model, cfg), lambda m, batch: m(**batch).logits
    encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False)
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets)
    encoder = get_peft_model(encoder, cfg)
    model = MeanPoolClassifier(encoder, len(labels), args.normalize, args.scale)
    return model, lambda m, batch: m(**batch)


def init_head_from_baseline(model, args, labels: list[str], model_path: str) -> None:
    """Linear probe, then fine-tune: the head starts as the frozen baseline's regression (logits = W x + b on
    L2-normalised mean embeddings), so step 0 already scores what the baseline scores."""
    if args.pooling != "mean" or not args.normalize:
        raise SystemExit("--init-head needs --pooling mean --normalize")
    tr_x, tr_y = load("train")
    base = EmbeddingBaseline(C=10.0).fit_vectors(cached_embeddings("train", tr_x, model_path), tr_y, labels)
    clf = base._clf
    assert list(clf.classes_) == labels
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(clf.coef_ / args.scale, dtype=torch.float32))
        model.head.bias.copy_(torch.tensor(clf.intercept_, dtype=torch.float32))


def batches(ids: list[list[int]], order: list[int], batch_size: int, pad_id: int):
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        yield idx, {"input_ids": input_ids, "attention_mask": mask}


def predict_probs(model, forward, ids, pad_id, batch_size=256) -> np.ndarray:
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    with torch.inference_mode():
        for idx, batch in batches(ids, order, batch_size, pad_id):
            probs = torch.softmax(forward(model, batch).float(), -1).numpy()
            out = np.zeros((len(ids), probs.shape[1]), dtype=np.float32) if out is None else out
            out[idx] = probs
    return out


def run_lora(args) -> dict:
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model_path = default_embedding_model()
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = load("train", args.train_limit), load("val", args.eval_limit), load("test", args.eval_limit)
    labels = sorted(set(load("train")[1]))
    index = {label: i for i, label in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(model_path)
    enc = lambda texts: tok(texts, truncation=True, max_length=args.max_length)["input_ids"]  # noqa: E731
    tr_ids, va_ids, te_ids = enc(tr_x), enc(va_x), enc(te_x)
    y = torch.tensor([index[v] for v in tr_y])
    model, forward = build_model(args, labels, model_path)
    if args.init_head:
        init_head_from_baseline(model, args, labels, model_path)
    head_names = ("classifier", "head", "pooler")
    head = [p for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in head_names)]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not any(h in n for h in head_names)]
    trainable = sum(p.numel() for p in head + body)
    opt = torch.optim.AdamW(
        [{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr or args.lr}], weight_decay=args.weight_decay
    )
    steps = args.epochs * math.ceil(len(tr_ids) / args.batch_size)
    sched = get_linear_schedule_with_warmup(opt, int(args.warmup * steps), steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    t0 = time.perf_counter()
    step, losses = 0, []
    for epoch in range(args.epochs):
        model.train()
        order = list(range(len(tr_ids)))
        random.shuffle(order)
        for idx, batch in batches(tr_ids, order, args.batch_size, tok.pad_token_id):
            loss = loss_fn(forward(model, batch), y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head + body, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {np.mean(losses[-50:]):.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    va_p = predict_probs(model, forward, va_ids, tok.pad_token_id)
    te_p = predict_probs(model, forward, te_ids, tok.pad_token_id)
    predict_s = time.perf_counter() - t1
    cfg = {k: v for k, v in vars(args).items() if k not in ("cmd",)}
    return {
        "config": cfg,
        "trainable_params": trainable,
        "n_train": len(tr_ids),
        "train_s": round(train_s, 1),
        "predict_s_val_test": round(predict_s, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        **score(labels, va_p, va_y, te_p, te_y),
    }


def describe(row: dict) -> str:
    c = row["config"]
    if isinstance(c, str):
        return c
    pool = f"{c['pooling']}{'+norm' if c.get('normalize') else ''}{'+LR-init head' if c.get('init_head') else ''}"
    extra = f", train {c['train_limit']}" if c.get("train_limit") else ""
    extra += f", eval {c['eval_limit']} (smoke)" if c.get("eval_limit") else ""
    return (
        f"LoRA r={c['r']} a={c['alpha']} {c['targets']}, {pool}, lr {c['lr']:g}/head {c['head_lr'] or c['lr']:g}, "
        f"{c['epochs']} ep, bs {c['batch_size']}{extra}"
    )


def table() -> str:
    """The results file as a markdown table (in-scope accuracy / oos recall on test, threshold in brackets)."""

    def cell(m):
        return f"{100 * m['in_scope']:.1f} / {100 * m['oos_recall']:.1f} (t={m['t']:.2f})" if m else "-"

    lines = [
        "| config | train s | val acc | test t=0 | test @val best macro-F1 | test @val in-scope>=0.97 | test frontier (in-scope>=96%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        secs = r.get("train_s", r.get("fit_s"))
        lines.append(
            f"| {describe(r)} | {secs} | {100 * r['val_acc']:.1f} | {cell(r['test_t0'])} | {cell(r['test_at_val_best_f1'])} | "
            f"{cell(r.get('test_at_val_insc_0.97'))} | {cell(r['test_frontier_insc96'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline")
    b.add_argument("--C", type=float, default=10.0)
    b.add_argument("--class-weight", default=None)
    lo = sub.add_parser("lora")
    lo.add_argument("--lr", type=float, default=5e-4)
    lo.add_argument("--head-lr", type=float, default=None, help="learning rate of the head (default: --lr)")
    lo.add_argument("--epochs", type=int, default=1)
    lo.add_argument("--r", type=int, default=8)
    lo.add_argument("--alpha", type=int, default=16)
    lo.add_argument("--dropout", type=float, default=0.1)
    lo.add_argument("--targets", default="query,value")
    lo.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    lo.add_argument("--train-pooler", action="store_true", help="cls pooling: train the pooler in full too")
    lo.add_argument("--normalize", action="store_true", help="mean pooling: L2-normalise then scale")
    lo.add_argument("--scale", type=float, default=20.0)
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--max-length", type=int, default=64)
    lo.add_argument("--weight-decay", type=float, default=0.01)
    lo.add_argument("--warmup", type=float, default=0.06)
    lo.add_argument("--label-smoothing", type=float, default=0.0)
    lo.add_argument("--train-limit", type=int, default=None)
    lo.add_argument("--threads", type=int, default=1, help="1: on 2 oversubscribed cores, 2 threads ran 10x slower")
    lo.add_argument("--init-head", action="store_true", help="mean+normalize: start the head from the frozen baseline's LR")
    lo.add_argument("--eval-limit", type=int, default=None, help="smoke runs only: score a slice of val/test")
    lo.add_argument("--seed", type=int, default=0)
    sub.add_parser("table", help="print the results so far as a markdown table")
    args = p.parse_args()
    if args.cmd == "table":
        print(table())
        return
    if args.cmd == "lora":
        torch.set_num_threads(args.threads)
    row = run_baseline(args) if args.cmd == "baseline" else run_lora(args)
    row["kind"] = args.cmd
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = json.dumps(row)
    print(line)
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
