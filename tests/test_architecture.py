"""The architecture's promises: one registry of families, one prompt owner, one metadata type, one config path.

Fast: no training. The dropped-setting regressions build classifiers from a saved adapter without training one.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS

from loratune.adapter import FORMAT, AdapterMeta
from loratune.errors import LoratuneError
from loratune.families import FAMILIES, family_class
from loratune.prompt import CUT_MARKER, PromptSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "loratune"
MANY_LABELS = [f"intent {w} {i}" for i, w in enumerate(("alpha beta gamma delta epsilon zeta eta theta iota kappa " * 16).split())]


def test_only_the_registry_compares_family_names():
    names = "|".join(FAMILIES)
    pattern = re.compile(rf"""[!=]=\s*["']({names})["']|["']({names})["']\s*[!=]=|\bin\s*[(\[{{]\s*["']({names})["']""")
    offenders = [
        f"{p.relative_to(SRC)}:{n}"
        for p in SRC.rglob("*.py")
        if "families" not in p.parts
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_no_source_module_is_a_monolith():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 450} == {}


def test_prompt_spec_round_trips_and_renders_the_canonical_prompt():
    spec = PromptSpec(tuple(LABELS), task="You route tickets.", input_name="ticket", max_length=300, answer_cue="\n\nLabel:\n")
    assert PromptSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    rendered = spec.render("Where is my parcel?")
    assert rendered.startswith("You route tickets.") and rendered.endswith("Ticket:\nWhere is my parcel?\n\nLabel:\n")
    assert PromptSpec(tuple(LABELS), input_only=True).render("  just the text ") == "just the text"


@pytest.fixture(scope="module")
def tiny_causal_long(tmp_path_factory, demo_rows):
    """The tiny causal LM with a position table long enough for a 160-label prompt."""
    from loratune.fixtures import build_tiny_causal, tokenizer_corpus

    out = tmp_path_factory.mktemp("tiny-causal-long")
    return build_tiny_causal(out, tokenizer_corpus([r["text"] for r in demo_rows["train"]], MANY_LABELS), max_position_embeddings=4096)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_no_text_is_lost_with_many_labels(family_name, request, tiny_causal_long):
    """At 160 labels the instruction and label list stay whole, and the text's last token reaches the model."""
    from transformers import AutoConfig, AutoTokenizer

    from loratune.models import resolve_max_length

    path = {"seq2seq": request.getfixturevalue("tiny_t5"), "causal": tiny_causal_long, "encoder": request.getfixturevalue("tiny_encoder")}[
        family_name
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    family_cls = family_class(family_name)
    if family_name == "causal":
        tokenizer.pad_token = tokenizer.eos_token
    max_length = resolve_max_length(None if family_name != "seq2seq" else 2048, AutoConfig.from_pretrained(str(path)))
    spec = family_cls.make_spec(tokenizer, MANY_LABELS, chat_template="off", max_length=max_length)
    family = family_cls(None, tokenizer, spec)
    text = "my card was declined twice " * 400 + "zebra quokka"
    out = family.prompt_ids(["short question", text])
    assert out.cut[0] == 0 and out.cut[1] > 0 and all(len(x) <= max_length for x in out.ids)
    decoded = tokenizer.decode(out.ids[1], skip_special_tokens=True)
    assert decoded.rstrip().endswith("zebra quokka") or "zebra quokka\n\nLabel:" in decoded
    assert CUT_MARKER.strip() in decoded
    if not spec.input_only:
        assert all(label in decoded for label in MANY_LABELS)
    assert family_name != "encoder" or spec.input_only  # encoders read the text alone by default


def test_a_fixed_part_that_does_not_fit_is_refused_with_token_counts(tiny_t5):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_t5))
    family = family_class("seq2seq")(None, tokenizer, PromptSpec(tuple(MANY_LABELS), max_length=512))
    with pytest.raises(
        LoratuneError,
        match=r"the 160 label names take \d+ tokens, leaving fewer than 16 of "
        r"data.max_length=512 .*encoder family",
    ):
        family.prompt_ids(["any text"])


def test_max_length_defaults_to_the_models_limit_and_refuses_more(tiny_encoder, tiny_t5):
    from transformers import AutoConfig

    from loratune.models import resolve_max_length

    bert = AutoConfig.from_pretrained(str(tiny_encoder))
    assert resolve_max_length(None, bert) == bert.max_position_embeddings
    assert resolve_max_length(None, AutoConfig.from_pretrained(str(tiny_t5))) == 512  # relative positions
    with pytest.raises(LoratuneError, match="more than this model's limit"):
        resolve_max_length(bert.max_position_embeddings + 1, bert)


# --------------------------------------------------------------------------------------------------
# AdapterMeta


def meta_dict(**changes) -> dict:
    spec = PromptSpec(tuple(LABELS))
    meta = AdapterMeta(base_model="/models/x", family="seq2seq", spec=spec).to_dict()
    meta.update(changes)
    return meta


