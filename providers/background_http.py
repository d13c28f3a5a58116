"""The skeleton of the local metadata servers: an HTTP server on a local port, served from a daemon thread."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class BackgroundHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    thread_name = "http"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=self.thread_name, daemon=True)
        thread.start()
        return thread
