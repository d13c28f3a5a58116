"""The skeleton of the local metadata servers: an HTTP server on a local port, served from a daemon
thread, and a request handler that refuses malformed requests with 400 rather than a traceback or a
thread stuck reading a body that never comes."""

from __future__ import annotations

import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 4096  # nothing the metadata protocols take has a body worth more
READ_TIMEOUT_SECONDS = 10.0  # a client that stops sending mid-request holds no thread longer than this
_LENGTH = re.compile(r"[0-9]{1,10}")
# shutdown() returns only once serve_forever has polled again: at the socketserver default (0.5 s)
# every VM's supervisor and every test that stops a server waited half a second for nothing
POLL_SECONDS = 0.05


class BoundedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_SECONDS  # socket timeout of every read and write

    def log_message(self, *args) -> None:  # quiet: the supervisor logs what matters
        pass

    def read_body(self) -> bytes | None:
        """The request's body; None after answering 400 (a Content-Length that is not a count, a
        negative one, too large a body, or one cut short) and closing the connection."""
        header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self._refuse("Transfer-Encoding is not accepted")
            return None
        if header is None:
            return b""
        if not _LENGTH.fullmatch(header.strip()):
            self._refuse("Content-Length must be a count of bytes")
            return None
        length = int(header)
        if length > MAX_BODY_BYTES:
            self._refuse(f"a body over {MAX_BODY_BYTES} bytes")
            return None
        try:
            body = self.rfile.read(length)
        except OSError:  # the socket's timeout: the client announced more than it sent
            self._refuse("the body was cut short")
            return None
        if len(body) != length:
            self._refuse("the body was cut short")
            return None
        return body

    def reply(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, why: str) -> None:
        self.close_connection = True  # what follows on this connection cannot be framed
        try:
            self.reply(400, f"Bad Request: {why}", {"Content-Type": "text/plain"})
        except OSError:
            pass  # the client is gone; nothing to tell


class BackgroundHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    thread_name = "http"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(POLL_SECONDS,), name=self.thread_name,
                                  daemon=True)
        thread.start()
        return thread

    def handle_error(self, request, client_address) -> None:
        """One line, not a traceback: a client that breaks a connection is no news."""
        error = sys.exc_info()[1]
        print(f"{self.thread_name}: request from {client_address[0]} dropped: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)
