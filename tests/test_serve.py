"""The HTTP server: a real uvicorn on a free loopback port, real HTTP requests, real (tiny) models.

Most tests share one in-process server with two adapters over one base model ("a": the trained adapter,
"b": a copy with its LoRA update negated). One test runs ``python -m loratune serve`` end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import ROOT
from hypothesis import HealthCheck, settings

from loratune.errors import LoratuneError
from loratune.serve import MicroBatcher, ShuttingDown, check_adapters, create_app, load_pool, parse_adapter_specs

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CHARS, MAX_BATCH = 200, 8
TEXTS = [
    "I was charged twice for my subscription.",
    "The app crashes on startup.",
    "Can't log in after resetting my password",
    "parcel never arrived",
    "Do you have a store in Leeds?",
]


# --------------------------------------------------------------------------------------------------
# Fixtures: a second adapter over the same base, the loaded pool, a live server.


@pytest.fixture(scope="module")
def adapter_a(trained) -> Path:
    return trained.adapter_dir


@pytest.fixture(scope="module")
def adapter_b(adapter_a, tmp_path_factory) -> Path:
    """The trained adapter with its LoRA update negated: same base, different answers."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("adapter-b") / "final"
    shutil.copytree(adapter_a, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module")
def pool(adapter_a, adapter_b):
    return load_pool({"a": adapter_a, "b": adapter_b}, batch_size=16)


@pytest.fixture(scope="module")
def direct(adapter_a, adapter_b):
    """Each adapter loaded on its own (merged): what the server's answers must match."""
    from loratune.predict import Classifier

    return {"a": Classifier.from_pretrained(adapter_a), "b": Classifier.from_pretrained(adapter_b)}


@contextmanager
def live_server(app, wait_ready: bool = True):
    """Run ``app`` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started or (wait_ready and httpx.get(f"{url}/readyz").status_code != 200):
            assert time.monotonic() < deadline and thread.is_alive(), "server did not become ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def live(pool):
    app = create_app(lambda: pool, api_key=KEY, max_chars=MAX_CHARS, max_batch=MAX_BATCH, max_wait_ms=10)
    with live_server(app) as url:
        yield url


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live, headers=AUTH, timeout=60) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --------------------------------------------------------------------------------------------------
# Answers.


def test_classify_one_text_and_several(client, direct):
    labels = direct["a"].labels
    one = client.post("/v1/classify", json={"text": TEXTS[0]}).json()
    assert one["model"] == "a" and one["mode"] == "score" and len(one["results"]) == 1
    many = client.post("/v1/classify", json={"texts": TEXTS, "model": "a"}).json()
    assert len(many["results"]) == len(TEXTS)
    expected = direct["a"].predict(TEXTS)
    for result, want in zip(many["results"], expected):
        assert result["label"] in labels and result["labels"] == [result["label"]]
        assert set(result["scores"]) == set(labels)
        assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert result["label"] == max(result["scores"], key=result["scores"].get)
        for label in labels:  # the merged single-adapter classifier agrees with the shared-base server
            assert result["scores"][label] == pytest.approx(want.scores[label], abs=1e-4)
    assert many["results"][0]["scores"] == pytest.approx(one["results"][0]["scores"], abs=1e-4)  # padding


def test_generate_mode(client, direct):
    body = client.post("/v1/classify", json={"texts": TEXTS[:2], "mode": "generate"}).json()
    assert body["mode"] == "generate"
    for result in body["results"]:
        assert result["scores"] is None and isinstance(result["raw"], str)
        assert result["label"] in [*direct["a"].labels, "invalid"]


def test_labels_models_and_probes(live, client, direct):
    assert client.get("/v1/labels").json() == {"model": "a", "labels": direct["a"].labels}
    assert client.get("/v1/labels", params={"model": "b"}).json()["model"] == "b"
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["default"]) for m in models] == [("a", True), ("b", False)]
    assert models[0]["labels"] == direct["a"].labels
    # Probes need no key; everything else does, the docs included.
    assert httpx.get(f"{live}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{live}/readyz").json() == {"status": "ready"}
    assert "swagger" in client.get("/docs").text.lower()
    assert "/v1/classify" in client.get("/openapi.json").json()["paths"]


def test_two_adapters_over_one_base_answer_by_name(client, direct):
    answers = {name: client.post("/v1/classify", json={"texts": TEXTS, "model": name}).json()["results"] for name in ("a", "b")}
    for name in ("a", "b"):
        for result, want in zip(answers[name], direct[name].predict(TEXTS)):
            assert result["scores"] == pytest.approx(want.scores, abs=1e-4)
    assert any(ra["scores"] != pytest.approx(rb["scores"], abs=1e-3) for ra, rb in zip(answers["a"], answers["b"]))


def test_unknown_model_is_404(client):
    error = assert_error(client.post("/v1/classify", json={"text": "hi", "model": "nope"}), 404, "model_not_found")
    assert "'nope'" in error["message"] and "'a'" in error["message"] and "'b'" in error["message"]
    assert_error(client.get("/v1/labels", params={"model": "nope"}), 404, "model_not_found")
    assert "'modle'" in assert_error(client.get("/v1/labels", params={"modle": "b"}), 422)["message"]


# --------------------------------------------------------------------------------------------------
# Bad input: always a 4xx with a JSON error body, never a 500.


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"text": ""}, 422, "invalid_request"),
        ({"text": "   \n"}, 422, "invalid_request"),
        ({"text": 5}, 422, "invalid_request"),
        ({"text": None}, 422, "invalid_request"),
        ({"texts": []}, 422, "invalid_request"),
        ({"texts": ["fine", 3]}, 422, "invalid_request"),
        ({"texts": "not a list"}, 422, "invalid_request"),
        ({"text": "a", "texts": ["b"]}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ({"txt": "typo"}, 422, "invalid_request"),
        ({"text": "ok", "mode": "nonsense"}, 422, "invalid_request"),
        ({"text": "ok", "model": 7}, 422, "invalid_request"),
        ([1, 2], 422, "invalid_request"),
        ({"text": "x" * (MAX_CHARS + 1)}, 422, "invalid_request"),
        ({"texts": ["ok"] * (MAX_BATCH + 1)}, 422, "invalid_request"),
        ({"texts": ["ok", "x" * (MAX_CHARS + 1)]}, 422, "invalid_request"),
    ],
)
def test_bad_json_bodies(client, body, status, code):
    error = assert_error(client.post("/v1/classify", json=body), status, code)
    if "x" * MAX_CHARS in json.dumps(body):
        assert "at most 200 characters (the server's --max-chars)" in error["message"]
    if isinstance(body, dict) and isinstance(body.get("texts"), list) and len(body["texts"]) > MAX_BATCH:
        assert "(the server's --max-batch)" in error["message"]


@pytest.mark.parametrize(
    "content,content_type,status,code",
    [
        (b'{"text": ', "application/json", 400, "malformed_json"),
        (b'{"text": "caf\xff"}', "application/json", 400, None),  # not UTF-8
        (b'{"text": "\\ud800 lone surrogate"}', "application/json", 422, "invalid_request"),
        (b'{"\\ud800": 1}', "application/json", 422, "invalid_request"),  # echoed in the message: still valid JSON
        (b"", "application/json", 422, "invalid_request"),
        (b'{"text": "hi"}', "text/plain", 415, "unsupported_media_type"),
        (b"text=hi", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),  # curl -d without -H
        (b'{"text": "hi"}', None, 415, "unsupported_media_type"),
        (b"[" * 100_000, "application/json", 413, "too_large"),  # larger than any valid request
    ],
)
def test_bad_raw_bodies(client, content, content_type, status, code):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(client.post("/v1/classify", content=content, headers=headers), status, code)


def test_streamed_oversized_body_is_refused(client):
    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'{"text": "'
        for _ in range(200):
            yield b"x" * 10_000
        yield b'"}'

    assert_error(client.post("/v1/classify", content=chunks(), headers={"Content-Type": "application/json"}), 413, "too_large")


def test_wrong_method_and_unknown_path(client):
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")
    assert_error(client.get("/no/such/route"), 404, "not_found")


# --------------------------------------------------------------------------------------------------
# API key.


def test_api_key_is_required_and_checked(live):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-API-Key": KEY}):
        for method, path in (
            ("POST", "/v1/classify"),
            ("GET", "/v1/labels"),
            ("GET", "/openapi.json"),
            ("GET", "/v1/stats"),
            ("GET", "/nope"),
        ):
            response = httpx.request(method, f"{live}{path}", json={"text": "hi"}, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{live}/v1/classify", json={"text": "hi"}, headers=AUTH).status_code == 200


# --------------------------------------------------------------------------------------------------
# Throughput: micro-batching.


def test_200_concurrent_requests_are_micro_batched_without_mixing_adapters(client, live, direct):
    n = 200
    jobs = [("a" if i % 3 else "b", TEXTS[i % len(TEXTS)]) for i in range(n)]
    before = client.get("/v1/stats").json()

    async def send_all():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=live, headers=AUTH, limits=limits, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/v1/classify", json={"text": text, "model": model}) for model, text in jobs))

    started = time.perf_counter()
    responses = asyncio.run(send_all())
    elapsed = time.perf_counter() - started
    after = client.get("/v1/stats").json()
    assert [r.status_code for r in responses] == [200] * n
    passes = after["forward_passes"] - before["forward_passes"]
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == n
    assert passes < n and batches < n, (passes, batches)
    print(f"\n{n} concurrent requests: {batches} micro-batches, {passes} forward passes, {n / elapsed:.0f} requests/s")
    # A batch mixing adapters would score some texts with the wrong adapter.
    expected = {(m, t): direct[m].predict([t])[0].scores for m in ("a", "b") for t in TEXTS}
    for (model, text), response in zip(jobs, responses):
        result = response.json()
        assert result["model"] == model
        assert result["results"][0]["scores"] == pytest.approx(expected[model, text], abs=1e-4)


def _echo_batcher(batches: list, max_batch: int = 4, max_wait_s: float = 0.05, delay: float = 0.0):
    def run(key, items):
        batches.append((key, list(items)))
        time.sleep(delay)
        return [f"{key}:{item}" for item in items]

    return MicroBatcher(run, max_batch, max_wait_s)


def test_batcher_groups_by_key_caps_batches_and_routes_results():
    batches: list = []

    async def main():
        batcher = _echo_batcher(batches)
        batcher.start()
        jobs = [("x", [1]), ("y", [2]), ("x", [3, 4]), ("x", [5]), ("x", [6]), ("y", [7, 8, 9, 10, 11])]
        results = await asyncio.gather(*(batcher.submit(key, items) for key, items in jobs))
        await batcher.stop()
        return jobs, results

    jobs, results = asyncio.run(main())
    for (key, items), (answers, size) in zip(jobs, results):
        assert answers == [f"{key}:{i}" for i in items] and size >= len(items)
    assert all(len(items) <= 4 for key, items in batches if key == "x")  # the oversized y job ran alone
    assert sorted(i for _, items in batches for i in items) == list(range(1, 12))
    assert len(batches) < len(jobs)
    key_of = {i: key for key, items in jobs for i in items}
    assert all(key_of[i] == key for key, items in batches for i in items)  # no batch mixes keys


def test_batcher_drains_on_stop_then_refuses_work():
    batches: list = []

    async def main():
        batcher = _echo_batcher(batches, max_batch=2, max_wait_s=0.0, delay=0.05)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit("k", [i])) for i in range(6)]
        await asyncio.sleep(0.01)  # the first batch is running, the rest are queued
        await batcher.stop()
        assert all(p.done() for p in pending)
        with pytest.raises(ShuttingDown):
            await batcher.submit("k", [99])
        return [p.result()[0] for p in pending]

    assert asyncio.run(main()) == [[f"k:{i}"] for i in range(6)]


def test_batcher_failure_reaches_every_request_in_the_batch_and_the_loop_goes_on():
    calls = []

    def run(key, items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    async def main():
        batcher = MicroBatcher(run, 8, 0.02)
        batcher.start()
        first = await asyncio.gather(batcher.submit("k", [1]), batcher.submit("k", [2]), return_exceptions=True)
        second = await batcher.submit("k", [3])
        await batcher.stop()
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) for e in first) and second == ([3], 1)


# --------------------------------------------------------------------------------------------------
# Loading: readiness, failures, adapters that cannot share a base.


def test_readyz_is_503_while_loading_and_200_after(pool):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return pool

    with live_server(create_app(slow_load), wait_ready=False) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert_error(httpx.get(f"{url}/readyz"), 503, "loading")
        assert_error(httpx.post(f"{url}/v1/classify", json={"text": "hi"}), 503, "loading")
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.post(f"{url}/v1/classify", json={"text": "hi"}).status_code == 200


def test_load_failure_is_reported_not_hidden():
    told = threading.Event()

    def broken():
        raise LoratuneError("adapter x is corrupt")

    with live_server(create_app(broken, on_load_error=lambda exc: told.set()), wait_ready=False) as url:
        assert told.wait(10)
        error = assert_error(httpx.get(f"{url}/readyz"), 503, "load_failed")
        assert "adapter x is corrupt" in error["message"]


def test_adapter_specs():
    assert parse_adapter_specs(["out/final"]) == {"default": Path("out/final")}
    assert parse_adapter_specs(["a=x/final", "b=y/final"]) == {"a": Path("x/final"), "b": Path("y/final")}
    assert parse_adapter_specs(["runs/lr=1e-3/final"]) == {"default": Path("runs/lr=1e-3/final")}
    with pytest.raises(LoratuneError, match="given twice"):
        parse_adapter_specs(["x/final", "y/final"])
    with pytest.raises(LoratuneError, match="name must be"):
        parse_adapter_specs(["bad name=x"])


def _copy_with_meta(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "loratune.json").read_text())
    meta.update(changes)
    (dst / "loratune.json").write_text(json.dumps(meta))
    return dst


def test_adapters_of_different_bases_are_refused_at_startup(adapter_a, tmp_path, run_cli):
    other = _copy_with_meta(adapter_a, tmp_path / "other", base_model="google/flan-t5-small")
    with pytest.raises(LoratuneError, match="different base models"):
        check_adapters({"a": adapter_a, "o": other})
    resized = _copy_with_meta(adapter_a, tmp_path / "resized", base_config_fingerprint="0123456789abcdef")
    with pytest.raises(LoratuneError, match="architecture or vocabulary"):
        check_adapters({"a": adapter_a, "r": resized})
    # Through the CLI: one line, exit 2, nothing loaded.
    result = run_cli("serve", "--adapter", f"a={adapter_a}", "--adapter", f"o={other}", "--port", "0", timeout=60)
    assert result.returncode == 2 and "different base models" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_startup_errors_stop_the_server_with_one_line_and_exit_2(adapter_a, tmp_path, run_cli):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        result = run_cli("serve", "--adapter", adapter_a, "--port", busy.getsockname()[1], timeout=60)
    assert result.returncode == 2 and "cannot listen on 127.0.0.1" in result.stderr
    result = run_cli("serve", "--adapter", tmp_path / "nope", timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr
    # Weights that fail to load in the background: logged, then the server stops with the same one line.
    corrupt = shutil.copytree(adapter_a, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    result = run_cli("serve", "--adapter", corrupt, "--port", "0", timeout=120)
    assert result.returncode == 2, result.stderr
    assert '"event": "load_failed"' in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: cannot load adapter {corrupt}")


# --------------------------------------------------------------------------------------------------
# The real command: env API key, JSON logs, SIGTERM finishes in-flight requests.


def test_cli_serve_end_to_end_with_graceful_shutdown(adapter_a):
    env = {**os.environ, "LORATUNE_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    # --batch-size 4: the slow requests below take many forward passes, so SIGTERM surely lands mid-way.
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratune", "serve", "--adapter", str(adapter_a), "--port", "0", "--batch-size", "4"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            url = next((json.loads(x)["url"] for x in list(lines) if '"event": "listening"' in x), None)
            time.sleep(0.05)
        assert url.startswith("http://127.0.0.1:")  # localhost unless told otherwise
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        assert_error(httpx.post(f"{url}/v1/classify", json={"text": "hi"}), 401, "unauthorized")
        ok = httpx.post(f"{url}/v1/classify", json={"text": "hi"}, headers=AUTH).json()
        assert ok["model"] == "default" and ok["results"][0]["label"]

        # Slow requests in flight, then SIGTERM: every one must still be answered.
        big = {"texts": [" ".join(TEXTS) * 8] * 16}
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, f"{url}/v1/classify", json=big, headers=AUTH, timeout=120) for _ in range(6)]
            while httpx.get(f"{url}/v1/stats", headers=AUTH).json()["in_flight"] < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    assert codes == [200] * 6
    assert any("Finished server process" in x for x in lines), "".join(lines)
    log = [json.loads(x) for x in lines if x.startswith("{")]
    requests = [r for r in log if r.get("path") == "/v1/classify" and r["status"] == 200]
    assert {"method", "path", "status", "latency_ms", "batch_size", "texts", "model"} <= set(requests[0])
    shutdown_at = next(i for i, x in enumerate(lines) if "Shutting down" in x)
    answered_after = [x for x in lines[shutdown_at:] if '"/v1/classify"' in x]
    assert answered_after, "no request was still in flight at SIGTERM; the test proved nothing"


# --------------------------------------------------------------------------------------------------
# Property-based fuzzing of the OpenAPI schema: no input makes it answer 500.


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_fuzz_finds_no_server_errors(live, mode):
    """Schemathesis draws requests from the served schema (valid ones, and ones that break it) for every
    operation and runs all its checks: no 5xx, status codes, content types and bodies as documented."""
    from hypothesis import given
    from schemathesis import GenerationMode

    # Built in the test (not @schema.parametrize): its lazy pytest loader does not work with pytest 9.
    # Every request carries the right key (auth has its own test), so the fuzzing reaches the handlers.
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json", headers=AUTH, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/classify", "/v1/labels", "/readyz"}
    for operation in operations:
        if mode == "negative" and not (operation.body or operation.query):
            continue  # nothing to break in GET /healthz

        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(headers=AUTH)

        check()
