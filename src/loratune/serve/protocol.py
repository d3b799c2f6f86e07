"""uvicorn's h11 protocol with what a server facing overload needs: read timeouts, TCP_NODELAY, JSON 400s,
admission control before parsing.

uvicorn (0.54) waits forever for a request's headers and body: a client that connects and trickles bytes holds
its connection, and its memory, for as long as it likes. Here a request must arrive whole within
``read_timeout_s`` of its first byte (of the connection, for the first request); after that the connection is
answered 408 (when the client sent something) and closed.
"""

import asyncio
import socket
from typing import Protocol

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .schemas import error_json


def set_nodelay(sock) -> None:
    """Send small writes at once. Without it Nagle's algorithm holds a keep-alive response back until the
    client's delayed ACK (~40 ms on Linux): asyncio sets it only for sockets created with IPPROTO_TCP."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a socket closed in the meantime needs no option


def raw_error(status: int, reason: str, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response with a JSON body, for answers sent outside any request cycle."""
    body = error_json({"error": {"code": code, "message": message}})
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class Admission(Protocol):
    """What the protocol asks before parsing a classify request (implemented by serve.app.Admission)."""

    def enter(self) -> bytes | None:
        """None: let it in (then :meth:`leave` once answered or gone); else the whole response to send and close."""

    def leave(self) -> None: ...


