"""The model in its own process, so the server's event loop never waits for the GIL a forward pass holds.

In one process, a forward pass of a small model is mostly Python, and the batcher's worker thread holds the GIL
for most of it: under load the event loop that accepts, parses and refuses requests waited for the model, and
the model for the loop (docs/SERVING.md, "Overload"). :class:`WorkerPool` runs the :class:`ModelPool` in a
child process (spawned, so no threads or sockets are inherited) and answers the same calls through a pipe: the
batcher's worker thread blocks on the pipe with the GIL released. Texts go one way, predictions the other
(pickled, a few kB per batch). The child ignores SIGINT/SIGTERM (the server drains and closes it) and exits
when the pipe closes, so it never outlives the server.

A child that dies (kill -9, the OOM killer) is restarted: the batch it was computing and every request until a new
child is loaded get :class:`ModelUnavailable` (the app answers 503 ``model_restarting``), ``ready`` is False
meanwhile (``/readyz`` says 503), and after ``restarts`` failed attempts, ``backoff_s`` doubling between them, the
pool gives up and tells ``on_give_up`` (the server stops then: its supervisor can start a fresh one).
"""

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LoratuneError

log = logging.getLogger("loratune.serve")
RESTARTS = 5
"""Attempts to restart a model process that died, before the server gives up."""
BACKOFF_S = 0.5
"""Wait before the first restart attempt; doubled before each next one (0.5, 1, 2, 4, 8 s)."""


class ModelUnavailable(LoratuneError):
    """The model process stopped; the request was not computed (the pool is restarting it)."""


DEATH_WINDOW_S = 300.0
"""More deaths than ``restarts`` within this many seconds: the server gives up instead of restarting again."""


@dataclass
class ClassifierInfo:
    """What the app reads of a classifier living in the worker process."""

    labels: list[str]
    multi_label: bool
    meta: object
    batch_size: int
    quantize: str = "none"


