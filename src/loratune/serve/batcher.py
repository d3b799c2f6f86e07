"""Micro-batching behind a bounded queue: concurrent requests share one forward pass in one worker thread."""

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class ShuttingDown(Exception):
    """The batcher no longer takes work."""


class QueueFull(Exception):
    """More texts are waiting for a forward pass than the queue holds; try again later."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its forward pass started, so it was not computed."""


@dataclass(eq=False)
class _Job:
    key: Hashable
    items: list
    future: asyncio.Future
    deadline: float | None = None
    """time.monotonic() after which the client no longer wants the answer."""
    queued: bool = field(default=True)

    def alive(self, now: float) -> bool:
        """Still wanted at ``now``: pass the time its batch would end to drop jobs that would be answered late."""
        return not self.future.done() and (self.deadline is None or now < self.deadline)


class MicroBatcher:
    """Gather concurrent requests into batches and run each batch in one worker thread.

    ``run(key, items) -> results`` does the work; only jobs with the same key share a batch. A batch closes
    when ``max_batch`` items are waiting or ``max_wait_s`` has passed since its first job arrived; a job
    larger than ``max_batch`` forms a batch of its own. While a batch runs, new jobs queue up, so under load
    batches fill without waiting.

    At most ``max_queue`` items wait (one job is always let in, however large): beyond that :meth:`submit`
    raises :class:`QueueFull` at once, so overload costs a refusal, not a forward pass nobody waits for. So
    does a job with a deadline the queue ahead of it cannot meet, at the recent speed. Jobs whose future was
    cancelled (the client left) or whose deadline falls before their batch would end are dropped unrun.
    """

    def __init__(self, run: Callable[[Hashable, list], list], max_batch: int, max_wait_s: float, max_queue: int | None = None):
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.batches = 0
        self.waiting = 0
        """Items submitted and not yet taken into a batch (nor dropped)."""
        self.dropped = 0
        self._item_s = 0.0  # recent cost of one item in a full batch, and of one batch: wait estimates
        self._batch_s = 0.0
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratune-infer")
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def full(self) -> bool:
        """No room for another job now (a cheap check before reading a request's body)."""
        return self.max_queue is not None and self.waiting >= self.max_queue

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained, at the recent speed (at least 1)."""
        return max(1, math.ceil(self.waiting * self._item_s))

    def _expected_end(self, items: int) -> float:
        """When a job of ``items`` submitted now would likely be answered (time.monotonic())."""
        return time.monotonic() + (self.waiting + items) * self._item_s + self._batch_s

    async def submit(self, key: Hashable, items: list, deadline: float | None = None) -> tuple[list, int]:
        """Results for ``items`` (in order) and the size of the batch that computed them.

        ``deadline`` (time.monotonic()) drops the job with :class:`DeadlineExceeded` if its batch has not
        started by then. Cancelling the awaiting task drops the job too.
        """
        if self._closed:
            raise ShuttingDown
        if self.max_queue is not None and self.waiting and self.waiting + len(items) > self.max_queue:
            raise QueueFull
        if deadline is not None and self._expected_end(len(items)) > deadline:
            raise QueueFull  # it would be computed for a client that has given up by then
        job = _Job(key, list(items), asyncio.get_running_loop().create_future(), deadline)
        self.waiting += len(job.items)
        job.future.add_done_callback(lambda _f: self._dequeue(job))  # a cancelled job frees its room at once
        self._queue.put_nowait(job)
        return await job.future

    async def stop(self) -> None:
        """Take no new jobs, finish every queued one, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        pending: deque[_Job] = deque()
        stopping = False
        while pending or not stopping:
            if not pending:
                job = await self._queue.get()
                if job is None:
                    stopping = True
                    continue
                pending.append(job)
            if not stopping:
                stopping = await self._gather(pending)
            batch = self._take(pending)
            if batch:
                await self._execute(batch)

    async def _gather(self, pending: deque[_Job]) -> bool:
        """Add queued jobs to ``pending`` until the first job's batch is full or max_wait_s passed; True on stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while self._waiting(pending) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    return False
            if job is None:
                return True
            pending.append(job)
        return False

    @staticmethod
    def _waiting(pending: deque[_Job]) -> int:
        now = time.monotonic()
        live = [j for j in pending if j.alive(now)]
        return sum(len(j.items) for j in live if j.key == live[0].key) if live else 0

    def _take(self, pending: deque[_Job]) -> list[_Job]:
        """The first live job plus later ones with its key, up to max_batch items; dead jobs are dropped here,
        before any forward pass, and the rest stay queued in order."""
        now = time.monotonic() + self._batch_s  # when this batch will likely end
        batch: list[_Job] = []
        size, keep = 0, deque()
        while pending:
            job = pending.popleft()
            if not job.alive(now):
                self._drop(job)
            elif not batch or (job.key == batch[0].key and size + len(job.items) <= self.max_batch):
                batch.append(job)
                size += len(job.items)
                self._dequeue(job)
            else:
                keep.append(job)
        pending.extend(keep)
        return batch

    def _dequeue(self, job: _Job) -> None:
        if job.queued:
            job.queued = False
            self.waiting -= len(job.items)

    def _drop(self, job: _Job) -> None:
        self._dequeue(job)
        self.dropped += 1
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded())

    async def _execute(self, batch: list[_Job]) -> None:
        items = [item for job in batch for item in job.items]
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, batch[0].key, items)
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batches += 1
        seconds = time.perf_counter() - started
        self._batch_s = 0.7 * self._batch_s + 0.3 * seconds if self._batch_s else seconds
        if len(items) >= self.max_batch or not self._item_s:  # a partial batch says little about the cost per item
            self._item_s = 0.7 * self._item_s + 0.3 * seconds / len(items) if self._item_s else seconds / len(items)
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result((results[start : start + len(job.items)], len(items)))
            start += len(job.items)
