"""Export an adapter to where users run small LLMs: a merged HF model directory, or a GGUF file.

    loratune export --adapter runs/x/final --format merged --output merged/
    loratune export --adapter runs/x/final --format gguf --quant q8_0 --output model.gguf

The GGUF writer covers Llama-architecture bases (SmolLM2, Llama, Mistral-shaped checkpoints saved as llama),
which is what llama.cpp and Ollama load. The tokenizer metadata is copied from the base's own GGUF file when
the adapter was trained on one (so llama.cpp tokenizes exactly as before); otherwise it is built from the HF
byte-level BPE tokenizer. The chat template and loratune's canonical prompt go into the metadata
(``tokenizer.chat_template``, ``loratune.prompt``, ``loratune.labels``), so the file says how it was trained to
be prompted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .atomic import replace_dir, temp_dir_beside
from .errors import LoratuneError
from .families import family_class
from .gguf import SMOLLM2_NAME, gguf_sha256, smollm2_gguf

QUANTS = ("f16", "q8_0")
EXPORT_FILE = "loratune_export.json"


def export_merged(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge the adapter into its base (``merge_and_unload``) and save model + tokenizer into ``out_dir``."""
    from .adapter import AdapterMeta

    if AdapterMeta.read(adapter_dir).spec.pooling == "mean":
        raise LoratuneError(
            f"{adapter_dir} classifies mean-pooled embeddings, which a plain transformers model cannot reproduce "
            "(its head reads the [CLS] pooler): serve it with loratune, or train with --set model.pooling=cls to export"
        )
    model, tokenizer, meta = _merged(adapter_dir)
    out_dir = Path(out_dir)
    tmp = temp_dir_beside(out_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(_export_record(adapter_dir, meta), indent=2), encoding="utf-8")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_gguf(adapter_dir: str | Path, out_path: str | Path, quant: str = "f16", echo=None) -> Path:
    """Merge the adapter and write a llama.cpp-loadable GGUF file (Llama-architecture bases only).

    ``quant``: ``f16`` (2-D weights in float16, norms in float32, as llama.cpp's converter does) or ``q8_0``.
    """
    if quant not in QUANTS:
        raise LoratuneError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    model, tokenizer, meta = _merged(adapter_dir)
    if not family_class(meta.family).exports_gguf:
        raise LoratuneError(
            f"GGUF export supports Llama-architecture causal models; {adapter_dir} is a {meta.family} adapter (use --format merged)"
        )
    metadata = {"loratune.prompt": meta.spec.format("{text}"), "loratune.labels": list(meta.labels)}
    if meta.base_gguf:
        metadata["loratune.base_gguf_sha256"] = meta.base_gguf["sha256"]
    name = f"{Path(str(meta.base_model_requested or meta.base_model)).name} + loratune adapter"
    return write_gguf(model, tokenizer, out_path, quant, name=name, metadata=metadata, tokenizer_source=_source_gguf(meta), echo=echo)


def write_gguf(
    model,
    tokenizer,
    out_path: str | Path,
    quant: str = "f16",
    *,
    name: str,
    metadata: dict | None = None,
    tokenizer_source: Path | None = None,
    echo=None,
) -> Path:
    """Write a Llama-architecture HF model as a GGUF file, atomically.

    ``metadata``: extra string / string-list keys (``loratune.*``). ``tokenizer_source``: a GGUF file whose
    ``tokenizer.*`` metadata is copied as is; without it the metadata is built from ``tokenizer``.
    """
    import gguf

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if quant not in QUANTS:
        raise LoratuneError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    config = model.config
    if config.model_type != "llama":
        raise LoratuneError(f"GGUF export supports Llama-architecture models, not {config.model_type!r} (use --format merged)")
    _check_llama_config(config)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(None, "llama")
        writer.add_name(name)
        _write_llama_kv(writer, config, quant)
        for key, value in (metadata or {}).items():
            (writer.add_array if isinstance(value, list) else writer.add_string)(key, value)
        if tokenizer_source is not None:
            _copy_tokenizer_kv(writer, tokenizer_source)
        else:
            _write_tokenizer_kv(writer, tokenizer, config.vocab_size, echo)
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)
        _write_tensors(writer, model, config, quant)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _merged(adapter_dir):
    """(merged base model, tokenizer, adapter metadata), in float32 so f16/q8_0 rounding happens once, at write."""
    import torch

    from .adapter import load_adapter

    loaded, meta = load_adapter(adapter_dir, dtype=torch.float32)
    return loaded.model.merge_and_unload(), loaded.tokenizer, meta


def _export_record(adapter_dir, meta) -> dict:
    return {
        "adapter": str(Path(adapter_dir).resolve()),
        "base_model": meta.base_model,
        "base_gguf": meta.base_gguf,
        "labels": meta.labels,
        "prompt": meta.spec.to_dict(),
    }


def _check_llama_config(config) -> None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LoratuneError(f"GGUF export does not write rope scaling ({rope.get('rope_type')!r}) yet; use --format merged")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LoratuneError("GGUF export does not write Llama bias tensors yet; use --format merged")


def _write_llama_kv(writer, config, quant: str) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _source_gguf(meta) -> Path | None:
    """The base's own GGUF file (same sha256 as recorded), whose tokenizer metadata llama.cpp already reads."""
    record = meta.base_gguf
    if not record:
        return None
    candidates = [Path(record["source"])]
    if meta.base_model_requested == SMOLLM2_NAME:
        try:
            candidates.append(smollm2_gguf())
        except LoratuneError:
            pass
    return next((c for c in candidates if c.is_file() and gguf_sha256(c) == record["sha256"]), None)


def _copy_tokenizer_kv(writer, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.") or name == "tokenizer.chat_template":  # the adapter's template is written after
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main, sub)


def _write_tokenizer_kv(writer, tokenizer, vocab_size: int, echo) -> None:
    """llama.cpp's ``gpt2`` tokenizer metadata from an HF byte-level BPE tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = json.dumps(spec.get("pre_tokenizer"))
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in pre:
        raise LoratuneError("GGUF export needs a byte-level BPE tokenizer (or a base loaded from a GGUF file); use --format merged")
    if '"add_prefix_space": true' in pre:
        echo("warning: the tokenizer adds a prefix space, which GGUF cannot record; llama.cpp will tokenize the first word differently")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            tokens[index] = token
            types[index] = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)


def _write_tensors(writer, model, config, quant: str) -> None:
    import gguf
    import numpy as np

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head is the token embedding; llama.cpp reuses it when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoratuneError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        data = tensor.detach().float().numpy()
        # llama.cpp's rotary embedding pairs q/k rows differently from HF: permute like its converter does
        # (transformers' GGUF reader undoes exactly this).
        if name.endswith("attn_q.weight"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif quant == "q8_0" and data.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16))


def _permute(weights, n_head: int, n_head_kv: int):
    if n_head_kv != n_head:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)
