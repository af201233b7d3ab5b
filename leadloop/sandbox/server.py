"""A tiny threaded HTTP server on 127.0.0.1 for the sandbox's fake vendor APIs.

Each fake registers routes `(method, regex) -> handler(request) -> Reply`; the server records
every request it received (method, path, query, headers, JSON body) for tests and the demo.
Binding is loopback-only and the port is ephemeral.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    match: re.Match[str] | None = None

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def path_param(self, name: str) -> str:
        """A named group of the route pattern this request matched (routed requests only)."""
        if self.match is None:
            raise LookupError(f"{self.method} {self.path} was not routed: no {name!r} in its path")
        return self.match[name]

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-serialisable, or bytes/str sent as is
    headers: dict[str, str] = field(default_factory=dict)
    drop_connection: bool = False  # close the socket without an answer (a network fault)


Handler = Callable[[Request], Reply]


class LocalServer:
    """Serve routes on 127.0.0.1:<ephemeral>. Use as a context manager or start()/stop()."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.received: list[Request] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method.upper(), re.compile(f"^{pattern}$"), handler))

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> str:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between header and body

            def log_message(self, *args: Any) -> None:  # keep test and demo output clean
                pass

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                with server._lock:
                    server.received.append(req)
                reply = server._dispatch(req)
                if reply.drop_connection:
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(reply.body, bytes | str):
                    payload = reply.body.encode() if isinstance(reply.body, str) else reply.body
                    ctype = "text/plain; charset=utf-8"
                else:
                    payload = b"" if reply.body is None else json.dumps(reply.body).encode()
                    ctype = "application/json; charset=utf-8"
                self.send_response(reply.status)
                headers = {"Content-Type": ctype, **reply.headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self.base_url

    def _dispatch(self, req: Request) -> Reply:
        for method, pattern, handler in self._routes:
            if method == req.method and (m := pattern.match(req.path)):
                req.match = m
                try:
                    return handler(req)
                except Exception as exc:  # a fake's bug must show up as a 500, not a hang
                    return Reply(500, {"error": f"fake server error: {type(exc).__name__}: {exc}"})
        return Reply(404, {"error": f"no route for {req.method} {req.path}"})

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
