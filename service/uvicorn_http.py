"""uvicorn's httptools protocol with a bound on a request's head, for ``--http``.

uvicorn with httptools reads a request line and headers without a limit: a client sending
20 MB of header lines gets them all buffered, parsed and answered. hypercorn (and granian)
answer 431. So the second supported server runs this subclass,

    uvicorn service:app --http service.uvicorn_http:HttpToolsProtocol ...

which counts the bytes of each request's head as they arrive and, once they pass
``MAX_HEAD_BYTES`` (16 KiB, hypercorn's ``h11_max_incomplete_size`` in ``hypercorn.toml``)
before the blank line that ends it, answers 431 and ends the connection, parsing nothing more:
a worker holds at most that plus one read of a head. Bodies are bounded by the app
(``MAX_BODY_BYTES``, ``BODY_TIMEOUT``), on either server.
"""

from __future__ import annotations

from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol

from service.uvicorn_options import UVICORN_OPTIONS

__all__ = ["MAX_HEAD_BYTES", "UVICORN_OPTIONS", "HttpToolsProtocol"]

#: The most bytes a request line and its headers may take (as hypercorn.toml allows).
MAX_HEAD_BYTES: Final = 16 * 1024
#: How long a refused connection is read (and dropped) before it is closed.
LINGER: Final = 2.0

_REFUSAL_BODY: Final = (
    b'{"error":"request_header_fields_too_large","message":"the request line and headers '
    b"are larger than " + str(MAX_HEAD_BYTES).encode() + b' bytes"}'
)
_REFUSAL: Final = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _REFUSAL_BODY
)


class HttpToolsProtocol(_HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over ``MAX_HEAD_BYTES``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Bytes received since the current request's head began (None: in its body).
        self._head_bytes: int | None = 0
        #: Set once the head was refused: the connection is on its way out.
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends after the 431 is read and dropped
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after this read (its end not seen): refuse it once it is too big.
        if self._head_bytes is not None and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        """Answer 431 and end the connection as a lingering close does: the 431, then our
        FIN, then whatever the client was still sending read and dropped for up to
        ``LINGER`` seconds. Closing at once with its data unread would make the kernel reset
        the connection, and the client might never see the 431."""
        if self.transport.is_closing():
            return
        self._refused = True
        self.logger.info("request head over %d bytes: 431", MAX_HEAD_BYTES)
        self.transport.write(_REFUSAL)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_bytes = 0
