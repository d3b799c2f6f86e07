"""A model process that dies (kill -9, the OOM killer) is restarted, and the server says 503 until it is back.

Real processes throughout: the server under uvicorn with loratune's protocol, the model in its spawned child over
the tiny trained adapter, killed with SIGKILL. No part of the model is mocked.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from test_serve_overload import post, serving, stats, wait_for

from loratune.config import load_config
from loratune.serve import ModelUnavailable, WorkerPool, create_app, load_pool, pool_loader

RESTART_WAIT = 180  # seconds a restart may take on a loaded machine before the test calls it a hang


def _error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"]


def test_a_killed_model_process_answers_503_then_is_restarted_and_serves_again(trained, caplog):
    caplog.set_level(logging.INFO, logger="loratune.serve")
    cfg = load_config(overrides={"serve.model_process": True, "serve.model_threads": 1})
    gc.unfreeze()
    app = create_app(pool_loader({"default": trained.adapter_dir}, cfg), max_wait_ms=0, max_queue=16)
    with serving(app) as (url, _), ThreadPoolExecutor(4) as pool:
        assert post(url, ["before the crash"]).status_code == 200
        # Once loaded, the server takes what it loaded out of the cyclic GC (full collections stalled refusals).
        assert gc.get_freeze_count() > 0
        (info,) = httpx.get(f"{url}/v1/models").json()["models"]  # metadata from the model process (was a 500)
        assert info["quantize"] == "none" and info["labels"]
        old_pid = app.state.pool.pid
        # Hold the child (SIGSTOP) so that one request is in its forward pass and one waits in the queue, then kill it.
        os.kill(old_pid, signal.SIGSTOP)
        computing = pool.submit(post, url, ["in the forward pass when the model dies"])
        wait_for(lambda: stats(url)["in_flight"] == 1 and stats(url)["queued_texts"] == 0, "a request in the forward pass")
        time.sleep(0.2)  # counted in flight a step before its job is queued: let the batcher hand it to the child
        queued = pool.submit(post, url, ["queued when the model dies"])
        wait_for(lambda: stats(url)["queued_texts"] == 1, "a queued request")
        os.kill(old_pid, signal.SIGKILL)
        for answer in (computing.result(), queued.result()):
            status, code, message = _error(answer)
            assert (status, code) == (503, "model_restarting"), answer.text
            assert "model process stopped" in message and message.count(". ") == 0 and answer.headers["retry-after"] == "1"
        wait_for(lambda: not app.state.pool.ready, "the pool to notice the death")
        ready = httpx.get(f"{url}/readyz")
        assert _error(ready)[:2] == (503, "model_restarting") and "killed by signal 9" in _error(ready)[2]
        status, code, _ = _error(post(url, ["sent while the model restarts"]))
        assert (status, code) == (503, "model_restarting")
        deadline = time.monotonic() + RESTART_WAIT  # a bound against a hang: a restart loads the model again
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model process was not restarted"
            time.sleep(0.1)
        assert app.state.pool.pid != old_pid
        assert post(url, ["after the restart"]).status_code == 200
        assert stats(url)["model_restarts"] == 1
    died = [r.getMessage() for r in caplog.records if "model_process_died" in r.getMessage()]
    restarts = [r.getMessage() for r in caplog.records if "model_process_restart" in r.getMessage()]
    assert len(died) == 1 and f'"pid": {old_pid}' in died[0] and "signal 9" in died[0]
    assert restarts and '"ok": true' in restarts[-1]


def test_a_model_process_that_cannot_start_again_gives_up_after_its_attempts_with_one_sentence(trained, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="loratune.serve")
    adapter = tmp_path / "adapter"
    shutil.copytree(trained.adapter_dir, adapter)
    workers = WorkerPool(functools.partial(load_pool, {"default": adapter}), threads=1, restarts=2, backoff_s=0.05)
    gave_up: list[BaseException] = []
    done = threading.Event()
    workers.on_give_up = lambda exc: (gave_up.append(exc), done.set())
    try:
        shutil.rmtree(adapter)  # the next child cannot load
        os.kill(workers.pid, signal.SIGKILL)
        assert done.wait(RESTART_WAIT), "the pool never gave up"
        assert not workers.ready
        try:
            workers.predict("default", ["x"], "score")
        except ModelUnavailable as exc:
            assert "2 attempts" in str(exc)
        else:
            raise AssertionError("a pool with no model process answered")
    finally:
        workers.close()
    assert "did not start again in 2 attempts" in str(gave_up[0])
    attempts = [r.getMessage() for r in caplog.records if "model_process_restart" in r.getMessage()]
    assert len(attempts) == 2 and all('"ok": false' in a for a in attempts)


def test_a_model_process_that_keeps_dying_after_starting_is_not_restarted_forever(trained):
    workers = WorkerPool(functools.partial(load_pool, {"default": trained.adapter_dir}), threads=1, restarts=1, backoff_s=0.05)
    gave_up: list[BaseException] = []
    done = threading.Event()
    workers.on_give_up = lambda exc: (gave_up.append(exc), done.set())
    try:
        first = workers.pid
        os.kill(first, signal.SIGKILL)  # one death: restarted
        deadline = time.monotonic() + RESTART_WAIT
        while not (workers.ready and workers.pid != first):
            assert time.monotonic() < deadline and not done.is_set(), "the first death was not restarted"
            time.sleep(0.05)
        os.kill(workers.pid, signal.SIGKILL)  # a second death within the window: more than restarts=1
        assert done.wait(RESTART_WAIT), "the pool restarted a child that keeps dying"
        assert not workers.ready and workers.restarts == 1
    finally:
        workers.close()
    assert "stopped 2 times within 300 s" in str(gave_up[0])


def test_close_does_not_wait_forever_for_a_hung_forward_pass(trained):
    workers = WorkerPool(functools.partial(load_pool, {"default": trained.adapter_dir}), threads=1)
    os.kill(workers.pid, signal.SIGSTOP)  # the child hangs: the next batch never comes back
    with ThreadPoolExecutor(1) as pool:
        batch = pool.submit(workers.predict, "default", ["never answered"], "score")
        time.sleep(0.5)  # the batch holds the pipe
        started = time.monotonic()
        workers.close(timeout_s=1.0)
        assert time.monotonic() - started < 30  # was: blocked for as long as the child hung
        try:
            batch.result(timeout=30)
        except ModelUnavailable:
            pass  # the killed child ends the batch's wait with the usual 503 error
        else:
            raise AssertionError("a batch the hung child never answered got a result")
    assert not workers._process.is_alive()


def test_the_model_process_runs_at_the_niceness_asked_for(trained):
    cfg = load_config(overrides={"serve.model_process": True, "serve.model_threads": 1, "serve.model_nice": 3})
    workers = pool_loader({"default": trained.adapter_dir}, cfg)()
    try:
        assert os.getpriority(os.PRIO_PROCESS, workers.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    finally:
        workers.close()


def test_a_niceness_out_of_range_is_one_sentence():
    from loratune.config import validate
    from loratune.errors import LoratuneError

    for bad in (-1, 20):
        try:
            validate(load_config(overrides={"serve.model_nice": bad}))
        except LoratuneError as exc:
            assert "serve.model_nice must be in 0..19" in str(exc)
        else:
            raise AssertionError(f"serve.model_nice={bad} was accepted")
