"""Seq2seq, causal (decoder-only) and encoder backbones behind one interface.

The end-to-end test is the same for every family: the real ``loratune`` entry point (run in-process, to keep
the suite fast) trains on the family's tiny fixture, then predicts and compares with the saved adapter.
"""

import json

import numpy as np
import pytest
from conftest import LABELS, TINY_FIXTURES, cli, write_jsonl

from loratune.errors import LoratuneError

FAMILIES = ["seq2seq", "causal", "encoder"]
# The tiny random encoder reads the text alone (no instruction) and needs more steps to move its loss.
STEPS = {"seq2seq": "16", "causal": "16", "encoder": "48"}
TEXTS = [
    "I was charged twice for my subscription.",
    "The app crashes on startup.",
    "Can't log in after resetting my password",
    "parcel never arrived",
    "Do you have a store in Leeds?",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_rows):
    d = tmp_path_factory.mktemp("family-data")
    return {
        "train": write_jsonl(d / "train.jsonl", demo_rows["train"][:160]),
        "val": write_jsonl(d / "val.jsonl", demo_rows["val"][:30]),
        "test": write_jsonl(d / "test.jsonl", demo_rows["test"][:30]),
    }


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, data):
    """family -> (adapter dir, train --json summary); each family trains once, through the CLI."""
    done = {}

    def get(family):
        if family not in done:
            model = request.getfixturevalue(TINY_FIXTURES[family])
            out = tmp_path_factory.mktemp(f"run-{family}")
            code, stdout, stderr = cli(
                "train",
                "--model",
                model,
                "--train",
                data["train"],
                "--val",
                data["val"],
                "--labels",
                ",".join(LABELS),
                "--output-dir",
                out,
                "--max-steps",
                STEPS[family],
                "--batch-size",
                "8",
                "--lr",
                "0.005",
                "--seed",
                "3",
                "--set",
                "train.logging_steps=4",
                "--json",
            )
            assert code == 0, stderr[-3000:]
            # Evaluation lines share stdout with the JSON summary (as in test_train's torchrun test).
            done[family] = (out / "final", json.loads(stdout[stdout.index("{") :]), model)
        return done[family]

    return get


def predict_json(*args) -> list[dict]:
    code, stdout, stderr = cli("predict", *args, "--json", "--top-k", "5")
    assert code == 0, stderr[-2000:]
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_through_the_cli(family, runs, data, tmp_path):
    adapter, summary, model = runs(family)
    # train: loss falls, a complete adapter records its family
    losses = summary["metrics"]["loss_history"]
    assert losses[-1] < losses[0], losses
    meta = json.loads((adapter / "loratune.json").read_text())
    assert meta["family"] == family and meta["labels"] == LABELS
    assert (adapter / "adapter_model.safetensors").is_file()

    # predict: labels from the set, score-mode probabilities sum to 1, and the adapter changed them
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS))
    tuned = predict_json("--input", texts_file, "--adapter", adapter)
    base = predict_json("--input", texts_file, "--model", model, "--labels", ",".join(LABELS))
    for row in tuned + base:
        assert row["label"] in LABELS and set(row["scores"]) == set(LABELS)
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    assert max(abs(t["scores"][k] - b["scores"][k]) for t, b in zip(tuned, base) for k in LABELS) > 1e-3

    # load: the saved adapter reproduces the validation accuracy measured during training
    from loratune.data import read_examples
    from loratune.predict import Classifier

    val = read_examples(data["val"])
    clf = Classifier.from_pretrained(adapter)
    accuracy = np.mean([p.label == e.label for p, e in zip(clf.predict([e.text for e in val]), val)])
    assert accuracy == pytest.approx(meta["metrics"]["best_val_accuracy"], abs=1e-9)

    # compare: base vs adapter in one report; encoders have no generate mode
    out = tmp_path / "report"
    code, _, stderr = cli("compare", "--adapter", adapter, "--test", data["test"], "--output-dir", out, "--set", "predict.max_new_tokens=4")
    assert code == 0, stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    expected_modes = ["score"] if family == "encoder" else ["score", "generate"]
    # ... and the frozen-embedding baseline fit on the same training file (the dev extra installs MiniLM).
    assert [(r["model"], r["mode"]) for r in report["results"]] == [
        (name, mode) for mode in expected_modes for name in ("base", "adapter")
    ] + [("embeddings+logreg", "score")]
    assert 0.0 <= report["results"][-1]["accuracy"] <= 1.0 and report["results"][-1]["n"] == 30
    assert (out / "report.md").is_file()


