"""uvicorn's httptools protocol with the two bounds it lacks against slow or greedy clients.

A client must send a whole request within ``read_timeout_s`` of its first byte: uvicorn has no
header or body timeout, so connections trickling a byte at a time stayed open for ever and could
use up the process's file descriptors (granian closes those itself). A connection may queue at
most ``max_pipelined`` pipelined requests: uvicorn resumed reading after every response, so a
client that pipelined without reading its answers grew memory without bound.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("signedrec.http")

# The one error body shape (server.wire.ErrorOut), written raw: no request reached the app.
_TIMEOUT_BODY = msgspec.json.encode(
    {"error": {"code": "request_timeout", "message": "the request was not received in time",
               "detail": {}}}
)  # fmt: skip
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: "
    + str(len(_TIMEOUT_BODY)).encode()
    + b"\r\nconnection: close\r\n\r\n"
    + _TIMEOUT_BODY
)


def guarded_protocol(read_timeout_s: float, max_pipelined: int) -> type[HttpToolsProtocol]:
    """The httptools protocol class for uvicorn.Config(http=...) with these bounds."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _headers_done = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # A connection that never sends a byte is held to the same deadline.
            self._deadline = self.loop.call_later(read_timeout_s, self._timed_out)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_done = False
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout_s, self._timed_out)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._headers_done = True
            if len(self.pipeline) > max_pipelined and not self.transport.is_closing():
                # The queued requests never started: closing drops no answered work.
                log.warning(
                    "closing a connection from %s with more than %d pipelined requests "
                    "waiting (server.max_pipelined)", self.client, max_pipelined,
                )  # fmt: skip
                self.pipeline.clear()
                self.transport.close()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.pipeline:  # uvicorn resumed reading: more would queue behind these
                self.flow.pause_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if not self._headers_done:  # nothing reached the app: answer for it
                self.transport.write(_TIMEOUT_RESPONSE)
            # Else the app is waiting for the body: it sees a disconnect, nothing is applied.
            self.transport.close()

    return GuardedHttpToolsProtocol
