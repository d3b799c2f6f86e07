"""The load generator of ``benchmarks/serve_load.py``: a minimal HTTP/1.1 client on loopback.

Cheaper than any library, so the server, not the client, is what gets measured: kept-alive connections on
asyncio streams, and one request per fresh connection on a bare asyncio protocol with precomputed bytes.
"""

from __future__ import annotations

import asyncio
import json

HOST = "127.0.0.1"  # loopback only: this script never loads another machine
TEXTS = [
    "I was charged twice for my subscription this month.",
    "The app crashes every time I open the settings page.",
    "I can't log in after resetting my password.",
    "Where is my parcel? Tracking hasn't moved in a week.",
    "Do you have a store in Leeds?",
]


# --------------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client: cheaper than any library, so the server, not the client, is what gets measured.


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def call(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
        """Send one request, read the whole response; its status."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def classify_body(i: int) -> bytes:
    return json.dumps({"text": TEXTS[i % len(TEXTS)]}).encode()


def request_bytes(body: bytes, headers: dict[str, str]) -> bytes:
    lines = ["POST /v1/classify HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class OneShot(asyncio.Protocol):
    """One request on a fresh connection, as a bare protocol: the whole request is precomputed bytes, and the
    response is parsed just enough to know its status and end. A few times cheaper than streams, so that on a
    small machine the generator takes as little CPU as it can from the server it measures."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done, self.buffer, self.status, self.end = request, done, b"", 0, -1

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.end < 0 and (cut := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:cut].lower().split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            length = next((int(line[15:]) for line in head[1:] if line.startswith(b"content-length:")), 0)
            self.end = cut + 4 + length
        if 0 <= self.end <= len(self.buffer) and not self.done.done():
            self.done.set_result(self.status)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionResetError("closed before a whole response"))


async def one_shot(port: int, request: bytes) -> int:
    """The status of ``request`` sent on a fresh connection (raises ConnectionError/OSError when refused or cut)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, _ = await loop.create_connection(lambda: OneShot(request, done), HOST, port)
    try:
        return await done
    finally:
        transport.close()


JSON = {"Content-Type": "application/json"}
