"""The model in its own process, so the server's event loop never waits for the GIL a forward pass holds.

In one process, a forward pass of a small model is mostly Python, and the batcher's worker thread holds the GIL
for most of it: under load the event loop that accepts, parses and refuses requests waited for the model, and
the model for the loop (docs/SERVING.md, "Overload"). :class:`WorkerPool` runs the :class:`ModelPool` in a
child process (spawned, so no threads or sockets are inherited) and answers the same calls through a pipe: the
batcher's worker thread blocks on the pipe with the GIL released. Texts go one way, predictions the other
(pickled, a few kB per batch). The child ignores SIGINT/SIGTERM (the server drains and closes it) and exits
when the pipe closes, so it never outlives the server.
"""

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LoratuneError


@dataclass
class ClassifierInfo:
    """What the app reads of a classifier living in the worker process."""

    labels: list[str]
    multi_label: bool
    meta: object
    batch_size: int


def model_threads(cpus: int | None = None) -> int:
    """Threads for the model's forward passes: every core but one, which is left to the event loop."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus - 1)


class WorkerPool:
    """A :class:`~loratune.serve.pool.ModelPool` in a child process: the same ``predict``/``warm_up``/metadata.

    ``load`` must be picklable (a module-level function, or a ``functools.partial`` of one) and return a
    ModelPool; it runs in the child. Construction blocks until the models are loaded (call it off the loop).
    """

    def __init__(self, load: Callable[[], object], threads: int | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_end, load, threads), name="loratune-model", daemon=True)
        self._process.start()
        child_end.close()  # the child's end lives in the child only: its exit is an EOF here
        self._lock = threading.Lock()
        kind, *payload = self._receive()
        if kind == "error":
            self.close()
            raise payload[0]
        self.classifiers: dict[str, ClassifierInfo] = payload[0]
        self.default = next(iter(self.classifiers))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def batch_size(self) -> int:
        return min(c.batch_size for c in self.classifiers.values())

    def warm_up(self, mode: str) -> None:
        for name in self.classifiers:
            self.predict(name, ["warm-up"], mode)

    def predict(self, name: str, texts: list[str], mode: str, progress=None) -> list:
        with self._lock:  # one batch at a time, like the in-process pool
            self._conn.send((name, texts, mode))
            kind, *payload = self._receive()
        if kind == "error":
            raise payload[0]
        predictions, passes = payload
        if progress is not None:
            for _ in range(passes):
                progress(len(texts))
        return predictions

    def _receive(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode
            raise LoratuneError(f"the model process stopped (exit status {code})") from None

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (after the batch it is running, if any)."""
        try:
            self._conn.send(None)
        except OSError:
            pass  # it is gone already
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _serve(conn, load: Callable[[], object], threads: int | None) -> None:
    """The child: load, report the models, then answer batches until the pipe closes or says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a group SIGTERM reach the server, which drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the queue into this process and then closes it
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        pool = load()
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    infos = {
        name: ClassifierInfo(c.labels, c.multi_label, c.meta, c.batch_size)
        for name, c in pool.classifiers.items()  # type: ignore[attr-defined]
    }
    conn.send(("ready", infos))
    passes = [0]

    def count(_n: int) -> None:
        passes[0] += 1

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if message is None:
            return
        name, texts, mode = message
        passes[0] = 0
        try:
            predictions = pool.predict(name, texts, mode, progress=count)  # type: ignore[attr-defined]
        except Exception as exc:
            conn.send(("error", _portable(exc)))
        else:
            conn.send(("ok", predictions, passes[0]))


def _portable(exc: BaseException) -> Exception:
    """An exception that pickles: a LoratuneError keeps its sentence, anything else becomes a RuntimeError."""
    if isinstance(exc, LoratuneError):
        return LoratuneError(str(exc))
    return RuntimeError(f"{type(exc).__name__}: {exc}")
