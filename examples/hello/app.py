"""A tiny web app for the demo: answers on $PORT with its instance name; /slow holds 1 s.

Standard library only, so the demo needs nothing but Python.
"""

import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body go out in two writes; with Nagle on, the body waits for the ACK of the
    # head, which the ingress's kernel delays up to 40 ms on a kept-alive connection: every
    # request but the first on each connection took 43 ms instead of 1.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        name = os.environ.get("TIDEGATE_INSTANCE", f"pid {os.getpid()}")
        body = f"hello from {name}, request id {self.headers.get('X-Request-Id')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the ingress logs requests


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    ThreadingHTTPServer(("127.0.0.1", port), Hello).serve_forever()
