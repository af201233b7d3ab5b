"""`leadloop serve`: the stage-mapping workbench, a small server-rendered app over the store and
the config file. Pages render from the report's templates (`leadloop/report/templates/`).

Reads are cheap to repeat: the report data is rebuilt when the config file changed or after
`CACHE_SECONDS`. Writes are plain HTML forms (POST), each checked by `security.Guard`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from leadloop.config import Settings, load_settings
from leadloop.context import Context
from leadloop.errors import ConfigErrors
from leadloop.report.data import ReportData, build_report_data
from leadloop.report.html import report_css, report_view
from leadloop.report.templating import environment
from leadloop.store import make_engine
from leadloop.web.security import AUTH_COOKIE, Forbidden, Guard, GuardMiddleware, forbidden

CACHE_SECONDS = 30.0
PAGES = [("/", "Overview"), ("/stages", "Stages"), ("/micro-conversions", "Micro-conversions"),
         ("/uploads", "Uploads"), ("/status", "Status")]


@dataclass
class Workbench:
    """What every request shares: the config file, the store, the guard, a cache of the
    report data."""

    config_path: Path
    guard: Guard
    ad_spend: Path | None = None
    _settings: Settings | None = None
    _settings_mtime: int = -1
    _engine: Any = None
    _data: ReportData | None = None
    _data_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def settings(self) -> Settings:
        """The config as it is on disk now (re-read when the file changed)."""
        mtime = self.config_path.stat().st_mtime_ns
        if self._settings is None or mtime != self._settings_mtime:
            self._settings = load_settings(self.config_path)
            self._settings_mtime = mtime
            self._data = None
        return self._settings

    def context(self) -> Context:
        settings = self.settings()
        if self._engine is None:
            self._engine = make_engine(settings.database.url, echo=settings.database.echo)
        return Context(settings=settings, engine=self._engine)

    def data(self) -> ReportData:
        with self._lock:
            ctx = self.context()
            if self._data is None or time.monotonic() - self._data_at > CACHE_SECONDS:
                self._data = build_report_data(ctx, ad_spend=self.ad_spend)
                self._data_at = time.monotonic()
            return self._data

    def invalidate(self) -> None:
        self._data = None


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    wb: Workbench = request.app.state.workbench
    session = request.state.session
    html = environment().get_template(template).render(
        css=report_css(), standalone=False, links=True, pages=PAGES, path=request.url.path,
        csrf=wb.guard.csrf_token(session), config_path=str(wb.config_path), **context)
    return HTMLResponse(html, status_code=status_code)


async def form_of(request: Request) -> Any:
    """The submitted form, after the write checks (CSRF token, same-origin Origin)."""
    form = await request.form()
    token = form.get("csrf")
    request.app.state.workbench.guard.check_write(request, token if isinstance(token, str) else None)
    return form


def page_data(request: Request) -> tuple[ReportData, dict[str, Any]]:
    data = request.app.state.workbench.data()
    return data, report_view(data)


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Store reads and config writes are blocking: keep the event loop free."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def login(request: Request) -> Response:
    wb: Workbench = request.app.state.workbench
    if wb.guard.token is None:
        return RedirectResponse("/", status_code=303)
    error = ""
    if request.method == "POST":
        form = await request.form()
        origin = request.headers.get("origin")
        if origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return forbidden("a write needs a same-origin Origin header")
        typed = str(form.get("token", ""))
        guard = wb.guard
        if guard.token and typed == guard.token:
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(AUTH_COOKIE, guard.auth_cookie(), httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            return response
        error = "That is not the token."
    return render(request, "login.html", status_code=401 if error else 200, error=error)


def config_broken(request: Request, exc: Exception) -> Response:
    """The file was edited by hand into an invalid state: say which keys, as the CLI would."""
    message = getattr(exc, "message", str(exc))
    return PlainTextResponse(f"{message}\n\nFix the file; this page works again once it is valid.\n",
                             status_code=503)


def create_app(config_path: Path, *, host: str = "127.0.0.1", port: int = 8765,
               token: str | None = None, ad_spend: Path | None = None) -> Any:
    """The ASGI app (wrapped in the guard middleware)."""
    from leadloop.web import pages

    load_settings(config_path)  # a bad config fails at start, with the CLI's message
    guard = Guard(host=host, port=port, token=token)
    static = resources.files("leadloop.web").joinpath("static")
    app = Starlette(routes=[
        Route("/", pages.overview),
        Route("/stages", pages.stages, methods=["GET", "POST"]),
        Route("/micro-conversions", pages.micro_conversions, methods=["GET", "POST"]),
        Route("/uploads", pages.uploads),
        Route("/uploads/retry", pages.retry_dead, methods=["POST"]),
        Route("/status", pages.status),
        Route("/login", login, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ], exception_handlers={Forbidden: lambda request, exc: forbidden(exc.reason),
                           ConfigErrors: config_broken})
    app.state.workbench = Workbench(config_path=Path(config_path).resolve(), guard=guard,
                                    ad_spend=ad_spend)
    return GuardMiddleware(app, guard)


def serve(config_path: Path, *, host: str, port: int, token: str | None,
          ad_spend: Path | None = None) -> None:
    import uvicorn

    app = create_app(config_path, host=host, port=port, token=token, ad_spend=ad_spend)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False,
                proxy_headers=False)
