"""A loopback HTTP server for the tests of the Triton client (runtime/remote.py): each answer comes
from a function of the request, so a test can play a real server, a proxy or something that is not
Triton at all."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable

# (method, path, request headers, request body) -> (status, response headers, response body)
Respond = Callable[[str, str, "http.client.HTTPMessage", bytes], tuple[int, dict, bytes]]


class LoopbackServer:
    def __init__(self, respond: Respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, headers, content = respond(method, self.path, self.headers, body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.answer("POST")

            def do_GET(self):  # noqa: N802
                self.answer("GET")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
