import json
import os

import pytest
from conftest import DATA, LABELS

SUBCOMMANDS = ["inspect", "train", "predict", "evaluate", "compare", "serve", "demo"]


def test_help_lists_the_subcommands(run_cli):
    result = run_cli("-h")
    assert result.returncode == 0
    for name in [*SUBCOMMANDS, "bench"]:
        assert name in result.stdout


def test_bench_help(run_cli):
    result = run_cli("bench", "--help")
    assert result.returncode == 0
    assert "--quick" in result.stdout and "--output-dir" in result.stdout and "--device" in result.stdout


@pytest.mark.slow
def test_bench_quick_writes_results_with_targets(run_cli, tmp_path):
    result = run_cli("bench", "--quick", "--output-dir", tmp_path, "--json", timeout=900)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert {t["target"] for t in report["targets"]} and all(isinstance(t["met"], bool) for t in report["targets"])
    missed = [t["target"] for t in report["targets"] if not t["met"]]
    assert result.returncode == (1 if missed else 0)  # a missed target fails the command, named on stderr
    assert all(name in result.stderr.splitlines()[-1] for name in missed)
    assert (tmp_path / "bench_quick.json").is_file() and "## Targets" in (tmp_path / "bench_quick.md").read_text()


def test_cli_bounds_openmp_spinning_unless_told_otherwise(monkeypatch):
    from loratune.cli import openmp_defaults

    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    openmp_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    openmp_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == "300000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    openmp_defaults()
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_shared_flags_mean_the_same_everywhere(run_cli, command):
    text = run_cli(command, "--help").stdout
    assert "--config" in text and "--model" in text


