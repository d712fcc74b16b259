"""A fault switch in front of a real S3 server: an HTTP proxy on loopback that forwards every
request to moto, and on demand answers some requests with an error or stops listening.

Drivers and Ray workers reach it through ``AWS_ENDPOINT_URL_S3`` like any S3 endpoint, so the
faults they meet are real HTTP faults (a 500 to one request, a refused connection), not
exceptions raised inside our code.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["S3Proxy"]

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class _Fault:
    method: str
    suffix: str  # the request path ends with this (the object key's tail)
    status: int
    times: int
    # armed only once a request to this path tail carried this in its body
    after: tuple[str, bytes] | None = None


class S3Proxy:
    """Forward to ``upstream`` (``http://127.0.0.1:PORT``); see :meth:`fail` and :meth:`stop`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults: list[_Fault] = []
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status) of each request
        self._lock = threading.Lock()
        self.down = False  # stopped: connections still open are cut at their next request
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(
        self,
        method: str,
        suffix: str,
        status: int = 500,
        times: int = 1,
        after: tuple[str, bytes] | None = None,
    ) -> None:
        """Answer the next ``times`` ``method`` requests whose path ends with ``suffix`` with
        ``status`` (an S3 XML error body) instead of forwarding them; with ``after=(tail,
        text)``, only once a request to a path ending with ``tail`` carried ``text``."""
        with self._lock:
            self.faults.append(_Fault(method, suffix, status, times, after))

    def start(self) -> None:
        """Listen (again, on the same port once it had one)."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                return None

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.down = False
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.allow_reuse_address = True
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening: every request is refused until :meth:`start` (S3 unreachable)."""
        self.down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _take_fault(self, method: str, path: str, body: bytes) -> _Fault | None:
        path = path.split("?")[0]
        with self._lock:
            for f in self.faults:
                if f.after is not None and path.endswith(f.after[0]) and f.after[1] in body:
                    f.after = None  # armed from the next request on
                    continue
                if f.after is None and f.method == method and path.endswith(f.suffix) and f.times:
                    f.times -= 1
                    return f
        return None

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        if self.down:  # a kept-alive connection from before the stop: cut it, answer nothing
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.connection.shutdown(socket.SHUT_RDWR)
            return
        body = _read_body(req)
        fault = self._take_fault(req.command, req.path, body)
        if fault is not None:
            payload = (
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                b"<Message>injected</Message></Error>"
            )
            req.send_response(fault.status)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(0 if req.command == "HEAD" else len(payload)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(payload)
            self.seen.append((req.command, req.path, fault.status))
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
        headers["Content-Length"] = str(len(body))
        conn.request(req.command, req.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        req.send_response(resp.status, resp.reason)
        head = req.command == "HEAD"  # its Content-Length is the object's, with no body
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                req.send_header(k, v)
        if not head:
            req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)
        conn.close()
        self.seen.append((req.command, req.path, resp.status))


def _read_body(req: BaseHTTPRequestHandler) -> bytes:
    if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(req.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                req.rfile.readline()
                return b"".join(chunks)
            chunks.append(req.rfile.read(size))
            req.rfile.readline()
    n = int(req.headers.get("Content-Length") or 0)
    return req.rfile.read(n) if n else b""
