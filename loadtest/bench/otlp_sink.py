"""``python -m loadtest.bench.otlp_sink PORT``: an OTLP/HTTP receiver that answers every
export with success and keeps nothing. What ``make bench``'s traced rows export to, pinned
with the load, so the figures hold the service's own cost of tracing (making the spans,
encoding and posting them), not a collector's."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Discard(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the exporter keeps its connection

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Discard)
    server.serve_forever()  # until the bench's SIGTERM


if __name__ == "__main__":
    main()
