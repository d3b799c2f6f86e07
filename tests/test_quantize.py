"""--quantize int8: dynamic int8 Linear layers of the merged model, for predict, evaluate, compare and serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA, LABELS, TINY_FIXTURES, read_jsonl, run_main

from loratune.config import load_config, validate
from loratune.errors import LoratuneError
from loratune.predict import Classifier
from loratune.quantize import int8_twin, is_int8

TEXTS = [r["text"] for r in read_jsonl(DATA / "test.jsonl")][:96]


@pytest.mark.parametrize("family", list(TINY_FIXTURES))
def test_int8_quantizes_every_linear_layer_and_mostly_agrees_with_fp32(request, family):
    import torch

    model = request.getfixturevalue(TINY_FIXTURES[family])
    fp32 = Classifier.from_pretrained(model, labels=LABELS)
    int8 = Classifier.from_pretrained(model, labels=LABELS, quantize="int8")
    assert is_int8(int8.model) and not is_int8(fp32.model)
    linears = [m for m in int8.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in fp32.model.modules())
    assert int8.device.type == "cpu"
    p32, p8 = fp32.predict_proba(TEXTS), int8.predict_proba(TEXTS)
    assert np.allclose(p8.sum(1), 1.0)
    assert not np.array_equal(p32, p8)  # it really ran in int8
    # Random weights give near-uniform label scores, the hardest case for agreement; a trained adapter agrees
    # far more (see test_evaluate_reports_int8_beside_fp32).
    assert (p32.argmax(1) == p8.argmax(1)).mean() >= 0.75


def test_int8_twin_leaves_the_fp32_classifier_alone(tiny_causal):
    fp32 = Classifier.from_pretrained(tiny_causal, labels=LABELS)
    before = fp32.predict_proba(TEXTS[:8])
    twin = int8_twin(fp32)
    assert is_int8(twin.model) and not is_int8(fp32.model)
    assert twin.labels == fp32.labels and twin.name.endswith("int8")
    assert np.array_equal(fp32.predict_proba(TEXTS[:8]), before)


def test_int8_generates_text(tiny_t5):
    clf = Classifier.from_pretrained(tiny_t5, labels=LABELS, quantize="int8", max_new_tokens=4)
    predictions = clf.predict(TEXTS[:2], mode="generate")
    assert all(p.raw is not None and p.scores is None for p in predictions)


def test_int8_refuses_a_gpu_an_unmerged_model_and_unknown_values(tiny_t5):
    with pytest.raises(LoratuneError, match="CPU only"):
        Classifier.from_pretrained(tiny_t5, labels=LABELS, quantize="int8", device="cuda")
    with pytest.raises(LoratuneError, match="must be (none, int8 or bf16|one of none, int8, bf16)"):
        Classifier.from_pretrained(tiny_t5, labels=LABELS, quantize="int4")
    cfg = load_config(overrides={"predict.quantize": "int8", "predict.merge": False})
    with pytest.raises(LoratuneError, match="needs predict.merge true"):
        validate(cfg)
    cfg = load_config(overrides={"predict.quantize": "fp8"})
    with pytest.raises(LoratuneError, match="--quantize"):
        validate(cfg)


def test_cli_rejects_a_bad_quantize_value_in_one_line(capsys):
    code, _, err = run_main(["predict", "hello", "--model", "tiny", "--labels", "a,b", "--quantize", "int4"], capsys)
    assert code == 2 and "predict.quantize (--quantize) must be one of none, int8" in err


def test_serve_refuses_int8_for_several_adapters(trained, capsys):
    adapter = trained.adapter_dir
    args = ["serve", "--adapter", f"a={adapter}", "--adapter", f"b={adapter}", "--quantize", "int8", "--port", "0"]
    code, _, err = run_main(args, capsys)
    assert code == 2 and "serves one adapter" in err


def test_serve_pool_quantizes_a_single_adapter(trained):
    import httpx
    from test_serve import live_server

    from loratune.serve import create_app, load_pool

    pool = load_pool({"default": trained.adapter_dir}, quantize="int8")
    clf = pool.classifiers["default"]
    assert is_int8(clf.model)
    with live_server(create_app(lambda: pool)) as url:
        models = httpx.get(f"{url}/v1/models", timeout=60).json()["models"]
        answer = httpx.post(f"{url}/v1/classify", json={"text": TEXTS[0]}, timeout=60).json()
    assert models[0]["quantize"] == "int8"
    assert answer["results"][0]["label"] == clf.predict(TEXTS[0])[0].label


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_evaluate_reports_the_reduced_precision_row_beside_fp32(trained, tmp_path, capsys, precision):
    out = tmp_path / "eval"
    code, stdout, err = run_main(
        ["evaluate", "--adapter", trained.adapter_dir, "--quantize", precision, "--output-dir", out, "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert [r["model"] for r in report["results"]] == ["adapter", f"adapter {precision}"]
    assert all(r["device"] == "cpu" for r in report["results"])
    (row,) = report["int8"]  # the reduced-precision rows, whichever precision
    assert row["model"] == "adapter" and row["int8_model"] == f"adapter {precision}" and row["precision"] == precision
    assert row["mode"] == "score" and row["n"] == report["n"]
    # The tiny T5 (d_model 64, 40% accurate after its short run) leaves many near-ties that int8 rounding
    # flips; full-size models agree more (docs/BENCHMARKS.md).
    assert row["top1_agreement"] >= 0.75 and row["max_prob_diff"] > 0
    full, reduced = report["results"]
    assert abs(full["accuracy"] - reduced["accuracy"]) <= 1 - row["top1_agreement"] + 1e-9
    assert f"{precision} vs fp32 (adapter, score): same prediction on" in (out / "report.md").read_text()


def test_compare_adds_an_int8_row_for_the_adapter_only(trained, tmp_path, capsys):
    code, stdout, err = run_main(
        [
            "compare",
            "--adapter",
            trained.adapter_dir,
            "--quantize",
            "int8",
            "--mode",
            "score",
            "--baseline",
            "none",
            "--output-dir",
            tmp_path / "cmp",
        ],
        capsys,
    )
    assert code == 0, err
    assert "int8 vs fp32 (adapter, score): same prediction on" in stdout
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [r["model"] for r in report["results"]] == ["base", "adapter", "adapter int8"]
    assert [(r["model"], r["mode"]) for r in report["int8"]] == [("adapter", "score")]
    assert set(report["disagreements"]) == {"score"}  # still base vs adapter


@pytest.mark.slow
def test_bench_deployer_quick_writes_ctranslate2_rows_or_says_why_not(run_cli, tmp_path):
    result = run_cli("bench", "--deployer", "--quick", "--output-dir", tmp_path, "--json", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    rows = {(r["name"], r["precision"]) for r in report["rows"]}
    assert {("loratune score", "fp32"), ("loratune score", "int8")} <= rows
    if report["skipped"] is None:  # CTranslate2 installed: its float32 scores are loratune's, to fp32 rounding
        assert report["agreement"]["CTranslate2 float32 vs loratune fp32"]["top1_agreement"] == 1.0
        assert report["agreement"]["CTranslate2 float32 vs loratune fp32"]["max_abs_diff"] < 1e-2
    else:
        assert "ctranslate2 is not installed" in report["skipped"]
    assert "| target |" in (tmp_path / "deployer_quick.md").read_text()


def test_low_int8_agreement_is_called_out():
    from loratune.quantize import describe

    row = {"model": "adapter", "mode": "score", "n": 100, "top1_agreement": 0.2, "max_prob_diff": 0.97, "speedup": 2.1}
    assert "int8 changes this model's answers" in describe(row)
    assert "changes" not in describe(row | {"top1_agreement": 0.97})


@pytest.mark.parametrize("family", list(TINY_FIXTURES))
def test_bf16_casts_the_model_and_mostly_agrees_with_fp32(request, family):
    import torch

    model = request.getfixturevalue(TINY_FIXTURES[family])
    fp32 = Classifier.from_pretrained(model, labels=LABELS)
    bf16 = Classifier.from_pretrained(model, labels=LABELS, quantize="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16} and bf16.device.type == "cpu"
    p32, p16 = fp32.predict_proba(TEXTS), bf16.predict_proba(TEXTS)
    assert p16.dtype == p32.dtype and np.allclose(p16.sum(1), 1.0)
    assert not np.array_equal(p32, p16)  # it really ran in bf16
    assert (p32.argmax(1) == p16.argmax(1)).mean() >= 0.75  # random tiny weights: near-ties (see the int8 test)


def test_bf16_refuses_a_gpu(tiny_t5):
    with pytest.raises(LoratuneError, match="bf16 is for the CPU"):
        Classifier.from_pretrained(tiny_t5, labels=LABELS, quantize="bf16", device="cuda")
