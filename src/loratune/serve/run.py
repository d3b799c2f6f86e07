"""Running the server: the ``loratune serve`` command."""

import functools
import json
import logging
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import Config
from ..errors import LoratuneError
from .app import create_app, log
from .pool import ModelPool, check_adapters, load_pool
from .protocol import protocol_class
from .worker import WorkerPool, model_threads

BACKLOG = 2048
"""Connections the kernel holds before accept (uvicorn's default): a burst beyond it waits seconds for SYN retries."""
GRACEFUL_SHUTDOWN_S = 30


def run(adapters: Mapping[str, Path], cfg: Config, *, base_model: str | None = None, api_key: str | None = None) -> None:
    """Check the adapters, listen on ``cfg.serve.host:port``, load in the background, serve until SIGTERM/SIGINT.

    ``base_model`` overrides the adapters' recorded base model (``--model``). JSON log lines go to stderr.
    """
    import uvicorn

    check_adapters(adapters, base_model, cfg.predict.quantize)  # metadata only: adapters that cannot share a base fail at once
    s = cfg.serve
    sock = listen(s.host, s.port)
    _log_to_stderr()

    def stop(_exc: BaseException) -> None:
        server.should_exit = True

    app = create_app(
        pool_loader(adapters, cfg, base_model),
        api_key=api_key,
        max_chars=s.max_chars,
        max_batch=s.max_batch,
        max_wait_ms=s.max_wait_ms,
        max_queue=s.max_queue,
        default_mode=cfg.predict.mode,
        on_load_error=stop,
    )
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (for at most 30 s), then runs the
    # lifespan shutdown, which drains the batcher.
    server = uvicorn.Server(server_config(app, s.read_timeout_s, log_level="info"))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log.info(json.dumps({"event": "listening", "url": url, "docs": f"{url}/docs", "models": {n: str(p) for n, p in adapters.items()}}))
    if not api_key and s.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {s.host} without an API key: anyone who reaches this port can use it", file=sys.stderr)
    server.run(sockets=[sock])
    if app.state.load_error is not None:
        raise app.state.load_error


def pool_loader(adapters: Mapping[str, Path], cfg: Config, base_model: str | None = None) -> Callable[[], ModelPool | WorkerPool]:
    """What the server calls (in the background) to load its models, with every prediction setting from ``cfg``:
    in a child process when ``serve.model_process`` (see serve/worker.py), else in this one."""
    load = functools.partial(load_pool, dict(adapters), cfg.predict, base_model=base_model)  # picklable, for the child
    if not cfg.serve.model_process:
        return load
    threads = cfg.serve.model_threads or model_threads()
    return functools.partial(WorkerPool, load, threads, cfg.serve.model_nice)


def server_config(app, read_timeout_s: float = 15.0, **kwargs):
    """uvicorn's settings for ``app`` (from :func:`create_app`): our h11 protocol (read timeouts, TCP_NODELAY,
    JSON 400s, 503s for a full queue before the app is called), no uvicorn access log."""
    import uvicorn

    options = {"access_log": False, "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S, **kwargs}
    return uvicorn.Config(app, http=protocol_class(read_timeout_s, app.state.admission), **options)


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a busy port is a one-line error and port 0 gets a real port."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise LoratuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections (Linux)
    return sock


def _log_to_stderr() -> None:
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
