"""CPU the server process spends per refused classify request, on loopback (docs/SERVING.md, Load test).

    python -m benchmarks.refusal_cost                       # this checkout's server, 6,000 refusals
    python -m benchmarks.refusal_cost --src /tmp/old/src    # another checkout's, for a side-by-side figure
    python -m benchmarks.refusal_cost --bare                # the floor: a bare asyncio protocol, same bytes

The server runs as a subprocess with an admission that refuses every classify request, and a model that never
loads (so nothing but the HTTP process works); the client sends fresh-connection requests, 50 at a time, and
reads the server's user + system CPU time before and after (psutil, 10 ms ticks: ~2 us resolution here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from benchmarks.loadgen import HOST, JSON, classify_body, one_shot, request_bytes


def serve(port: int, bare: bool) -> None:
    """The server side (run in the subprocess)."""
    from loratune.serve.protocol import raw_error

    if bare:
        refusal = raw_error(503, "Service Unavailable", "overloaded", "the server is at capacity; retry after Retry-After seconds")

        class Bare(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.write(refusal)
                self.transport.close()

        async def main():
            loop = asyncio.get_running_loop()
            await loop.create_server(Bare, HOST, port)
            stop = loop.create_future()
            loop.add_signal_handler(signal.SIGINT, stop.set_result, None)
            await stop

        asyncio.run(main())
        return
    import uvicorn

    from loratune.serve import create_app, listen, server_config
    from loratune.serve.app import Admission

    Admission.enter = lambda self: self._refusal(1)  # always full
    app = create_app(lambda: threading.Event().wait(), max_queue=8)  # a model that never loads
    server = uvicorn.Server(server_config(app, log_config=None, log_level="warning"))
    try:
        server.run(sockets=[listen(HOST, port)])
    except KeyboardInterrupt:
        pass


def measure(port: int, n: int, concurrency: int, src: str | None, bare: bool) -> dict:
    import psutil

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src or os.environ.get("PYTHONPATH"), os.getcwd()]))}
    cmd = [sys.executable, "-m", "benchmarks.refusal_cost", "--serve", str(port)] + (["--bare"] if bare else [])
    proc = subprocess.Popen(cmd, env=env)
    try:
        for _ in range(600):
            try:
                socket.create_connection((HOST, port)).close()
                break
            except OSError:
                time.sleep(0.1)
        ps = psutil.Process(proc.pid)
        request = request_bytes(classify_body(0), JSON)

        async def run() -> tuple[dict, float]:
            gate, statuses = asyncio.Semaphore(concurrency), {}

            async def one():
                async with gate:
                    try:
                        status = str(await one_shot(port, request))
                    except OSError as exc:
                        status = type(exc).__name__
                    statuses[status] = statuses.get(status, 0) + 1

            await asyncio.gather(*(one() for _ in range(200)))  # warm-up
            statuses.clear()
            before = sum(ps.cpu_times()[:2])
            await asyncio.gather(*(one() for _ in range(n)))
            return statuses, sum(ps.cpu_times()[:2]) - before

        statuses, cpu = asyncio.run(run())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    name = "bare asyncio" if bare else src or "this checkout"
    return {"server": name, "statuses": statuses, "server_cpu_us_per_request": round(1e6 * cpu / n, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="PYTHONPATH for the server (another checkout's src/)")
    parser.add_argument("--bare", action="store_true", help="a bare asyncio protocol instead of loratune's server")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.bare)
        return
    result = measure(args.port, args.requests, 50, args.src, args.bare)
    print(json.dumps({**result, "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
