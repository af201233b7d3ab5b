"""The workbench's request checks: allowed Host, authentication, CSRF and same-origin writes,
and the response headers (a strict Content-Security-Policy: nothing from another origin, no
script at all).

- Host: only the names the server was started for (the bound address, and `localhost` /
  `127.0.0.1` / `[::1]` on loopback), so a page on another site cannot reach the workbench by
  DNS rebinding. Bound to a non-loopback address the check is the token's job.
- Token (`--token-env NAME`, required on any non-loopback address): every request carries
  `Authorization: Bearer <token>` or the session cookie derived from the token (an HMAC of it),
  which `/login` sets after the token is typed once.
- Writes (every POST): a CSRF token from the page (an HMAC of the browser's session cookie with a
  key made at start) and an `Origin` header equal to the server's own origin. Anything else is
  answered 403 and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

SESSION_COOKIE = "leadloop_session"
AUTH_COOKIE = "leadloop_auth"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make browsers send `Origin: null`
    "Cache-Control": "no-store",
}


class Forbidden(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Guard:
    host: str
    port: int
    token: str | None = None
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def allowed_hosts(self) -> set[str] | None:
        """Host header values accepted, or None for any (a token then protects every request)."""
        if self.host not in LOOPBACK:
            return None
        names = set(LOOPBACK) | {self.host}
        return {f"{n}:{self.port}" if ":" not in n else f"[{n}]:{self.port}" for n in names}

    def auth_cookie(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"leadloop-workbench-session", hashlib.sha256).hexdigest()

    def authenticated(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(),
                                                                self.token.encode()):
            return True
        cookie = request.cookies.get(AUTH_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie, self.auth_cookie())

    def csrf_token(self, session: str) -> str:
        return hmac.new(self.key, session.encode(), hashlib.sha256).hexdigest()

    def check_host(self, request: Request) -> None:
        allowed = self.allowed_hosts
        if allowed is not None and request.headers.get("host", "") not in allowed:
            raise Forbidden("unknown Host header")

    def check_write(self, request: Request, form_token: str | None) -> None:
        """Same-origin `Origin` and the page's CSRF token, or `Forbidden`."""
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != own:
            raise Forbidden("a write needs a same-origin Origin header")
        session = request.cookies.get(SESSION_COOKIE, "")
        if not session or not form_token or not hmac.compare_digest(
                form_token, self.csrf_token(session)):
            raise Forbidden("a write needs the CSRF token of the page it came from")


def forbidden(reason: str) -> Response:
    return PlainTextResponse(f"403 Forbidden: {reason}. Nothing was changed.\n", status_code=403,
                             headers=HEADERS)


class GuardMiddleware:
    """Host and token checks on every request; security headers and the session cookie on every
    response."""

    def __init__(self, app: Callable[..., Awaitable[None]], guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            self.guard.check_host(request)
        except Forbidden as exc:
            await forbidden(exc.reason)(scope, receive, send)
            return
        path = scope["path"]
        if not self.guard.authenticated(request) and path != "/login" and not path.startswith(
                "/static/"):
            if request.method == "GET":
                await RedirectResponse("/login", status_code=303, headers=HEADERS)(
                    scope, receive, send)
            else:
                await forbidden("authentication required")(scope, receive, send)
            return
        session = request.cookies.get(SESSION_COOKIE)
        new_session = None if session else secrets.token_urlsafe(24)
        if new_session:  # the page's CSRF token is derived from it (see `csrf_token`)
            scope.setdefault("state", {})["session"] = new_session
        else:
            scope.setdefault("state", {})["session"] = session

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for k, v in HEADERS.items():
                    if k.lower().encode() not in present:
                        headers.append((k.lower().encode(), v.encode()))
                if new_session:
                    cookie = (f"{SESSION_COOKIE}={new_session}; Path=/; HttpOnly; "
                              "SameSite=Strict")
                    headers.append((b"set-cookie", cookie.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
