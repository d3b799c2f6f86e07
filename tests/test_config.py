from pathlib import Path

import pytest

from loratune.config import Config, load_config, parse_set_options, validate
from loratune.errors import LoratuneError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_documents_every_default():
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


def test_every_yaml_key_has_a_comment():
    for line in (ROOT / "configs" / "default.yaml").read_text().splitlines():
        if line.startswith("  ") and ":" in line and not line.strip().startswith("#"):
            assert "#" in line, f"undocumented config key: {line.strip()}"


def test_overrides_beat_file_and_are_typed(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.01\n  epochs: 2\ndata:\n  labels: [a, b]\n")
    cfg = load_config(cfg_file, {"train.lr": "3e-4", "lora.r": "4", "data.val": "none", "train.group_by_length": "no"})
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 2.0
    assert cfg.lora.r == 4 and cfg.data.labels == ["a", "b"]
    assert cfg.data.val is None and cfg.train.group_by_length is False


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.nope", 1, "unknown config key 'train.nope'"),
        ("nope.lr", 1, "unknown config key 'nope.lr'"),
        ("lora.r", "many", "lora.r must be an integer"),
        ("train.group_by_length", "maybe", "must be true or false"),
    ],
)
def test_bad_override_names_the_key(key, value, message):
    with pytest.raises(LoratuneError, match=message):
        load_config(overrides={key: value})


def test_validate_reports_every_problem_at_once():
    cfg = load_config(overrides={"lora.r": 0, "train.lr": 5, "predict.mode": "guess", "model.family": "rnn"})
    with pytest.raises(LoratuneError) as err:
        validate(cfg, training=True)
    text = str(err.value)
    for part in ("lora.r", "train.lr", "predict.mode", "model.family"):
        assert part in text


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(LoratuneError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_set_option_parsing():
    assert parse_set_options(["train.lr=0.1", "data.labels=a,b"]) == {"train.lr": "0.1", "data.labels": "a,b"}
    with pytest.raises(LoratuneError, match="section.key=value"):
        parse_set_options(["train.lr"])