def test_inspect_demo_data(run_cli):
    result = run_cli("inspect", "--model", "tiny", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["labels"] == ["account", "billing", "other", "shipping", "technical"]  # from the data, sorted
    n_train = sum(1 for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip())
    assert sum(report["counts"]["train"].values()) == report["n"]["train"] == n_train
    tokens = report["tokens"]
    assert tokens["prompt"]["p50"] <= tokens["prompt"]["p90"] <= tokens["prompt"]["max"]
    assert tokens["truncated_prompts"] == 0
    assert report["examples"][0]["prompt"].startswith("You are a text classifier.")
    assert "RANDOM weights" in result.stderr  # --model tiny says loudly that its scores mean nothing


def test_inspect_table_output_and_truncation_count(run_cli):
    result = run_cli("inspect", "--model", "tiny", "--set", "data.max_length=96", "-n", "1", "--input-name", "ticket")
    assert result.returncode == 0, result.stderr
    assert "billing" in result.stdout and "p95" in result.stdout and "truncated" in result.stdout
    assert "texts are cut in the middle to fit; nothing else is cut" in result.stdout
    assert "Ticket:" in result.stdout
    # A budget the instruction and labels alone overflow is reported with its token counts, not cut.
    result = run_cli("inspect", "--model", "tiny", "--set", "data.max_length=64", "--json")
    assert result.returncode == 0 and "tokens, leaving fewer than 16 of data.max_length=64" in result.stdout


def test_inspect_csv_with_field_mapping(run_cli, tmp_path):
    csv_path = tmp_path / "tickets.csv"
    csv_path.write_text(
        'text,category\n"Refund me, now",billing\nApp is down,technical\nWrong size,shipping\n'
        "Love it,other\nreset my password,account\nInvoice twice,billing\n",
        encoding="utf-8",
    )
    result = run_cli(
        "inspect",
        "--train",
        csv_path,
        "--label-field",
        "category",
        "--val",
        "none",
        "--set",
        "data.val_fraction=0.2",
        "--model",
        "tiny",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"]["train"] + report["n"]["val"] == 6


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"text": "ok", "label": "billing"}\n{"text": "broken"\n', "bad.jsonl:2: invalid JSON"),
        (b'{"text": "ok", "label": "billing"}\n{"text": "no label"}\n', "bad.jsonl:2: missing field 'label'"),
        (b'{"text": "ok", "label": "refunds"}\n', "bad.jsonl:1: label 'refunds' is not in the label set"),
        (b'{"text": "", "label": "billing"}\n', "bad.jsonl:1: field 'text' is empty"),
        (b"", "bad.jsonl: file is empty"),
        (b'{"text": "ok", "label": "billing"}\n{"text": "na\xefve", "label": "other"}\n', "bad.jsonl:2: not valid UTF-8"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "train"])
def test_malformed_data_exits_2_with_file_and_line(run_cli, tmp_path, content, message, command):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "out"
    result = run_cli(
        command,
        "--train",
        bad,
        "--val",
        "none",
        "--model",
        "tiny",
        "--labels",
        ",".join(LABELS),
        *(["--output-dir", out] if command == "train" else []),
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists()  # nothing written


def test_bad_flag_value_exits_2(run_cli):
    result = run_cli("train", "--lora-r", "0", "--model", "tiny")
    assert result.returncode == 2 and "lora.r must be >= 1" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("predict", "x", "--mode", "guess", "--model", "tiny")
    assert result.returncode == 2 and "predict.mode" in result.stderr


def test_unknown_flag_is_a_usage_error(run_cli):
    result = run_cli("train", "--no-such-flag")
    assert result.returncode == 2 and "No such option" in result.stderr


def test_predict_text_file_and_stdin(run_cli, trained, tmp_path):
    result = run_cli("predict", "I was charged twice", "--adapter", trained.adapter_dir, "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["text"] == "I was charged twice" and len(row["scores"]) == 2 and row["label"] in row["scores"]

    lines = tmp_path / "in.txt"
    lines.write_text("refund please\nthe app froze\n")
    result = run_cli("predict", "--input", lines, "--adapter", trained.adapter_dir, "--json", "--mode", "generate")
    rows = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["refund please", "the app froze"]
    assert all(r["scores"] is None and isinstance(r["raw"], str) for r in rows)

    result = run_cli("predict", "--adapter", trained.adapter_dir, "--json", input="one\ntwo\nthree\n")
    assert [json.loads(x)["text"] for x in result.stdout.splitlines()] == ["one", "two", "three"]

    result = run_cli("predict", "parcel lost", "--adapter", trained.adapter_dir)
    assert result.returncode == 0 and "parcel lost" in result.stdout


def test_predict_with_missing_adapter_exits_2(run_cli, tmp_path):
    result = run_cli("predict", "hi", "--adapter", tmp_path / "nope")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_compare_writes_the_three_report_files(run_cli, trained, small_data, tmp_path):
    out = tmp_path / "report"
    result = run_cli("compare", "--adapter", trained.adapter_dir, "--test", small_data["test"], "--output-dir", out)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "report.md" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "confusion_adapter_generate.png",
        "confusion_adapter_score.png",
        "confusion_base_generate.png",
        "confusion_base_score.png",
        "confusion_embeddings_logreg_score.png",  # the frozen-embedding baseline row (MiniLM from the dev extra)
        "report.json",
        "report.md",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 60 and len(report["results"]) == 5


def test_evaluate_one_model(run_cli, trained, small_data, tmp_path):
    result = run_cli("evaluate", "--adapter", trained.adapter_dir, "--test", small_data["test"], "--json", "--output-dir", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [(r["model"], r["mode"]) for r in report["results"]] == [("adapter", "score")]
    assert (tmp_path / "ev" / "report.md").is_file()


def test_demo_with_tiny_model_runs_the_main_job_offline(run_cli, tmp_path):
    # A short run keeps the suite fast; the full-length demo is timed for the README instead.
    result = run_cli("demo", "--model", "tiny", "--output-dir", tmp_path / "demo", "--max-steps", "30", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("1/4 inspect", "2/4 train", "3/4 compare", "4/4 sample predictions"):
        assert step in result.stdout
    assert (tmp_path / "demo" / "lora" / "final" / "adapter_model.safetensors").is_file()
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert {r["model"] for r in report["results"]} == {"base", "adapter", "embeddings+logreg"}
    assert result.stdout.startswith("model: tiny (--model)")  # the demo says which model it runs
    assert "RANDOM weights" in result.stderr
