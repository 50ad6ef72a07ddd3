"""Limits on what one client can hold of a serving node: request body size and time (an ASGI middleware), sockets and
header time (uvicorn's h11 protocol plus a header timeout and a connection cap that closes idle sockets first).

uvicorn's own knobs cover part of this and are used as they are (`timeout_keep_alive`, `ws_max_size`, h11's 16 KiB bound
on a request head); what uvicorn lacks is added here. Its `limit_concurrency` is not enough: it answers 503 only after
a request's headers arrived, so sockets that never finish their headers are held until the process runs out of file
descriptors (then `/live` is reset and the sync loop fails with EMFILE). The cap below closes such sockets instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from textmill.serving import protocol
from textmill.serving.protocol import ApiError
from textmill.errors import UserError

log = logging.getLogger(__name__)

FD_RESERVE = 128   # open files never given to client sockets: model files, the sync loop's downloads, logs, torch
MIN_CONNECTIONS = 16


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (what the kernel allows without privileges); returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # some containers forbid it: keep the soft limit and size from it
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, e)
    return soft


def connection_cap(configured: int, open_files: int) -> int:
    """Sockets this node may hold: `configured`, lowered so FD_RESERVE descriptors always stay free.

    Raises UserError when the open-files limit leaves fewer than MIN_CONNECTIONS sockets."""
    room = open_files - FD_RESERVE
    if room < MIN_CONNECTIONS:
        raise UserError(f"the open-files limit ({open_files}) leaves {max(room, 0)} sockets after the {FD_RESERVE} this "
                        f"node keeps for model files and sync; raise it (`ulimit -n 4096`, systemd LimitNOFILE=)")
    return min(configured, room)


def _raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole OpenAI-shaped HTTP/1.1 error response, for answers written before (or instead of) the ASGI app."""
    body = json.dumps(protocol.error_body(message, "server_overloaded" if status == 503 else "invalid_request_error",
                                          code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode("ascii") + body


@dataclass
class ConnectionGuard:
    """Socket limits shared by every connection of one server; `on_limit(name)` is told each time one acts."""

    max_connections: int
    header_timeout: float
    on_limit: Callable[[str], None] = lambda name: None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout and a connection cap.

    - A request's head must arrive within `header_timeout` s of the connection opening, or of its first byte on a
      kept-alive connection (idle kept-alive sockets are uvicorn's `timeout_keep_alive`'s); else 408 and close.
    - Over `max_connections` open sockets, the connection idle longest (no request in progress, not a WebSocket) is
      closed to make room, else the oldest one still sending its request body (slow-body floods); when there is
      neither, the new one gets 503 and is closed. WebSockets are bounded by the app (`max_websockets`, at most half
      the cap), so plain HTTP such as `/live` always finds a socket.
    """

    guard: ConnectionGuard  # set by guarded_protocol()
    _upgraded = False
    _header_timer: asyncio.TimerHandle | None = None
    _idle_since = 0.0
    _between_requests = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = time.monotonic()
        if self._open_count() > self.guard.max_connections and not self._evict_idle():
            self.guard.on_limit("max_connections")
            transport.write(_raw_error(503, "Service Unavailable", "this node holds its maximum number of connections "
                                       "(serving.max_connections); retry shortly", "too_many_connections"))
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._between_requests and data:  # the next request on a kept-alive connection starts: time its head
            self._between_requests = False
            self._arm_header_timer()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._cancel_header_timer()
        self._between_requests, self._idle_since = True, time.monotonic()
        super().on_response_complete()

    def handle_websocket_upgrade(self, event) -> None:  # type: ignore[override]
        self._upgraded = True
        self._cancel_header_timer()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        """No request in progress on this socket (waiting for a head, or kept alive between requests)."""
        return not self._upgraded and (self.cycle is None or self.cycle.response_complete)

    def _open_count(self) -> int:
        return sum(1 for c in self.connections if not _closing(c))

    def _receiving_body(self) -> bool:
        return not self._upgraded and self.conn.their_state is h11.SEND_BODY

    def _evict_idle(self) -> bool:
        others = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self and not _closing(c)]
        for kind, waiting in (("idle_evicted", GuardedH11Protocol._idle),
                              ("slow_body_evicted", GuardedH11Protocol._receiving_body)):
            candidates = [c for c in others if waiting(c)]
            if candidates:
                victim = min(candidates, key=lambda c: c._idle_since)
                victim._cancel_header_timer()
                victim.transport.close()
                self.guard.on_limit(kind)
                return True
        return False

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.guard.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._idle() and not self._between_requests and not self.transport.is_closing():
            self.guard.on_limit("header_timeout")
            self.transport.write(_raw_error(408, "Request Timeout", f"request headers not received within "
                                            f"{self.guard.header_timeout:g} s (serving.header_timeout)",
                                            "header_timeout"))
            self.transport.close()


def _closing(connection) -> bool:
    transport = getattr(connection, "transport", None)
    return transport is None or transport.is_closing()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)` for this server's limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class BodyTooLarge(ApiError):
    pass


class BodyLimit:
    """Pure ASGI middleware: a request body over `max_bytes` is answered 413 before it is buffered (a Content-Length
    over the limit without reading a byte; a chunked body as soon as its running count passes the limit), and one not
    received within `timeout_s` is answered 408. Both close the connection, so an unread body is never drained."""

    def __init__(self, app, max_bytes: int, timeout_s: float, on_limit: Callable[[str], None]) -> None:
        self.app, self.max_bytes, self.timeout_s, self.on_limit = app, max_bytes, timeout_s, on_limit

    def too_large(self) -> BodyTooLarge:
        self.on_limit("max_body_bytes")
        return BodyTooLarge(413, f"request body is larger than this server's limit of {self.max_bytes} bytes "
                            f"(serving.max_body_bytes); send a shorter prompt or fewer prompts per request",
                            code="request_too_large", headers={"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large().response()(scope, receive, send)
        received, finished, deadline = 0, False, time.monotonic() + self.timeout_s

        async def limited_receive():
            nonlocal received, finished
            if finished:  # the body is in: later receives wait for a disconnect, unbounded by design
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                self.on_limit("body_timeout")
                raise ApiError(408, f"request body not received within {self.timeout_s:g} s (serving.body_timeout)",
                               code="body_timeout", headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()
                finished = not message.get("more_body", False)
            else:
                finished = True
            return message

        await self.app(scope, limited_receive, send)
