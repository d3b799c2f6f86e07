"""Tiny random-weight models with locally trained tokenizers, for offline tests and smoke runs.

No model hub is needed: the tokenizer is a byte-level BPE trained here on the given texts, the weights are
random, and both are saved with ``save_pretrained`` so every code path loads them like a real model.
Their predictions mean nothing; they exist to exercise the real pipeline end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .atomic import temp_dir_beside
from .prompt import DEFAULT_LABELS, format_example

TINY_NAME = "tiny"
# ``--model`` names that build a tiny random model of each family.
TINY_NAMES = {TINY_NAME: "seq2seq", "tiny-causal": "causal", "tiny-encoder": "encoder"}
TINY_WARNING = (
    "--model tiny: a tiny model with RANDOM weights built offline; it runs the whole pipeline but its "
    "predictions and scores mean nothing. Pass --model HUB_ID_OR_PATH for real results."
)

# flan-t5-small's architecture, for parameter counts and speed benchmarks (weights do not change either).
FLAN_T5_SMALL = dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=1024,
    num_layers=8,
    num_decoder_layers=8,
    num_heads=6,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
TINY_T5 = dict(
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=64,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# Llama-shaped decoder-only model. Its tokenizer has no pad token (like Llama's and GPT-2's), so the code
# that sets one is exercised, and a small chat template, so ``prompt.chat_template: auto`` uses it.
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.125,
)
CAUSAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# BERT-shaped encoder, saved as a bare ``BertModel`` like sentence-transformers checkpoints (MiniLM).
TINY_BERT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    pad_token_id=0,
    initializer_range=0.125,
)
ENCODER_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def default_cache_dir() -> Path:
    root = os.environ.get("LORATUNE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loratune")
    return Path(root)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2000):
    """A byte-level BPE tokenizer (T5 special-token layout: pad=0, eos=1, unk=2) that appends EOS like T5's."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(corpus, SPECIAL_TOKENS, "$A </s>", vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def t5_config(vocab_size: int, **overrides):
    """A T5Config shaped like flan-t5 (T5 v1.1): untied LM head and no decoder-output scaling.

    transformers 5 reads the ``tie_word_embeddings=False`` keyword only to turn off decoder-output scaling and
    then forces the attribute to True, so it is passed *and* set afterwards.
    """
    from transformers import T5Config

    config = T5Config(**{**TINY_T5, **overrides, "vocab_size": vocab_size, "tie_word_embeddings": False})
    config.tie_word_embeddings = False
    return config


def build_tiny_t5(out_dir: str | Path, corpus: Iterable[str], seed: int = 0, **config_overrides) -> Path:
    """Save a random-weight T5 and a tokenizer trained on ``corpus`` into ``out_dir``; return the path."""
    import torch
    from transformers import T5ForConditionalGeneration

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(t5_config(len(tokenizer), **config_overrides))
    # Real T5 checkpoints hold one input embedding under three names; only flan-t5's LM head differs.
    with torch.no_grad():
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "TINY_RANDOM_MODEL.txt").write_text(TINY_WARNING + "\n", encoding="utf-8")
    return out_dir


def _train_bpe(corpus: Iterable[str], special_tokens: list[str], template: str, vocab_size: int = 2000, add_prefix_space: bool = False):
    """A byte-level BPE trained on ``corpus``; ``template`` places the special tokens around one sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in special_tokens if t in template]
    )
    return tok


def build_tiny_causal(out_dir: str | Path, corpus: Iterable[str], seed: int = 0, **config_overrides) -> Path:
    """Save a random-weight Llama-style causal LM and a tokenizer (BOS, no pad token, chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    corpus = list(corpus)
    # A prefix space, like Llama's SentencePiece: a label tokenized on its own is the common word-initial
    # token (" billing"), not rare word-internal pieces.
    raw = _train_bpe(corpus + ["<|user|>\n<|assistant|>\n"], CAUSAL_SPECIAL_TOKENS, "<s> $A", add_prefix_space=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **config_overrides, "vocab_size": len(tokenizer)})
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "TINY_RANDOM_MODEL.txt").write_text(TINY_WARNING + "\n", encoding="utf-8")
    return out_dir


def build_tiny_encoder(out_dir: str | Path, corpus: Iterable[str], seed: int = 0, **config_overrides) -> Path:
    """Save a random-weight BERT-style encoder (no classification head) and a [CLS] ... [SEP] tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    raw = _train_bpe(corpus, ENCODER_SPECIAL_TOKENS, "[CLS] $A [SEP]")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    torch.manual_seed(seed)
    config = BertConfig(**{**TINY_BERT, **config_overrides, "vocab_size": len(tokenizer)})
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "TINY_RANDOM_MODEL.txt").write_text(TINY_WARNING + "\n", encoding="utf-8")
    return out_dir


def tokenizer_corpus(texts: Iterable[str], labels: Iterable[str] = DEFAULT_LABELS) -> list[str]:
    """The texts plus the canonical prompt and labels, so prompt words get their own tokens."""
    labels = list(labels)
    return [format_example("", labels), *labels, *texts]


def tiny_model(
    texts: Iterable[str] = (), labels: Iterable[str] = DEFAULT_LABELS, cache_dir: str | Path | None = None, family: str = "seq2seq"
) -> Path:
    """Build (once, cached by content) the tiny random model of ``family`` (``--model tiny``, ``tiny-causal``,
    ``tiny-encoder``) and return its directory."""
    build, shape, prefix = {
        "seq2seq": (build_tiny_t5, TINY_T5, "tiny-t5"),
        "causal": (build_tiny_causal, TINY_LLAMA, "tiny-causal"),
        "encoder": (build_tiny_encoder, TINY_BERT, "tiny-encoder"),
    }[family]
    corpus = tokenizer_corpus(texts, labels)
    digest = hashlib.sha256(json.dumps([corpus, shape]).encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / f"{prefix}-{digest}"
    if (target / "config.json").is_file():
        return target
    # Build beside the target and rename, so concurrent or interrupted builds never leave half a model.
    tmp = temp_dir_beside(target)
    try:
        build(tmp, corpus)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