def test_encoder_has_no_generate_mode(runs):
    adapter, _, _ = runs("encoder")
    code, _, stderr = cli("predict", "refund please", "--adapter", adapter, "--mode", "generate")
    assert code == 2 and "generate mode is not applicable to encoder models" in stderr
    assert "Traceback" not in stderr


def test_compare_several_adapters_in_one_report(runs, data, tmp_path):
    causal, _, _ = runs("causal")
    encoder, _, _ = runs("encoder")
    out = tmp_path / "many"
    code, stdout, stderr = cli(
        "compare",
        "--adapter",
        causal,
        "--adapter",
        encoder,
        "--test",
        data["test"],
        "--output-dir",
        out,
        "--mode",
        "score",
        "--baseline",
        "none",
    )
    assert code == 0, stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    names = [r["model"] for r in report["results"]]
    assert len(names) == len(set(names)) == 4  # each adapter after its own base
    assert set(report["adapters"].values()) == {str(causal), str(encoder)}
    assert len(report["base_models"]) == 2
    assert "report.md" in stdout


def test_adapter_on_a_base_of_another_family_is_refused(runs, tiny_t5):
    from loratune.adapter import load_adapter

    adapter, _, _ = runs("causal")
    with pytest.raises(LoratuneError, match=r"is a causal adapter but .* is a seq2seq model"):
        load_adapter(adapter, base_model=str(tiny_t5))


def test_mean_pooled_encoder_adapter_is_not_exported_as_a_plain_model(runs, tmp_path):
    adapter, _, _ = runs("encoder")
    code, _, stderr = cli("export", "--adapter", adapter, "--format", "merged", "--output", tmp_path / "merged")
    assert code == 2 and "mean-pooled embeddings" in stderr and "model.pooling=cls" in stderr
    assert not (tmp_path / "merged").exists()


def test_encoder_adapter_on_another_encoder_is_refused(runs, tmp_path):
    from loratune.adapter import load_adapter
    from loratune.fixtures import build_tiny_encoder

    adapter, _, _ = runs("encoder")
    other = build_tiny_encoder(tmp_path / "other", ["another corpus entirely"] * 20, hidden_size=32)
    with pytest.raises(LoratuneError, match="different architecture or vocabulary"):
        load_adapter(adapter, base_model=str(other))


# --------------------------------------------------------------------------------------------------
# Causal LMs


def causal(base, chat_template: bool, labels=LABELS, model=None, **prompt):
    """The causal family over ``base`` (or ``model`` with base's tokenizer) with the default prompt."""
    from loratune.families import CausalFamily

    spec = CausalFamily.make_spec(
        base.tokenizer, labels, chat_template="on" if chat_template else "off", max_length=prompt.pop("max_length", 384), **prompt
    )
    return CausalFamily(model if model is not None else base.model, base.tokenizer, spec)


def naive_causal_scores(family):
    """One full forward pass per (prompt, label): the reference the cached scorer must match."""
    import torch

    from loratune.families.causal import causal_label_ids

    prompt_ids = family.prompt_ids(TEXTS[:3]).ids
    out = np.zeros((len(prompt_ids), len(family.spec.labels)))
    for i, p in enumerate(prompt_ids):
        for j, label in enumerate(causal_label_ids(family.tokenizer, family.spec.labels)):
            with torch.no_grad():
                logp = family.model(input_ids=torch.tensor([p + label])).logits[0].float().log_softmax(-1)
            out[i, j] = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(label))
    return out


@pytest.fixture(scope="module")
def causal_base(tiny_causal):
    from loratune.models import load_base

    base = load_base(str(tiny_causal))
    base.model.eval()
    return base


@pytest.mark.parametrize("chat_template", [True, False])
def test_cached_causal_scorer_equals_naive_full_sequences(causal_base, chat_template):
    family = causal(causal_base, chat_template)
    got = family.label_logprobs(TEXTS[:3], batch_size=3)  # different lengths: left padding inside a batch
    np.testing.assert_allclose(got, naive_causal_scores(family), atol=1e-4)


def test_cached_scorer_handles_absolute_positions_gpt2(causal_base):
    # GPT-2 adds learned absolute position embeddings: left padding must not shift them.
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = causal_base.tokenizer
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    family = causal(causal_base, False, model=gpt2)
    np.testing.assert_allclose(family.label_logprobs(TEXTS[:3], batch_size=3), naive_causal_scores(family), atol=1e-4)


def test_causal_tokenizer_gets_a_pad_token_and_left_padding_without_resizing(tiny_causal, causal_base):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tiny_causal)).pad_token is None  # like Llama and GPT-2
    tok = causal_base.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    assert causal_base.model.config.pad_token_id == tok.pad_token_id
    assert causal_base.model.get_input_embeddings().weight.shape[0] == len(tok)  # no new token, no resize