class TimedH11Protocol(H11Protocol):
    """One connection. Subclass with :func:`protocol_class` to set ``read_timeout_s``."""

    read_timeout_s: float = 15.0
    admission: Admission | None = None
    """Asked about each new ``POST /v1/classify`` before it is parsed (see :class:`Admission`)."""

    drain_s: float = 0.5
    """On shutdown, how long a connection between requests may still bring one (answered 503 ``shutting_down``)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        # Light until the first bytes arrive: a connection refused before parsing never builds uvicorn's and h11's
        # per-connection state, which cost about as much CPU again as the refusal itself (docs/SERVING.md).
        self._args = (config, server_state, app_state, _loop)
        self.loop = _loop or asyncio.get_event_loop()
        self.connections = server_state.connections
        self._full = False
        self._read_timer = None
        self._admitted = self._pre_admitted = self._draining = False
        """_pre_admitted: the request h11 parses next was let in by _refused_early already."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.connections.add(self)  # uvicorn's shutdown reaches it (see shutdown)
        self._arm()  # a connection that never sends a whole request is closed too

    def _build(self) -> None:
        """uvicorn's protocol, for a connection whose first request is let in (or is not a classify request)."""
        self._full, transport = True, self.transport
        super().__init__(*self._args)
        super().connection_made(transport)
        set_nodelay(transport.get_extra_info("socket"))
        if self.admission is not None:  # every request h11 parses passes admission, pipelined ones too
            self._h11_next_event = self.conn.next_event
            self.conn.next_event = self._next_event  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._leave()
        if self._full:
            super().connection_lost(exc)
        else:
            self.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            self._refuse_while_shutting_down()
            return
        if self.admission is not None and self._refused_early(data):
            return
        if not self._full:
            self._build()
        super().data_received(data)
        self._track_reading()

    def _refused_early(self, data: bytes) -> bool:
        """Answer a new classify request 503 before parsing it when admission says so: under overload, refusing
        through the whole ASGI stack cost the event loop about as much as serving (docs/SERVING.md)."""
        new_request = not self._full or (self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0])
        if not (
            new_request and data.startswith(CLASSIFY_REQUEST) and data[len(CLASSIFY_REQUEST) : len(CLASSIFY_REQUEST) + 1] in (b" ", b"?")
        ):
            return False
        refusal = self.admission.enter()  # type: ignore[union-attr]
        if refusal is None:
            self._admitted = self._pre_admitted = True
            return False
        self._refuse(refusal)
        return True

    def _next_event(self):
        """h11's next event; a classify request not let in before parsing (pipelined behind another request in one
        write, or split before its request line was whole) asks admission here, and is refused the same way."""
        event = self._h11_next_event()
        if type(event) is h11.Request:
            if self._pre_admitted:
                self._pre_admitted = False
            elif event.method == b"POST" and event.target.partition(b"?")[0] == CLASSIFY_PATH:
                refusal = self.admission.enter()  # type: ignore[union-attr]
                if refusal is not None:
                    self._refuse(refusal)
                    return h11.NEED_DATA  # uvicorn stops reading events: the connection is closing
                self._admitted = True
        return event

    def _refuse(self, refusal: bytes) -> None:
        if self._full:
            self._unset_keepalive_if_required()
        self.transport.write(refusal)
        self.transport.close()  # the request was read whole or its rest is unwanted: no keep-alive to resume

    def shutdown(self) -> None:
        """SIGTERM: uvicorn closes connections that are between requests at once, but one accepted just before may
        hold a request the loop has not read yet, and the client would see its connection cut. Such a connection
        gets ``drain_s`` to bring it, answered 503 ``shutting_down`` (Retry-After); then it is closed."""
        if not self._full:  # nothing received yet
            self._draining = True
            self._disarm()
            self._read_timer = self.loop.call_later(self.drain_s, self.transport.close)
            return
        between = self.cycle is None or self.cycle.response_complete
        if not (between and self.conn.their_state is h11.IDLE) or self.transport.is_closing():
            super().shutdown()  # a request in progress finishes, then the connection closes
            return
        self._draining = True
        self._disarm()
        if self.conn.trailing_data[0]:  # part of a request is here already
            self._refuse_while_shutting_down()
        else:
            self._read_timer = self.loop.call_later(self.drain_s, self.transport.close)

    def _refuse_while_shutting_down(self) -> None:
        self._draining = False
        self._disarm()
        self.transport.write(SHUTTING_DOWN)
        self.transport.close()

    def _leave(self) -> None:
        if self._admitted:
            self._admitted = False
            self.admission.leave()  # type: ignore[union-attr]

    def on_response_complete(self) -> None:
        self._leave()
        super().on_response_complete()
        self._track_reading()

    def _track_reading(self) -> None:
        """Time the request being read now: from its first byte until its body is complete."""
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            if self._read_timer is None:
                self._arm()
        elif state is not h11.IDLE:
            self._disarm()  # read whole (or the connection is ending): the app's time is not the client's

    def _arm(self) -> None:
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not self._full:  # nothing received: no request to answer 408
            self.transport.close()
            return
        state = self.conn.their_state
        headers_pending = state is h11.IDLE and self.conn.trailing_data[0]
        body_pending = state is h11.SEND_BODY and self.cycle is not None and not self.cycle.response_started
        if headers_pending or body_pending:
            message = f"the request did not arrive whole within {self.read_timeout_s:g} s"
            self.transport.write(raw_error(408, "Request Timeout", "request_timeout", message))
        self.transport.close()  # the app, if it was reading the body, sees a disconnect

    def send_400_response(self, msg: str) -> None:
        """What uvicorn sends for a request h11 cannot parse, as the same JSON error body as every other error."""
        message = "invalid HTTP request (malformed request line or headers, or headers over 16 KiB)"
        body = error_json({"error": {"code": "bad_request", "message": message}})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass  # a response was already under way: closing is all that is left
        self.transport.close()


CLASSIFY_PATH = b"/v1/classify"
CLASSIFY_REQUEST = b"POST " + CLASSIFY_PATH
SHUTTING_DOWN = raw_error(503, "Service Unavailable", "shutting_down", "the server is shutting down", {"Retry-After": "1"})


def protocol_class(read_timeout_s: float, admission: Admission | None = None) -> type[TimedH11Protocol]:
    """The protocol class to give uvicorn (``uvicorn.Config(http=...)``) for this read timeout and admission."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout_s": read_timeout_s, "admission": admission})
