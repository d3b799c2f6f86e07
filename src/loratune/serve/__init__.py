"""HTTP server for trained adapters.

    loratune serve --adapter outputs/lora/final                          # http://127.0.0.1:8000/docs
    loratune serve --adapter billing=runs/a/final --adapter triage=runs/b/final   # two adapters, one base

Requests are answered by a :class:`~loratune.predict.Classifier`. Concurrent requests are gathered into
micro-batches (up to ``predict.batch_size`` texts, or whatever arrived within ``max_wait_ms``), and each batch
is one forward pass, run by ONE worker: a child process by default (``serve.model_process``), so the event
loop never waits for the GIL a forward pass holds, and only one copy of the model is in memory. Several
adapters share one base model through PEFT's multi-adapter API; a batch never mixes adapters. The model loads
in the background: ``/healthz`` answers at once, ``/readyz`` says 503 until it is loaded.
Under overload the queue is bounded (``serve.max_queue`` texts) and the HTTP layer admits at most that many
requests plus one batch: beyond it requests get a ready-made 503 with ``Retry-After`` before they are
parsed, and work whose client left or whose ``X-Timeout-Ms`` passed is dropped before its forward pass.

Modules: ``app`` (FastAPI routes), ``batcher`` (bounded micro-batching), ``schemas`` (bodies and errors),
``middleware`` (access log, API key, body limit), ``pool`` (adapters over one base), ``protocol`` (uvicorn's
h11 with read timeouts, TCP_NODELAY, JSON 400s, admission and the drain on SIGTERM), ``worker`` (the model
process), ``run`` (``loratune serve``).
"""

from .app import Admission, create_app
from .batcher import DeadlineExceeded, MicroBatcher, QueueFull, ShuttingDown
from .pool import ModelPool, check_adapters, load_pool, parse_adapter_specs
from .run import listen, pool_loader, run, server_config
from .worker import ModelUnavailable, WorkerPool

__all__ = [
    "Admission",
    "DeadlineExceeded",
    "MicroBatcher",
    "ModelPool",
    "ModelUnavailable",
    "QueueFull",
    "ShuttingDown",
    "WorkerPool",
    "check_adapters",
    "create_app",
    "listen",
    "load_pool",
    "parse_adapter_specs",
    "pool_loader",
    "run",
    "server_config",
]