def test_adapter_meta_round_trips():
    meta = AdapterMeta.from_dict(meta_dict(threshold=0.3))
    assert meta.to_dict() == meta_dict(threshold=0.3) and meta.labels == LABELS and meta.spec.max_length == 512


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": FORMAT + 1}, "written by a newer loratune"),
        ({"format": "two"}, "unknown format"),
        ({"labels": 5}, "'labels' must be a list"),
        ({"labels": []}, "at least two distinct"),
        ({"labels": ["a", "a"]}, "at least two distinct"),
        ({"base_model": 123}, "'base_model' must be a str"),
        ({"prompt": {}}, "prompt.task must be a string"),
        ({"family": "rnn"}, "unknown family"),
        ({"threshold": 7}, "'threshold' must be a number in"),
    ],
)
def test_damaged_metadata_is_refused_in_one_sentence(changes, message):
    with pytest.raises(LoratuneError, match=message) as info:
        AdapterMeta.from_dict(meta_dict(**changes), "x/loratune.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("x/loratune.json")


def test_missing_key_and_bad_max_length_are_refused():
    data = meta_dict()
    del data["family"]
    with pytest.raises(LoratuneError, match="missing key 'family'"):
        AdapterMeta.from_dict(data)
    data = meta_dict()
    data["prompt"]["max_length"] = "abc"
    with pytest.raises(LoratuneError, match="max_length must be an integer >= 8"):
        AdapterMeta.from_dict(data)


def test_format_1_metadata_is_read_with_its_prompt():
    old = {
        "format": 1,
        "base_model": "m",
        "family": "causal",
        "labels": LABELS,
        "multi_label": False,
        "prompt": {"task": "T.", "input_name": "message", "chat_template": False},
        "max_length": 384,
    }
    meta = AdapterMeta.from_dict(old)
    assert meta.spec.max_length == 384 and meta.spec.answer_cue == "\n\nLabel:\n" and not meta.spec.input_only
    assert meta.spec.format("hi").startswith("T.\n\nGiven a message")


# --------------------------------------------------------------------------------------------------
# classifier_from_config: settings the earlier hand-made copies dropped.


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tiny_t5):
    """An untrained (zero-init) LoRA adapter saved as loratune does, with a non-default budget of 200 tokens."""
    from loratune.models import attach_lora, load_base

    base = load_base(str(tiny_t5))
    out = tmp_path_factory.mktemp("adapter")
    attach_lora(base.model, "seq2seq", 4, 8, 0.0).save_pretrained(out)
    base.tokenizer.save_pretrained(out)
    AdapterMeta(base_model=str(tiny_t5), family="seq2seq", spec=PromptSpec(tuple(LABELS), max_length=200)).write(out)
    return out


def test_the_base_of_an_adapter_reads_the_adapters_prompt_and_budget(saved_adapter):
    from loratune.config import Config
    from loratune.predict import classifier_from_config

    cfg = Config()
    tuned = classifier_from_config(cfg, saved_adapter)
    base = classifier_from_config(cfg, saved_adapter, base_only=True)
    assert base.spec == tuned.spec and base.spec.max_length == 200  # was: the base ran at 384
    # Zero-initialised LoRA: base and adapter are the same function, so their scores agree.
    texts = ["I was charged twice", "parcel lost"]
    np.testing.assert_allclose(base.score(texts), tuned.score(texts), atol=1e-4)


def test_prediction_settings_reach_the_base_and_the_server(saved_adapter):
    from loratune.config import Config, PredictConfig
    from loratune.predict import classifier_from_config
    from loratune.serve import load_pool

    cfg = Config(predict=PredictConfig(threshold=0.8, allow_empty=True, batch_size=3))
    base = classifier_from_config(cfg, saved_adapter, base_only=True)
    assert (base.threshold, base.settings.allow_empty, base.batch_size) == (0.8, True, 3)  # was: dropped
    pool = load_pool({"a": saved_adapter}, cfg.predict)
    served = pool.classifiers["a"]
    assert (served.threshold, served.settings.allow_empty) == (0.8, True)  # was: serve ignored both


def test_an_adapter_refuses_labels_it_was_not_trained_on(saved_adapter):
    from loratune.config import Config
    from loratune.predict import classifier_from_config

    cfg = Config()
    cfg.data.labels = ["spam", "ham"]
    with pytest.raises(LoratuneError, match="drop --labels"):
        classifier_from_config(cfg, saved_adapter)


def test_public_functions_stay_callable_after_their_submodule_is_imported():
    import subprocess
    import sys

    code = (
        "import loratune.train, loratune.evaluate, loratune\n"
        "from loratune import train, evaluate\n"
        "from loratune.train import train as fn\n"
        "assert callable(loratune.train) and callable(train) and callable(evaluate)\n"
        "try:\n"
        "    loratune.train(None)\n"
        "except Exception as exc:\n"
        "    assert 'not callable' not in str(exc), exc\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