def model_threads(cpus: int | None = None) -> int:
    """Threads for the model's forward passes: every core but one, which is left to the event loop."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus - 1)


class WorkerPool:
    """A :class:`~loratune.serve.pool.ModelPool` in a child process: the same ``predict``/``warm_up``/metadata.

    ``load`` must be picklable (a module-level function, or a ``functools.partial`` of one) and return a
    ModelPool; it runs in the child. Construction blocks until the models are loaded (call it off the loop).
    """

    def __init__(
        self,
        load: Callable[[], object],
        threads: int | None = None,
        nice: int = 0,
        restarts: int = RESTARTS,
        backoff_s: float = BACKOFF_S,
    ):
        self._load, self._threads, self._nice = load, threads, nice
        self._restarts, self._backoff_s = restarts, backoff_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._mode: str | None = None  # what warm_up was asked for, to warm a restarted child the same way
        self.restarts = 0
        """Children started again after one died."""
        self.on_give_up: Callable[[BaseException], None] | None = None
        """Told (in a background thread) when the restarts are exhausted."""
        self._down = ""  # why the model is unavailable, while it is restarting
        self._conn, self._process, self.classifiers = self._start()
        self.default = next(iter(self.classifiers))
        self.ready = True
        """False from a child's death until its successor is loaded and warm."""
        threading.Thread(target=self._watch, name="loratune-model-watch", daemon=True).start()

    def _start(self) -> tuple:
        """A new child, loaded: (pipe, process, its ClassifierInfos)."""
        ctx = multiprocessing.get_context("spawn")
        conn, child_end = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child_end, self._load, self._threads, self._nice), name="loratune-model", daemon=True)
        process.start()
        child_end.close()  # the child's end lives in the child only: its exit is an EOF here
        try:
            kind, *payload = _receive(conn, process)
        except BaseException:
            _stop(conn, process)
            raise
        if kind == "error":
            _stop(conn, process)
            raise payload[0]
        return conn, process, payload[0]

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def batch_size(self) -> int:
        return min(c.batch_size for c in self.classifiers.values())

    def unavailable(self) -> str:
        """Why the model cannot answer now (while not :attr:`ready`)."""
        return self._down

    def warm_up(self, mode: str) -> None:
        self._mode = mode
        for name in self.classifiers:
            self.predict(name, ["warm-up"], mode)

    def predict(self, name: str, texts: list[str], mode: str, progress=None) -> list:
        if not self.ready:
            raise ModelUnavailable(self._down)
        with self._lock:  # one batch at a time, like the in-process pool
            try:
                self._conn.send((name, texts, mode))
                kind, *payload = _receive(self._conn, self._process)
            except LoratuneError as exc:
                raise ModelUnavailable(f"{exc}; the server is restarting it") from None
            except OSError:
                raise ModelUnavailable("the model process stopped; the server is restarting it") from None
        if kind == "error":
            raise payload[0]
        predictions, passes = payload
        if progress is not None:
            for _ in range(passes):
                progress(len(texts))
        return predictions

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (after the batch it is running, if any, for up to ``timeout_s``), and any restart under way."""
        self._stopping.set()
        if self._lock.acquire(timeout=timeout_s):
            try:
                _stop(self._conn, self._process, timeout_s)
            finally:
                self._lock.release()
            return
        # A batch still holds the pipe after timeout_s (a hung forward pass): kill the child, which ends that
        # batch's wait with an error, then close the pipe once the batch has let go of it.
        self._process.kill()
        with self._lock:
            self._process.join()
            self._conn.close()

    def _watch(self) -> None:
        """Wait for the child to end; unless the pool is closing, restart it. A child that keeps dying after it
        started (a request that crashes it, say) is not restarted forever: more than ``restarts`` deaths within
        ``DEATH_WINDOW_S`` stop the server as failed starts do."""
        deaths: list[float] = []
        while True:
            process = self._process
            multiprocessing.connection.wait([process.sentinel])
            if self._stopping.is_set():
                return
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < DEATH_WINDOW_S] + [now]
            if len(deaths) > self._restarts:
                self._give_up(f"the model process stopped {len(deaths)} times within {DEATH_WINDOW_S:.0f} s")
                return
            exitcode = _exit_status(process)
            self.ready = False
            self._down = f"the model process stopped ({_how(exitcode)}); the server is restarting it"
            log.warning(json.dumps({"event": "model_process_died", "pid": process.pid, "exit": _how(exitcode)}))
            if not self._restart():
                return

    def _restart(self) -> bool:
        for attempt in range(1, self._restarts + 1):
            if self._stopping.wait(self._backoff_s * 2 ** (attempt - 1)):
                return False
            started = time.perf_counter()
            try:
                conn, process, _ = self._start()
                try:
                    for name in self.classifiers if self._mode else ():
                        conn.send((name, ["warm-up"], self._mode))
                        if _receive(conn, process)[0] != "ok":
                            raise LoratuneError("the warm-up forward pass failed")
                except BaseException:
                    _stop(conn, process)
                    raise
            except Exception as exc:
                event = {"event": "model_process_restart", "attempt": attempt, "of": self._restarts, "ok": False}
                log.warning(json.dumps({**event, "error": str(exc) or type(exc).__name__}))
                continue
            with self._lock:
                old = self._conn
                self._conn, self._process = conn, process
                if self._stopping.is_set():  # closed meanwhile: close() stopped the old child, not this one
                    _stop(conn, process)
                    return False
            old.close()
            self.restarts += 1
            self.ready = True
            event = {"event": "model_process_restart", "attempt": attempt, "ok": True, "pid": process.pid}
            log.warning(json.dumps({**event, "load_s": round(time.perf_counter() - started, 2)}))
            return True
        self._give_up(f"the model process stopped and did not start again in {self._restarts} attempts")
        return False

    def _give_up(self, why: str) -> None:
        self.ready = False
        error = LoratuneError(f"{why}; see the log above")
        self._down = str(error)
        log.error(json.dumps({"event": "model_process_gave_up", "why": why}))
        if self.on_give_up is not None:
            self.on_give_up(error)


def _receive(conn, process) -> tuple:
    try:
        return conn.recv()
    except (EOFError, OSError):
        raise LoratuneError(f"the model process stopped ({_how(_exit_status(process))})") from None


def _exit_status(process, wait_s: float = 2.0):
    """The dead child's exit code. The pipe closes a moment before it is known, and when two threads reap the
    child at once (the watcher, a batch waiting on the pipe), the one that loses sees None until the other has
    stored it: wait for it rather than report "exit status None"."""
    process.join(wait_s)
    deadline = time.monotonic() + wait_s
    while process.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return process.exitcode


def _how(code: int | None) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"


def _stop(conn, process, timeout_s: float = 10.0) -> None:
    try:
        conn.send(None)
    except OSError:
        pass  # it is gone already
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()
    conn.close()


def _serve(conn, load: Callable[[], object], threads: int | None, nice: int = 0) -> None:
    """The child: load, report the models, then answer batches until the pipe closes or says stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and a group SIGTERM reach the server, which drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the queue into this process and then closes it
    if nice:
        os.nice(nice)  # unprivileged: a process may always lower its own priority
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        pool = load()
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    infos = {
        name: ClassifierInfo(c.labels, c.multi_label, c.meta, c.batch_size, c.quantize)
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
