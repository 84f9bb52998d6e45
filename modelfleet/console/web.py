"""What every console page shares: who is signed in, CSRF, forms, rendering
with the request's path prefix, error pages, the vendored static files."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from modelfleet.console import queries
from modelfleet.console.prefix import prefix_of
from modelfleet.console.sessions import Session, SessionStore
from modelfleet.errors import InvalidRequest, ModelfleetError, PermissionDenied, RequestTooLarge
from modelfleet.keys import Principal
from modelfleet.services import Services

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
COOKIE = "mf_console"
LOGIN_CSRF_COOKIE = "mf_console_login"
TZ_COOKIE = "mf_tz"
FORM_LIMIT = 64 * 1024
# Scripts only from the console's own files (no inline script, no eval); htmx
# and uPlot set inline styles.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
       "base-uri 'none'")
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", "": "text/plain"}


class SignIn(Exception):
    """No live session: go to the sign-in page."""


class CsrfRefused(Exception):
    """A form or a console call without the session's CSRF token."""


def money(micro: int | None) -> str:
    """Micro-units as a decimal number of units, exactly (no floats)."""
    if micro is None:
        return ""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), 1_000_000)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")  # 12.50, 0.000123: exact, no float
    return f"{sign}{whole:,}.{digits}"


def parse_money(text: str, param: str) -> int:
    """A decimal number of units (``12.5``) as integer micro-units."""
    try:
        value = Decimal(text.strip().replace(",", "").replace("_", ""))
    except InvalidOperation:
        raise InvalidRequest(f"{param} must be a number of units such as 12.5", param=param) from None
    micro = value * 1_000_000
    if not value.is_finite() or micro != micro.to_integral_value():
        raise InvalidRequest(f"{param} has more than 6 decimal places", param=param)
    return int(micro)


@dataclass
class Ctx:
    """One console request: its session, prefix and the viewer's time zone."""

    request: Request
    session: Session
    prefix: str
    zone: ZoneInfo

    @property
    def principal(self) -> Principal:
        return self.session.principal

    @property
    def base(self) -> str:
        return self.prefix + "/console"

    def local(self, when: datetime | None) -> str:
        if when is None:
            return ""
        return when.astimezone(self.zone).strftime("%Y-%m-%d %H:%M:%S")


class Web:
    """Rendering and request plumbing for the console's handlers."""

    def __init__(self, services: Services, sessions: SessionStore) -> None:
        self.services = services
        self.sessions = sessions
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["money"] = money
        self.static = {p.relative_to(HERE / "static").as_posix(): p.read_bytes()
                       for p in (HERE / "static").rglob("*") if p.is_file()}

    # -- who is calling ---------------------------------------------------------------

    async def ctx(self, request: Request, *, touch: bool = True) -> Ctx:
        """The signed-in session (else ``SignIn``).  A live update (an htmx
        poll) does not count as use: an open tab does not keep a session alive."""
        await self.services.watcher.check()
        touch = touch and not request.headers.get("hx-request")
        session = await self.sessions.find(request.cookies.get(COOKIE), touch=touch)
        if session is None:
            raise SignIn()
        return Ctx(request, session, prefix_of(request), queries.zone_of(request.cookies.get(TZ_COOKIE)))

    async def form(self, request: Request, ctx: Ctx | None) -> dict[str, str]:
        """The urlencoded body of a form post, after its CSRF token was checked."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > FORM_LIMIT:
                raise RequestTooLarge(f"form is larger than {FORM_LIMIT} bytes")
        fields = {k: v[-1] for k, v in parse_qs(body.decode(errors="replace"),
                                                 keep_blank_values=True).items()}
        if ctx is not None and not ctx.session.csrf_ok(fields.get("csrf_token")):
            raise CsrfRefused()
        return fields

    def check_header_csrf(self, ctx: Ctx) -> None:
        if not ctx.session.csrf_ok(ctx.request.headers.get("x-csrf-token")):
            raise CsrfRefused()

    @staticmethod
    def require_admin(ctx: Ctx) -> None:
        if not ctx.principal.is_admin:
            raise PermissionDenied("this page is for operators (an admin key)",
                                   code="insufficient_scope")

    # -- answers ----------------------------------------------------------------------

    def render(self, ctx: Ctx | None, template: str, status: int = 200,
               headers: dict[str, str] | None = None, *, request: Request | None = None,
               **values: Any) -> HTMLResponse:
        request = ctx.request if ctx is not None else request
        values.setdefault("notice", None)
        values.setdefault("page", "")
        prefix = ctx.prefix if ctx is not None else prefix_of(request) if request else ""
        html = self.env.get_template(template).render(
            base=prefix + "/console", prefix=prefix, ctx=ctx,
            principal=ctx.principal if ctx is not None else None,
            csrf=ctx.session.csrf if ctx is not None else values.pop("csrf", ""),
            **values)
        out = HTMLResponse(html, status_code=status, headers=headers)
        out.headers["Cache-Control"] = "no-store"
        out.headers["X-Frame-Options"] = "DENY"
        out.headers["Content-Security-Policy"] = CSP
        out.headers["Referrer-Policy"] = "same-origin"
        if ctx is not None and values["notice"]:  # shown once
            out.delete_cookie("mf_notice", path=ctx.base)
        return out

    def redirect(self, ctx: Ctx, path: str, notice: str | None = None) -> Response:
        out = RedirectResponse(ctx.base + path, status_code=303)
        if notice:
            out.set_cookie("mf_notice", notice[:300], path=ctx.base, httponly=True,
                           samesite="strict", secure=ctx.request.url.scheme == "https")
        return out

    def notice(self, ctx: Ctx) -> str | None:
        return ctx.request.cookies.get("mf_notice")

    def set_session_cookie(self, response: Response, request: Request, token: str) -> None:
        prefix = prefix_of(request)
        response.set_cookie(COOKIE, token, path=prefix + "/console", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    def login_csrf(self, request: Request) -> str:
        return request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)

    def static_file(self, name: str) -> Response:
        data = self.static.get(name)
        if data is None:
            return Response("not found", status_code=404, media_type="text/plain")
        kind = STATIC_TYPES.get(Path(name).suffix, "application/octet-stream")
        return Response(data, media_type=kind, headers={"Cache-Control": "public, max-age=3600"})

    def guard(self, handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        """A handler whose failures are pages: sign-in redirect, CSRF refusal, the error."""

        async def page(request: Request, **params: Any) -> Response:
            try:
                return await handler(request, **params)
            except SignIn:
                target = prefix_of(request) + "/console/login"
                if request.headers.get("hx-request"):
                    return Response(status_code=401, headers={"HX-Redirect": target})
                return RedirectResponse(target, status_code=303)
            except CsrfRefused:
                return self.render(None, "error.html", 403, request=request, code=403,
                                   title="Form refused",
                                   message="This form was sent without the console's CSRF token "
                                           "(or with a stale one), so nothing was changed. Reload "
                                           "the page and send it again.")
            except ModelfleetError as exc:
                try:  # signed in: the error page keeps the navigation
                    ctx: Ctx | None = await self.ctx(request, touch=False)
                except (SignIn, ModelfleetError):
                    ctx = None
                return self.render(ctx, "error.html", exc.status, request=request,
                                   code=exc.status, title=exc.code or "error",
                                   message=exc.message)

        page.__name__ = handler.__name__
        page.__doc__ = handler.__doc__
        return page
