"""Load test of ``loratune serve`` on loopback: capacity, 4x overload, keep-alive latency, SIGTERM under load.

    python -m benchmarks.serve_load                          # trains a tiny adapter first (~1 min), ~1 min of load
    python -m benchmarks.serve_load --adapter outputs/lora/final --seconds 10 --out benchmarks/results/serve_load.json

What it does, against a real ``python -m loratune serve`` subprocess on 127.0.0.1 (never another host):
1. kept-alive capacity: closed loop, max(2 x batch size, max queue) clients on kept-alive connections.
2. latency: sequential requests on one kept-alive connection vs a fresh connection each (medians, p90).
3. ``--rounds`` rounds, back to back, of
   a. capacity: the same closed loop, but a fresh connection per request, like the open loop below. This is
      "the server's capacity": closed-loop throughput at saturation (enough clients to keep batches full),
      for the requests the overload sends, measured in the same run right before the overload it scales;
   b. overload: open loop at ``--factor`` x that capacity for ``--seconds``, a fresh connection per request,
      each client giving up after ``--timeout`` s (and saying so in ``X-Timeout-Ms``). Goodput: answers within
      the timeout, as % of the capacity; 503 latencies (client side, from before connecting); CPU per process.
   The totals add the rounds up. Rounds, not one capacity phase then one overload phase: on a shared machine
   the CPU this run gets drifts within a minute. Server RSS (with its model process) before, peak, after.
4. SIGTERM under load: the same open loop on a fresh server, SIGTERM half-way: every request must end answered
   (200), refused (503, or a connection the closed listener refused) or cut, none left hanging past the timeout.

The load generator is a bare asyncio protocol with precomputed requests (~0.3 ms of CPU per request), but it
shares the machine's cores with the server: on a small machine it takes CPU the server would otherwise get,
four times as much during the overload as during the capacity phase. ``cpu_pct`` says how much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.loadgen import HOST, JSON, TEXTS, Connection, classify_body, one_shot, request_bytes

# --------------------------------------------------------------------------------------------------
# The server under test.


class Server:
    def __init__(self, adapter: Path, max_queue: int, batch_size: int, settings: list[str] = ()):
        cmd = [sys.executable, "-m", "loratune", "serve", "--adapter", str(adapter), "--host", HOST, "--port", "0"]
        cmd += ["--max-queue", str(max_queue), "--batch-size", str(batch_size)]
        cmd += [arg for setting in settings for arg in ("--set", setting)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        self.port = self._wait_ready()
        self.ps = psutil.Process(self.proc.pid)

    def _wait_ready(self, limit_s: float = 300) -> int:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any('"event": "ready"' in x for x in list(self.lines)):
                url = next(json.loads(x)["url"] for x in self.lines if '"event": "listening"' in x)
                return int(url.rsplit(":", 1)[1])
            time.sleep(0.1)
        self.stop()
        raise SystemExit("the server did not become ready:\n" + "".join(self.lines[-20:]))

    def rss_mb(self) -> float:
        """The server's resident memory, with its model process (and any other child)."""
        total = 0
        for proc in [self.ps, *self.ps.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass  # a child that just ended
        return total / 2**20

    def stats(self) -> dict:
        async def get():
            conn = await Connection.open(self.port)
            conn.writer.write(f"GET /v1/stats HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await conn.reader.readuntil(b"\r\n\r\n")
            length = int(next(x for x in head.lower().split(b"\r\n") if x.startswith(b"content-length:")).split(b":")[1])
            body = await conn.reader.readexactly(length)
            conn.close()
            return json.loads(body)

        return asyncio.run(get())

    def stop(self, wait_s: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


# --------------------------------------------------------------------------------------------------
# Phases.


async def capacity(port: int, clients: int, seconds: float, fresh: bool = False) -> float:
    """Answers per second with ``clients`` closed-loop clients: each on its own kept-alive connection, or (``fresh``)
    opening a fresh connection per request, as the open loop below does."""
    done = 0
    stop_at = time.monotonic() + seconds
    requests = [request_bytes(classify_body(i), JSON) for i in range(len(TEXTS))]

    async def client(k: int) -> None:
        nonlocal done
        conn = None if fresh else await Connection.open(port)
        i = k
        while time.monotonic() < stop_at:
            if conn is None:
                ok = await one_shot(port, requests[i % len(requests)]) == 200
            else:
                ok = await conn.call("POST", "/v1/classify", classify_body(i), JSON) == 200
            done += ok
            i += clients
        if conn is not None:
            conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return done / (time.monotonic() - started)


async def latency(port: int, n: int) -> dict:
    """Sequential requests, one at a time: on one kept-alive connection vs a fresh connection each (ms)."""
    result = {}
    for name, method, path, body in (("healthz", "GET", "/healthz", b""), ("classify", "POST", "/v1/classify", classify_body(0))):
        kept = await Connection.open(port)
        await kept.call(method, path, body, JSON)  # the connection's first request is not a kept-alive one
        for label in ("keepalive", "fresh"):
            times = []
            for _ in range(n):
                started = time.perf_counter()
                conn = kept if label == "keepalive" else await Connection.open(port)
                assert await conn.call(method, path, body, JSON) == 200
                times.append(1000 * (time.perf_counter() - started))
                if conn is not kept:
                    conn.close()
            result[f"{name}_{label}_p50_ms"] = round(statistics.median(times), 2)
            result[f"{name}_{label}_p90_ms"] = round(statistics.quantiles(times, n=10)[-1], 2)
        kept.close()
    return result


@dataclass
class Outcome:
    kind: str  # "200", "503", other status, "timeout", "refused", "reset"
    ms: float
    end: float = 0.0
    """time.monotonic() when it ended."""


@dataclass
class OpenLoop:
    port: int
    rate: float
    seconds: float
    timeout_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    cpu_pct: dict[str, int] = field(default_factory=dict)
    window_end: float = float("inf")
    """time.monotonic() when the offering stopped (set by :meth:`run`)."""
    """CPU used while the loop ran, per process, in % of one core (from :func:`cpu_seconds`)."""

    def __post_init__(self):
        headers = {**JSON, "X-Timeout-Ms": str(int(self.timeout_s * 1000))}
        self.requests = [request_bytes(classify_body(i), headers) for i in range(len(TEXTS))]

    async def one(self, i: int) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                kind = str(await one_shot(self.port, self.requests[i % len(self.requests)]))
        except TimeoutError:
            kind = "timeout"
        except ConnectionRefusedError:
            kind = "refused"
        except (ConnectionError, OSError):
            kind = "reset"
        self.outcomes.append(Outcome(kind, 1000 * (time.perf_counter() - started), time.monotonic()))

    async def run(self, at_s: float | None = None, action=None) -> None:
        """Start requests at ``rate`` per second for ``seconds``; ``action()`` once ``at_s`` seconds in."""
        tasks, started, i = [], time.monotonic(), 0
        self.window_end = started + self.seconds
        while (elapsed := time.monotonic() - started) < self.seconds:
            if action is not None and at_s is not None and elapsed >= at_s:
                action()
                action = None
            due = int(elapsed * self.rate) + 1
            while i < due:
                tasks.append(asyncio.ensure_future(self.one(i)))
                i += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)  # each ends within timeout_s

    def answered_in_window(self) -> int:
        """200s that arrived while requests were being offered. Not the ones after: the queue let in before the
        window closed drains afterwards (up to max queue + a batch), which would count work done after it."""
        return sum(o.kind == "200" and o.end <= self.window_end for o in self.outcomes)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)

    def share_within(self, kind: str, ms: float) -> float:
        times = [o.ms for o in self.outcomes if o.kind == kind]
        return sum(t <= ms for t in times) / len(times) if times else 1.0

    def p99_ms(self, kind: str) -> float | None:
        times = sorted(o.ms for o in self.outcomes if o.kind == kind)
        return round(times[min(len(times) - 1, int(0.99 * len(times)))], 1) if times else None


async def overload(server: Server, rate: float, seconds: float, timeout_s: float) -> tuple[OpenLoop, float, float]:
    """The open loop, sampling the server's RSS and this client's own event-loop lag.

    (the loop, peak RSS in MiB, p99 lag in ms: how late a 50 ms sleep of the client wakes up; when large, the
    client, not the server, is what the machine starves)."""
    loop_ = OpenLoop(server.port, rate, seconds, timeout_s)
    peak, lags = server.rss_mb(), []

    async def sample():
        nonlocal peak
        while True:
            peak = max(peak, server.rss_mb())
            started = time.perf_counter()
            await asyncio.sleep(0.05)
            lags.append(1000 * (time.perf_counter() - started - 0.05))

    sampler = asyncio.ensure_future(sample())
    before, started = cpu_seconds(server), time.monotonic()
    await loop_.run()
    after, wall = cpu_seconds(server), time.monotonic() - started
    sampler.cancel()
    loop_.cpu_pct = {k: round(100 * (after[k] - before.get(k, 0.0)) / wall) for k in after}
    return loop_, peak, round(sorted(lags)[int(0.99 * (len(lags) - 1))], 1)


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server process, its model process, and this client."""
    out = {}
    for name, proc in (("server", server.ps), ("client", psutil.Process())):
        times = proc.cpu_times()
        out[name] = times.user + times.system
    for child in server.ps.children():
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        if times.user + times.system > 1:  # the model process, not multiprocessing's resource tracker
            out["model_process"] = out.get("model_process", 0.0) + times.user + times.system
    return out


def server_latencies(lines: list[str], since: int) -> dict:
    """p50/p99 of the server's own latency_ms (ASGI call to response, from its access log) per status."""
    rows = [json.loads(x) for x in lines[since:] if x.startswith('{"ts"') and '"/v1/classify"' in x]
    out = {}
    for status in sorted({r["status"] for r in rows}):
        ms = sorted(r["latency_ms"] for r in rows if r["status"] == status)
        out[str(status)] = {"n": len(ms), "p50_ms": ms[len(ms) // 2], "p99_ms": ms[int(0.99 * (len(ms) - 1))]}
    return out


# --------------------------------------------------------------------------------------------------


def train_tiny_adapter(out: Path) -> Path:
    print(f"training a tiny adapter in {out} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "loratune", "train", "--model", "tiny", "--max-steps", "4", "--output-dir", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "final"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="adapter to serve (default: train a tiny one)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the capacity and overload phases")
    parser.add_argument("--rounds", type=int, default=3, help="capacity + overload rounds, back to back")
    parser.add_argument("--factor", type=float, default=4.0, help="overload rate, in multiples of the capacity")
    parser.add_argument("--timeout", type=float, default=5.0, help="client timeout in the overload phases, s")
    parser.add_argument("--max-queue", type=int, default=256, help="the server's --max-queue")
    parser.add_argument("--batch-size", type=int, default=32, help="the server's --batch-size")
    parser.add_argument("--set", action="append", default=[], help="a server setting, e.g. serve.model_process=false")
    parser.add_argument("--skip-sigterm", action="store_true", help="leave out the SIGTERM phase")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or train_tiny_adapter(Path(tmp) / "run")
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
        report.update(measure(adapter, args))
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def measure(adapter: Path, args) -> dict:
    report: dict = {}
    server = Server(adapter, args.max_queue, args.batch_size, args.set)
    try:
        asyncio.run(capacity(server.port, 4, 1.0))  # warm-up
        # Enough clients to keep the queue full, so batches are full: fewer would measure latency, not capacity.
        # Capacity is for the same requests the open loop sends (a fresh connection each); kept-alive beside it.
        clients = max(2 * args.batch_size, args.max_queue)
        report["capacity_keepalive_rps"] = round(asyncio.run(capacity(server.port, clients, args.seconds)), 1)
        report.update(asyncio.run(latency(server.port, 50)))
        report["rss_before_mb"] = round(server.rss_mb(), 1)
        since = len(server.lines)
        # Rounds of (capacity, then the open loop at factor x that capacity): on a shared machine the CPU this run
        # gets drifts within a minute, and a capacity measured once, a minute before, would be compared with an
        # overload run under other conditions. Each round compares the two back to back.
        rounds, peak, loops = [], 0.0, []
        for _ in range(args.rounds):
            cap = asyncio.run(capacity(server.port, clients, args.seconds, fresh=True))
            loop_, round_peak, lag = asyncio.run(overload(server, args.factor * cap, args.seconds, args.timeout))
            peak, ok = max(peak, round_peak), loop_.answered_in_window()
            loops.append(loop_)
            rounds.append(
                {
                    "capacity_rps": round(cap, 1),
                    "offered_rps": round(args.factor * cap, 1),
                    "outcomes": {k: loop_.count(k) for k in sorted({o.kind for o in loop_.outcomes})},
                    "goodput_rps": round(ok / args.seconds, 1),
                    "goodput_pct_of_capacity": round(100 * ok / args.seconds / cap, 1),
                    "p99_ms_200": loop_.p99_ms("200"),
                    "p99_ms_503": loop_.p99_ms("503"),
                    "client_loop_lag_p99_ms": lag,
                    "cpu_pct": loop_.cpu_pct,
                }
            )
        report["rss_peak_mb"], report["rss_after_mb"] = round(peak, 1), round(server.rss_mb(), 1)
        every = OpenLoop(server.port, 0, 0, 0, [o for loop_ in loops for o in loop_.outcomes])
        in_window = sum(loop_.answered_in_window() for loop_ in loops)
        capacity_total = sum(r["capacity_rps"] for r in rounds) * args.seconds
        report["capacity_rps"] = round(capacity_total / args.seconds / len(rounds), 1)
        report["overload"] = {
            "rounds": rounds,
            "requests": len(every.outcomes),
            "outcomes": {k: every.count(k) for k in sorted({o.kind for o in every.outcomes})},
            "answered_in_window": in_window,
            "goodput_pct_of_capacity": round(100 * in_window / capacity_total, 1),
            "p99_ms_200": every.p99_ms("200"),
            "p99_ms_503": every.p99_ms("503"),
            "share_503_within_100_ms": round(every.share_within("503", 100.0), 4),
            "server_stats": server.stats(),
            "server_side_latency": server_latencies(server.lines, since),
        }
    finally:
        server.stop()
    if args.skip_sigterm:
        return report
    report["sigterm"] = sigterm_under_load(adapter, args, report.get("capacity_rps", 10.0))
    return report


def sigterm_under_load(adapter: Path, args, cap: float) -> dict:
    """Open loop at factor x capacity for 4 s on a fresh server, SIGTERM after 2 s: how every request ended."""
    server = Server(adapter, args.max_queue, args.batch_size, args.set)
    loop_ = OpenLoop(server.port, args.factor * cap, 4.0, max(args.timeout, 40.0))  # > the 30 s graceful drain
    sent_at = []

    def terminate():
        sent_at.append(time.monotonic())
        server.proc.send_signal(signal.SIGTERM)

    asyncio.run(loop_.run(at_s=2.0, action=terminate))
    code = server.stop()
    outcomes = {k: loop_.count(k) for k in sorted({o.kind for o in loop_.outcomes})}
    return {
        "requests": len(loop_.outcomes),
        "outcomes": outcomes,
        "hung": outcomes.get("timeout", 0),
        "exit_code": code,
        "answered_after_sigterm": sum('"/v1/classify"' in x and '"status": 200' in x for x in _after(server.lines, "Shutting down")),
    }


def _after(lines: list[str], marker: str) -> list[str]:
    at = next((i for i, x in enumerate(lines) if marker in x), len(lines))
    return lines[at:]


if __name__ == "__main__":
    main()
