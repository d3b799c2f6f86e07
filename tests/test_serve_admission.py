"""Admission control in the HTTP layer, and the model in its own process (issue 16, overload targets).

Admission counts classify requests let in and not yet answered, not only texts in the queue: requests still on
their way to the queue (their body arriving, or waiting for the event loop) count too, so under overload a new
request is refused with a ready-made 503 before it is parsed, instead of piling up in the event loop.
"""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import httpx
import pytest
from conftest import LABELS
from test_serve_overload import WAIT, raw_exchange, serving, stats

from loratune.serve import Admission, MicroBatcher, ModelPool, create_app


@pytest.fixture(scope="module")
def classifier(tiny_t5):
    from loratune.predict import Classifier

    return Classifier.from_pretrained(tiny_t5, batch_size=4, labels=LABELS)


def _admission(max_queue: int, max_batch: int) -> tuple[Admission, SimpleNamespace]:
    state = SimpleNamespace(batcher=MicroBatcher(lambda key, items: items, max_batch, 0.0, max_queue), refused=0)
    return Admission(SimpleNamespace(state=state)), state


def _split(reply: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_admission_counts_requests_until_answered_and_refuses_beyond_queue_plus_one_batch():
    admission, state = _admission(max_queue=3, max_batch=2)
    assert [admission.enter() for _ in range(5)] == [None] * 5  # 3 queued + a batch of 2 being computed
    refusal = admission.enter()
    status, headers, body = _split(refusal)
    assert (status, body["error"]["code"]) == (503, "overloaded")
    assert int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert state.refused == 1 and admission.admitted == 5
    admission.leave()  # one answered: room for exactly one more
    assert admission.enter() is None and admission.enter() is not None


def test_admission_refuses_when_the_queue_is_full_of_texts():
    admission, state = _admission(max_queue=3, max_batch=2)
    state.batcher.waiting = 3  # one request of 3 texts fills the queue
    assert admission.enter() is not None


def test_admission_lets_everything_in_while_loading_or_unbounded():
    admission, state = _admission(max_queue=1, max_batch=1)
    state.batcher = None  # loading: the app answers 503 loading itself
    assert all(admission.enter() is None for _ in range(10))
    state.batcher = MicroBatcher(lambda key, items: items, 1, 0.0, None)
    assert admission.enter() is None and state.refused == 0


def _stall(app, sockets, head: bytes) -> None:
    """Each socket sends a request's headers and only part of its body; returns once the server let them all in."""
    for sock in sockets:
        sock.sendall(head + b'{"text"')
    deadline = time.monotonic() + WAIT
    while app.state.admission.admitted < len(sockets):
        assert time.monotonic() < deadline, "the stalled requests were never let in"
        time.sleep(0.01)


def test_requests_still_arriving_count_and_the_refusal_comes_before_parsing(classifier):
    # max_queue 1 + batch 4 (the classifier's): 5 requests may be in. Five connections send their headers and
    # only part of the body: nothing is queued yet (the old check, queued texts, let a sixth in).
    app = create_app(lambda: ModelPool({"a": classifier}), max_queue=1, max_wait_ms=0)
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    with serving(app) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        stalled = [socket.create_connection((host, int(port))) for _ in range(5)]
        try:
            _stall(app, stalled, head)
            assert stats(url)["queued_texts"] == 0
            # Not even valid JSON: refused unread, so a 503, not a 400 malformed_json.
            reply, _ = raw_exchange(url, head + b"not json at all!!!!!", WAIT)
            status, headers, body = _split(reply)
            assert (status, body["error"]["code"]) == (503, "overloaded") and int(headers["retry-after"]) >= 1
            assert httpx.get(f"{url}/healthz").status_code == 200  # probes are never refused
            stalled.pop().close()  # a client that leaves frees its place
            deadline = time.monotonic() + WAIT
            while app.state.admission.admitted > 4:
                assert time.monotonic() < deadline, "a closed connection kept its place"
                time.sleep(0.01)
            assert httpx.post(f"{url}/v1/classify", json={"text": "now there is room"}, timeout=WAIT).status_code == 200
        finally:
            for sock in stalled:
                sock.close()
    assert app.state.refused == 1


def test_model_process_answers_like_the_in_process_pool_and_stops_with_the_server(trained):
    from loratune.config import load_config
    from loratune.serve import WorkerPool, pool_loader

    adapters = {"default": trained.adapter_dir}
    texts = ["I was charged twice", "the app crashes", "where is my parcel"]
    local = pool_loader(adapters, load_config(overrides={"serve.model_process": False}))()
    remote = pool_loader(adapters, load_config(overrides={"serve.model_process": True, "serve.model_threads": 1}))()
    assert isinstance(remote, WorkerPool) and remote.pid != __import__("os").getpid()
    try:
        assert remote.default == "default" and remote.classifiers["default"].labels == local.classifiers["default"].labels
        passes = []
        got = remote.predict("default", texts, "score", progress=passes.append)
        want = local.predict("default", texts, "score")
        assert [p.label for p in got] == [p.label for p in want]
        for g, w in zip(got, want):
            assert max(abs(g.scores[k] - w.scores[k]) for k in w.scores) < 1e-6
        assert passes == [len(texts)]
    finally:
        remote.close()
    assert remote._process.exitcode == 0


@pytest.mark.integration  # starts a process
def test_a_model_process_that_cannot_load_reports_the_sentence(tmp_path):
    import functools

    from loratune.errors import LoratuneError
    from loratune.serve import WorkerPool, load_pool

    try:
        WorkerPool(functools.partial(load_pool, {"default": tmp_path / "missing"}), threads=1)
    except LoratuneError as exc:
        assert "missing" in str(exc)
    else:
        raise AssertionError("a missing adapter loaded")


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the server closed the connection without an answer"
    return chunk


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(x.split(b":")[1]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-length:"))
    while len(body) < length:
        body += _recv(sock)
    return head + b"\r\n\r\n" + body


def test_sigterm_answers_a_request_on_a_connection_between_requests_instead_of_cutting_it(classifier, monkeypatch):
    from loratune.serve.protocol import TimedH11Protocol

    monkeypatch.setattr(TimedH11Protocol, "drain_s", WAIT)  # the window, long here so the test does not race it
    app = create_app(lambda: ModelPool({"a": classifier}))
    with serving(app) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock, socket.create_connection((host, int(port))) as silent:
            sock.settimeout(WAIT)
            silent.settimeout(WAIT)  # accepted, nothing sent yet (the protocol has not built its HTTP state)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _split(_read_response(sock))[0] == 200  # kept alive, between requests
            wait_until = time.monotonic() + WAIT
            while len(server.server_state.connections) < 2:
                assert time.monotonic() < wait_until, "the silent connection was never accepted"
                time.sleep(0.01)
            server.should_exit = True  # what SIGTERM does
            deadline = time.monotonic() + WAIT
            while True:  # the listener closes first, then connections are told to shut down
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                except OSError:
                    break
                assert time.monotonic() < deadline, "the server never stopped listening"
                time.sleep(0.01)
            body = json.dumps({"text": "sent as the server stops"}).encode()
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            silent.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            for conn in (sock, silent):
                status, headers, error = _split(_read_response(conn))
                assert (status, error["error"]["code"]) == (503, "shutting_down") and headers["retry-after"] == "1"
                assert conn.recv(1) == b""  # then closed


def _pipelined(*requests: bytes) -> bytes:
    return b"".join(requests)


def _responses(sock: socket.socket, n: int) -> list[bytes]:
    """The next ``n`` whole responses on ``sock`` (several may come in one read)."""
    stream, out = sock.makefile("rb"), []
    for _ in range(n):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = stream.readline()
            assert line, "the server closed the connection without an answer"
            head += line
        length = next(int(x.split(b":")[1]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-length:"))
        out.append(head + stream.read(length))
    return out


def _classify_bytes(text: str) -> bytes:
    body = json.dumps({"text": text}).encode()
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body


def test_pipelined_requests_count_against_the_bound_each(classifier):
    # Several requests in one TCP write on one kept-alive connection: each classify request goes through admission,
    # not only the first of the write.
    app = create_app(lambda: ModelPool({"a": classifier}), max_queue=1, max_wait_ms=0)
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
    with serving(app) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:  # room: both answered, one after the other
            sock.settimeout(WAIT)
            sock.sendall(_pipelined(_classify_bytes("first of two"), _classify_bytes("second of two")))
            assert [_split(reply)[0] for reply in _responses(sock, 2)] == [200, 200]
        deadline = time.monotonic() + WAIT  # each left once answered (just after its response was written)
        while app.state.admission.admitted:
            assert time.monotonic() < deadline, "an answered pipelined request kept its place"
            time.sleep(0.01)
        stalled = [socket.create_connection((host, int(port))) for _ in range(5)]  # the bound: 1 queued + 1 batch of 4
        try:
            _stall(app, stalled, head)
            with socket.create_connection((host, int(port))) as sock:  # full: a probe, then a classify behind it
                sock.settimeout(WAIT)
                sock.sendall(_pipelined(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", _classify_bytes("pipelined past the bound")))
                probe, refusal = _responses(sock, 2)
                assert _split(probe)[0] == 200
                status, headers, body = _split(refusal)
                assert (status, body["error"]["code"]) == (503, "overloaded") and headers["connection"] == "close"
                assert sock.recv(1) == b""  # then closed
        finally:
            for sock in stalled:
                sock.close()
    assert app.state.refused == 1
