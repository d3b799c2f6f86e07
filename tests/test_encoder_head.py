"""The encoder family's head: mean pooling, the linear-probe start, and the family's own training defaults."""

import json

import numpy as np
import pytest
from conftest import LABELS

from loratune.errors import LoratuneError

TEXTS = ["I was charged twice for my order", "the app crashes on start", "reset my password please", "where is my parcel"]


def mean_family(tiny_encoder, **lora):
    from loratune.families import EncoderFamily
    from loratune.models import attach_lora, load_base

    base = load_base(str(tiny_encoder), labels=LABELS)
    spec = EncoderFamily.make_spec(base.tokenizer, LABELS, model_config=base.model.config)
    targets, exclude = EncoderFamily.lora_targets(base.model, spec)
    model = attach_lora(base.model, "encoder", r=4, alpha=8, dropout=0.0, target_modules=targets, exclude_modules=exclude)
    return EncoderFamily(model.eval(), base.tokenizer, spec)


def test_bert_style_encoders_default_to_mean_pooling_and_others_to_their_own_head(tiny_encoder):
    from transformers import AutoConfig

    from loratune.families import EncoderFamily, Seq2SeqFamily
    from loratune.prompt import PromptSpec

    family = mean_family(tiny_encoder)
    assert family.spec.pooling == "mean" and family.spec.to_dict()["pooling"] == "mean"
    # Every attention and MLP projection gets LoRA, but not the pooler that mean pooling bypasses.
    adapted = {name for name, _ in family.model.named_modules() if name.endswith("lora_A")}
    assert any(".attention.self.query." in n for n in adapted) and any(".intermediate.dense." in n for n in adapted)
    assert not any("pooler" in n for n in adapted)

    tokenizer = family.tokenizer
    distilbert = AutoConfig.for_model("distilbert")
    assert EncoderFamily.make_spec(tokenizer, LABELS, model_config=distilbert).pooling is None
    assert EncoderFamily.make_spec(tokenizer, LABELS, pooling="cls", model_config=family.model.config).pooling is None
    with pytest.raises(LoratuneError, match=r"pooling=mean needs a BERT-style encoder .*'distilbert'.*model.pooling=cls"):
        EncoderFamily.make_spec(tokenizer, LABELS, pooling="mean", model_config=distilbert)
    with pytest.raises(LoratuneError, match="applies to encoder models only"):
        Seq2SeqFamily.make_spec(tokenizer, LABELS, pooling="mean")
    # Adapters saved before pooling was recorded were trained with their model's own head.
    assert PromptSpec.from_dict({"labels": LABELS}).pooling is None


def test_mean_pooling_is_the_normalised_mean_of_the_real_tokens(tiny_encoder):
    import torch

    family = mean_family(tiny_encoder)
    model, tokenizer = family.model, family.tokenizer
    # In a batch with a much longer text, padding must not change a short text's scores.
    long_text = " ".join(TEXTS * 6)
    together = family.label_logprobs([TEXTS[0], long_text])[0]
    alone = family.label_logprobs([TEXTS[0]])[0]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # By hand: the last hidden states' mean, L2-normalised, x20, through the classifier.
    from loratune.families.encoder import HEAD_SCALE, _body, _trainable_head

    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        hidden = _body(model)(input_ids=ids).last_hidden_state[0]
        pooled = torch.nn.functional.normalize(hidden.mean(0), dim=-1) * HEAD_SCALE
        expected = _trainable_head(model)(pooled).log_softmax(-1).numpy()
    np.testing.assert_allclose(alone, expected, atol=1e-5)


def test_the_head_starts_as_the_linear_probe_of_the_frozen_embeddings(tiny_encoder, demo_rows):
    from loratune.baseline import EmbeddingBaseline
    from loratune.families.encoder import HEAD_SCALE, PROBE_C

    family = mean_family(tiny_encoder)
    rows = demo_rows["train"][:200]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    before = family.label_logprobs(texts).argmax(1)
    family.prepare_training(texts, labels, echo=lambda *a: None)
    after = family.label_logprobs(texts).argmax(1)
    probe = EmbeddingBaseline(C=PROBE_C).fit_vectors(family.embeddings(texts) / HEAD_SCALE, labels, LABELS)
    expected = probe.predict_proba_vectors(family.embeddings(texts) / HEAD_SCALE).argmax(1)
    assert (after == expected).mean() >= 0.99
    gold = np.array([LABELS.index(y) for y in labels])
    assert (after == gold).mean() > (before == gold).mean() + 0.2  # the random head knew nothing


def test_family_defaults_never_replace_what_the_user_chose(tmp_path):
    from loratune.config import Config, apply_family_defaults, load_config
    from loratune.families import EncoderFamily

    defaults = EncoderFamily.train_defaults
    cfg, applied = apply_family_defaults(load_config(overrides={"train.lr": 5e-4, "train.epochs": None}), defaults)
    assert cfg.train.lr == 5e-4 and "train.lr" not in applied
    assert cfg.train.epochs == defaults["train.epochs"] and applied["train.epochs"] == defaults["train.epochs"]
    # A config file that sets a value equal to the global default still chose it.
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 5.0\nlora:\n  alpha: 32\n")
    cfg, applied = apply_family_defaults(load_config(tmp_path / "c.yaml"), defaults)
    assert cfg.train.epochs == 5.0 and cfg.lora.alpha == 32 and "train.epochs" not in applied
    # A Config built in Python: what differs from the dataclass default was chosen.
    built = Config()
    built.train.batch_size = 8
    cfg, applied = apply_family_defaults(built, defaults)
    assert cfg.train.batch_size == 8 and built.train.lr == Config().train.lr and cfg.train.lr == defaults["train.lr"]


def test_inspect_an_encoder_dataset_with_many_labels(tiny_encoder, tmp_path, capsys):
    from conftest import run_main, write_jsonl

    rows = [{"text": f"message number {i} about topic {i % 40}", "label": f"intent_{i % 40}"} for i in range(400)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    code, stdout, stderr = run_main(["inspect", "--model", str(tiny_encoder), "--train", str(train), "--json"], capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert len(report["labels"]) == 40 and report["tokens"]["input_only"] and report["tokens"]["truncated_prompts"] == 0
