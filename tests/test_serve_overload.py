"""The server under overload and hostile clients: bounded queue, dropped work, read timeouts, TCP_NODELAY.

A real uvicorn (with loratune's protocol) on a loopback port over a real tiny random T5, untrained: these
tests are about which work runs, not what it answers. A wrapper around the classifier's ``predict`` records
every text the model is asked about, and can hold the worker so that a queue builds up behind it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from conftest import LABELS

from loratune.serve import DeadlineExceeded, MicroBatcher, ModelPool, create_app, listen, server_config

WAIT = 30  # seconds any wait in these tests may take before it counts as a hang


class Recorder:
    """Wraps ``clf.predict``: records each batch of texts, and holds the worker while ``hold`` is cleared."""

    def __init__(self, clf):
        self.predict = clf.predict
        self.seen: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        clf.predict = self

    def __call__(self, texts, mode=None, progress=None):
        self.entered.set()
        assert self.hold.wait(WAIT), "the test never released the worker"
        self.seen.extend(texts)
        return self.predict(texts, mode=mode, progress=progress)


@pytest.fixture(scope="module")
def classifier(tiny_t5):
    from loratune.predict import Classifier

    return Classifier.from_pretrained(tiny_t5, batch_size=4, labels=LABELS)


@pytest.fixture
def recorder(classifier):
    rec = Recorder(classifier)
    yield rec
    rec.hold.set()
    classifier.predict = rec.predict


@contextmanager
def serving(app, read_timeout_s: float = 15.0, sock: socket.socket | None = None):
    """``app`` under uvicorn with loratune's server settings, in a thread; yields (base URL, uvicorn server)."""
    import uvicorn

    sock = sock or listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(server_config(app, read_timeout_s, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT
        while not server.started or httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not become ready"
            time.sleep(0.02)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(WAIT)
        sock.close()


def post(url: str, texts: list[str], **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json={"texts": texts}, timeout=kwargs.pop("timeout", WAIT), **kwargs)


def stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats").json()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def held_worker(url: str, recorder: Recorder, pool: ThreadPoolExecutor):
    """A first request holds the model's worker thread until the block ends; yields that request's future."""
    recorder.hold.clear()
    recorder.entered.clear()
    first = pool.submit(post, url, ["the request that holds the worker"])
    assert recorder.entered.wait(WAIT)
    try:
        yield first
    finally:
        recorder.hold.set()


# --------------------------------------------------------------------------------------------------
# Bounded queue.


def test_full_queue_answers_503_with_retry_after_at_once(classifier, recorder):
    app = create_app(lambda: ModelPool({"a": classifier}), max_queue=4, max_wait_ms=0)
    with serving(app) as (url, _), ThreadPoolExecutor(8) as pool:
        with held_worker(url, recorder, pool) as first:
            queued = [pool.submit(post, url, [f"queued {i}"]) for i in range(3)]
            wait_for(lambda: stats(url)["queued_texts"] == 3, "3 queued texts")
            # 3 waiting + 2 more > 4: refused by the batcher, after the body is read.
            started = time.perf_counter()
            refused = post(url, ["too", "many"])
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
            queued.append(pool.submit(post, url, ["fits exactly"]))
            wait_for(lambda: stats(url)["queued_texts"] == 4, "a full queue")
            # Full: refused before the body is read.
            shed = post(url, ["one more"])
            elapsed = time.perf_counter() - started
            assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded", shed.text
            unread = httpx.post(f"{url}/v1/classify", content=b'{"texts": [', headers={"Content-Type": "application/json"})
            assert unread.status_code == 503, "a full server parsed a body it could not serve"  # not 400 malformed_json
            for response in (refused, shed):
                assert int(response.headers["retry-after"]) >= 1
            assert elapsed < WAIT / 3, "a refusal waited for the queue"  # the worker is held for up to WAIT s
        answers = [f.result() for f in [first, *queued]]
    assert [r.status_code for r in answers] == [200] * 5
    assert stats_after(app)["refused"] == 3
    assert not {"too", "many", "one more"} & set(recorder.seen)


def stats_after(app) -> dict:
    state = app.state
    return {"refused": state.refused, "dropped": state.batcher.dropped if state.batcher else 0}


# --------------------------------------------------------------------------------------------------
# Work nobody waits for is dropped before the forward pass.


def test_expired_deadline_is_dropped_before_the_forward_pass(classifier, recorder):
    app = create_app(lambda: ModelPool({"a": classifier}), max_wait_ms=0)
    with serving(app) as (url, _), ThreadPoolExecutor(4) as pool:
        with held_worker(url, recorder, pool):
            late = pool.submit(post, url, ["deadline victim"], headers={"X-Timeout-Ms": "150"})
            patient = pool.submit(post, url, ["patient client"], headers={"X-Timeout-Ms": "60000"})
            wait_for(lambda: stats(url)["queued_texts"] == 2, "2 queued texts")
            time.sleep(0.3)  # past the first one's deadline, while the worker is still busy
        late, patient = late.result(), patient.result()
        for bad in ("soon", "0", "-5", "nan", "inf"):
            refused = post(url, ["x"], headers={"X-Timeout-Ms": bad})
            assert refused.status_code == 422 and "X-Timeout-Ms" in refused.json()["error"]["message"], refused.text
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded", late.text
    assert patient.status_code == 200
    assert "patient client" in recorder.seen and "deadline victim" not in recorder.seen
    assert stats_after(app)["dropped"] == 1


def test_disconnected_client_work_is_dropped_and_frees_its_room(classifier, recorder, caplog):
    app = create_app(lambda: ModelPool({"a": classifier}), max_wait_ms=0, max_queue=8)
    with caplog.at_level(logging.INFO, logger="loratune.serve"), serving(app) as (url, _), ThreadPoolExecutor(4) as pool:
        with held_worker(url, recorder, pool):
            with pytest.raises(httpx.ReadTimeout):
                post(url, ["gone victim"] * 3, timeout=0.5)  # httpx closes the connection on timeout
            wait_for(lambda: stats(url)["queued_texts"] == 0, "the gone client's texts to leave the queue")
            assert stats(url)["in_flight"] == 1  # only the request holding the worker
    assert "gone victim" not in recorder.seen
    assert stats_after(app)["dropped"] == 1
    # The access log says the client left (499), not that the server failed (500).
    statuses = [json.loads(r.getMessage())["status"] for r in caplog.records if '"/v1/classify"' in r.getMessage()]
    assert sorted(statuses) == [200, 499], statuses


def test_batcher_drops_expired_and_cancelled_jobs_unrun():
    ran: list = []

    def run(key, items):
        ran.extend(items)
        time.sleep(0.1)
        return items

    async def main():
        batcher = MicroBatcher(run, max_batch=1, max_wait_s=0.0, max_queue=10)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", ["first"]))
        await asyncio.sleep(0.02)  # "first" is running
        expired = asyncio.ensure_future(batcher.submit("k", ["expired"], deadline=time.monotonic() + 0.03))
        cancelled = asyncio.ensure_future(batcher.submit("k", ["cancelled"]))
        kept = asyncio.ensure_future(batcher.submit("k", ["kept"]))
        await asyncio.sleep(0.01)
        assert batcher.waiting == 3
        cancelled.cancel()
        await asyncio.sleep(0)
        assert batcher.waiting == 2  # a cancelled job frees its room before the loop reaches it
        results = await asyncio.gather(first, expired, kept, return_exceptions=True)
        await batcher.stop()
        return results, batcher.dropped

    (first, expired, kept), dropped = asyncio.run(main())
    assert first == (["first"], 1) and kept == (["kept"], 1) and isinstance(expired, DeadlineExceeded)
    assert ran == ["first", "kept"] and dropped == 2


# --------------------------------------------------------------------------------------------------
# Limits in characters, not in escaped bytes.


def test_limits_count_characters_not_escaped_bytes(classifier):
    app = create_app(lambda: ModelPool({"a": classifier}), max_chars=4000, max_batch=64)
    body = json.dumps({"texts": ["\N{GRINNING FACE}" * 4000] * 64})  # ensure_ascii: 12 bytes per emoji
    assert len(body) > 3_000_000
    with serving(app) as (url, _):
        headers = {"Content-Type": "application/json"}
        ok = httpx.post(f"{url}/v1/classify", content=body, headers=headers, timeout=120)
        assert ok.status_code == 200, ok.text[:300]
        assert len(ok.json()["results"]) == 64
        too_long = httpx.post(f"{url}/v1/classify", json={"text": "\N{GRINNING FACE}" * 4001}, timeout=WAIT)
        assert too_long.status_code == 422 and "--max-chars" in too_long.json()["error"]["message"]
        padded = body[:-1] + " " * 200_000 + "}"  # no valid request is this large: still refused unread
        assert httpx.post(f"{url}/v1/classify", content=padded, headers=headers, timeout=WAIT).status_code == 413


# --------------------------------------------------------------------------------------------------
# The connection level: TCP_NODELAY, read timeouts, malformed HTTP.


def nodelay(sock) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_tcp_nodelay_on_the_listening_socket_and_every_connection(classifier):
    """Without TCP_NODELAY each keep-alive response waited ~40 ms for the client's delayed ACK (issue 16)."""
    with listen("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname()) as _client:
        assert nodelay(sock)
        accepted, _ = sock.accept()
        with accepted:
            assert nodelay(accepted)
    # A socket bound elsewhere (as a test harness or systemd would): the protocol sets it per connection.
    plain = socket.create_server(("127.0.0.1", 0))
    assert not nodelay(plain)
    with serving(create_app(lambda: ModelPool({"a": classifier})), sock=plain) as (url, server):
        with httpx.Client(base_url=url) as client:
            assert client.get("/healthz").status_code == 200
            connections = list(server.server_state.connections)
            assert connections and all(nodelay(c.transport.get_extra_info("socket")) for c in connections)


def raw_exchange(url: str, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection, then read until the server closes it; (reply, seconds to close)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(wait_s)
        started = time.perf_counter()
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply, time.perf_counter() - started


def json_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)["error"]


def test_requests_that_never_arrive_whole_are_timed_out(classifier):
    with serving(create_app(lambda: ModelPool({"a": classifier})), read_timeout_s=0.5) as (url, _):
        partial_headers = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
        reply, seconds = raw_exchange(url, partial_headers, WAIT)
        assert json_error(reply)[0] == 408 and 0.4 < seconds < 5
        partial_body = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        reply, seconds = raw_exchange(url, partial_body, WAIT)
        status, error = json_error(reply)
        assert (status, error["code"]) == (408, "request_timeout") and 0.4 < seconds < 5
        reply, seconds = raw_exchange(url, b"", WAIT)  # connected, silent: closed without an answer
        assert reply == b"" and 0.4 < seconds < 5
        # A request that arrives in time is untouched by the timer, also on a kept-alive connection.
        with httpx.Client(base_url=url) as client:
            for _ in range(2):
                assert client.post("/v1/classify", json={"text": "in time"}).status_code == 200
                time.sleep(0.3)


def test_malformed_http_gets_a_json_400(classifier):
    with serving(create_app(lambda: ModelPool({"a": classifier}))) as (url, _):
        for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000):
            status, error = json_error(raw_exchange(url, garbage, WAIT)[0])
            assert (status, error["code"]) == (400, "bad_request"), error


# --------------------------------------------------------------------------------------------------
# Settings from the config reach the classifiers (they were dropped: issue 12).


@pytest.mark.integration
def test_serve_passes_threshold_and_allow_empty_from_the_config(trained, tmp_path):
    import shutil

    from loratune.config import load_config
    from loratune.serve import pool_loader

    adapter = trained.adapter_dir
    other = shutil.copytree(adapter, tmp_path / "other")
    # In this process, to read the classifiers' settings (tests/test_serve_admission.py covers the model process).
    overrides = {"predict.threshold": 0.85, "predict.allow_empty": True, "predict.batch_size": 3, "serve.model_process": False}
    cfg = load_config(overrides=overrides)
    for adapters in ({"default": adapter}, {"a": adapter, "b": other}):  # merged single adapter; shared base
        pool = pool_loader(adapters, cfg)()
        assert [(c.threshold, c.settings.allow_empty, c.batch_size) for c in pool.classifiers.values()] == [(0.85, True, 3)] * len(adapters)
    # Unset, the adapter's own (calibrated or default) threshold stays.
    pool = pool_loader({"default": adapter}, load_config(overrides={"serve.model_process": False}))()
    assert pool.classifiers["default"].threshold == trained_threshold(adapter)


def trained_threshold(adapter) -> float:
    from loratune.predict import DEFAULT_THRESHOLD

    return json.loads((adapter / "loratune.json").read_text()).get("threshold", DEFAULT_THRESHOLD)