def test_causal_training_examples_mask_the_prompt_and_keep_the_eos(causal_base):
    from loratune.families.common import IGNORE_INDEX

    family = causal(causal_base, False)
    tok = causal_base.tokenizer
    texts = ["short prompt", "a somewhat longer prompt than the first one"]
    enc = family.encode(texts, ["billing", "other"])
    prompt_ids = family.prompt_ids(texts).ids
    for f, p, label in zip(enc.features, prompt_ids, ["billing", "other"]):
        assert f["input_ids"][: len(p)] == p
        assert f["labels"][: len(p)] == [IGNORE_INDEX] * len(p)
        target = f["labels"][len(p) :]
        assert target == f["input_ids"][len(p) :] and target[-1] == tok.eos_token_id
        assert tok.decode(target[:-1]).strip() == label
    batch = family.collator()(enc.features)
    short = len(enc.features[0]["input_ids"])
    # Right padding for training; the label EOS (same id as pad) stays in the loss, the padding does not.
    assert batch["labels"][0, short - 1].item() == tok.eos_token_id
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()


def test_long_causal_prompts_keep_their_instruction_labels_and_answer_cue(causal_base):
    from loratune.prompt import ANSWER_CUE, CUT_MARKER

    tok = causal_base.tokenizer
    family = causal(causal_base, False, max_length=160)
    text = "first words " + "word " * 500 + "the very last words"
    out = family.prompt_ids([text])
    (ids,) = out.ids
    assert out.n_cut == 1 and len(ids) == 160 and out.cut[0] > 400
    decoded = tok.decode(ids)
    assert decoded.endswith(ANSWER_CUE) and "the very last words" in decoded and "first words" in decoded
    assert CUT_MARKER.strip() in decoded
    assert all(f"- {label}" in decoded for label in LABELS)


def test_chat_template_setting(causal_base):
    from loratune.families.causal import resolve_chat_template
    from loratune.prompt import ANSWER_CUE

    tok = causal_base.tokenizer
    assert resolve_chat_template(tok, "auto") is True and resolve_chat_template(tok, "off") is False
    assert causal(causal_base, True).spec.render("P", tok).endswith("<|assistant|>\n")
    plain = causal(causal_base, False).spec
    assert plain.render("P", tok) == plain.format("P") + ANSWER_CUE
    template, tok.chat_template = tok.chat_template, None
    try:
        assert resolve_chat_template(tok, "auto") is False
        with pytest.raises(LoratuneError, match="no chat template"):
            resolve_chat_template(tok, "on")
    finally:
        tok.chat_template = template


def test_batched_generation_left_pads_and_decodes_only_new_tokens(causal_base):
    family = causal(causal_base, True)
    batched = family.generate(TEXTS[:3], batch_size=3, max_new_tokens=6)
    one_by_one = [family.generate([t], max_new_tokens=6)[0] for t in TEXTS[:3]]
    assert batched == one_by_one
    assert all("Customer message" not in text for text in batched)


# --------------------------------------------------------------------------------------------------
# Encoders


def test_encoder_head_is_saved_with_the_adapter_and_restored_exactly(tiny_encoder, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from loratune.families import EncoderFamily
    from loratune.models import attach_lora, load_base

    base = load_base(str(tiny_encoder), labels=LABELS)
    spec = EncoderFamily.make_spec(base.tokenizer, LABELS)
    model = attach_lora(base.model, "encoder", r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: move the LoRA weights and the new head off their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    before = EncoderFamily(model, base.tokenizer, spec).label_logprobs(TEXTS)
    model.save_pretrained(tmp_path / "adapter")
    assert any("classifier" in k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))

    fresh = load_base(str(tiny_encoder), labels=LABELS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter")).eval()
    np.testing.assert_array_equal(EncoderFamily(loaded, fresh.tokenizer, spec).label_logprobs(TEXTS), before)
    merged = loaded.merge_and_unload()
    # Merging rounds in fp32 (the random +-0.5 updates are large): equal to ~1e-5.
    np.testing.assert_allclose(EncoderFamily(merged, fresh.tokenizer, spec).label_logprobs(TEXTS), before, atol=5e-5)


def test_tiny_model_names_build_each_family():
    from loratune.families import detect_family
    from loratune.models import load_config, resolve_model_name

    for name, family in [("tiny-causal", "causal"), ("tiny-encoder", "encoder")]:
        config, _ = load_config(resolve_model_name(name, texts=TEXTS))
        assert detect_family(config) == family


def test_package_dir_instead_of_model_dir_gets_a_hint(tmp_path):
    from loratune.models import load_config

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(LoratuneError, match=r"has no config.json .*did you mean .*model"):
        load_config(str(tmp_path))
