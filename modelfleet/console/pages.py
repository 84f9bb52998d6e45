"""The console's pages: each handler reads the session, calls the services
(with the API's tenant rules: another project's ids are 404) and renders.

Operators (an admin key) see every project and pick one with ``?project=``;
a tenant (an inference or read key) sees its own project, and a
``?project=`` naming another one is 404, as in the API.
"""

from __future__ import annotations

import csv
import hmac
import io
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from modelfleet import catalogstore, reports
from modelfleet.api.admin import check_project_name
from modelfleet.api.catalog_routes import CatalogView
from modelfleet.console import queries
from modelfleet.console.prefix import prefix_of
from modelfleet.console.web import (
    COOKIE,
    LOGIN_CSRF_COOKIE,
    TZ_COOKIE,
    CsrfRefused,
    Ctx,
    Web,
    parse_money,
)
from modelfleet.errors import AuthenticationError, InvalidRequest, NotFound, PermissionDenied
from modelfleet.jobs import job_view
from modelfleet.keys import Principal, Scope, parse_scopes
from modelfleet.projects import LIMIT_FIELDS, PlanLimits, ProjectInfo
from modelfleet.services import Services

KEYS_PER_PAGE = 50
MAX_GRACE_S = 30 * 86400


def _int_or_none(text: str | None, param: str) -> int | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(f"{param} must be a whole number", param=param) from None


class Pages:
    def __init__(self, services: Services, web: Web) -> None:
        self.services = services
        self.web = web
        self.view = CatalogView(services)

    # -- helpers ----------------------------------------------------------------------

    def project_for(self, ctx: Ctx, ref: str | None) -> ProjectInfo:
        """The project a page shows: the viewer's own, or (operators) any by id."""
        principal = ctx.principal
        project_id = ref or principal.project_id
        info = self.services.projects.project(project_id)
        if info is None or (project_id != principal.project_id and not principal.is_admin):
            raise NotFound(f"no project with id {project_id!r}", code="project_not_found")
        return info

    @staticmethod
    def acting_for(principal: Principal, project: ProjectInfo) -> Principal:
        """An operator acting on another project's jobs: the job service's
        project check, with the operator's key id."""
        return replace(principal, project_id=project.id, project_name=project.name)

    def projects(self, ctx: Ctx) -> list[ProjectInfo]:
        if ctx.principal.is_admin:
            return self.services.projects.list_projects()
        own = self.services.projects.project(ctx.principal.project_id)
        return [own] if own is not None else []

    # -- sign-in ----------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        csrf = self.web.login_csrf(request)
        out = self.web.render(None, "login.html", request=request, csrf=csrf, error=None)
        self._login_cookie(out, request, csrf)
        return out

    def _login_cookie(self, response: Response, request: Request, csrf: str) -> None:
        response.set_cookie(LOGIN_CSRF_COOKIE, csrf, path=prefix_of(request) + "/console",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    async def login(self, request: Request) -> Response:
        """Exchange an API key for a session; the key is not kept anywhere."""
        fields = await self.web.form(request, None)
        expected = request.cookies.get(LOGIN_CSRF_COOKIE)
        if not expected or not hmac.compare_digest(expected, fields.get("csrf_token", "")):
            raise CsrfRefused()
        await self.services.watcher.check()
        try:
            principal = await self.services.keys.authenticate(fields.get("key", "").strip())
        except AuthenticationError as exc:
            return self.web.render(None, "login.html", 401, request=request, csrf=expected,
                                   error=exc.message)
        token, _ = await self.web.sessions.open(principal)
        base = prefix_of(request) + "/console"
        out = RedirectResponse(base + "/models", status_code=303)
        self.web.set_session_cookie(out, request, token)
        out.delete_cookie(LOGIN_CSRF_COOKIE, path=base)
        zone = queries.zone_of(fields.get("tz"))
        out.set_cookie(TZ_COOKIE, str(zone.key), path=base, samesite="strict",
                       secure=request.url.scheme == "https")
        return out

    async def logout(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        await self.web.form(request, ctx)
        await self.web.sessions.close(request.cookies.get(COOKIE))
        out = RedirectResponse(ctx.base + "/login", status_code=303)
        out.delete_cookie(COOKIE, path=ctx.base)
        return out

    async def home(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        return RedirectResponse(ctx.base + "/models", status_code=303)

    # -- models -----------------------------------------------------------------------

    def model_rows(self, ctx: Ctx) -> list[dict[str, Any]]:
        project = self.services.projects.project(ctx.principal.project_id)
        rows = []
        for spec in self.services.catalog:
            if not ctx.principal.is_admin and project is not None and not project.may_use(spec.id):
                continue
            entry = self.view.entry(spec)
            pool = self.services.fleet.pools.get(spec.id)
            replicas = []
            if pool is not None and ctx.principal.is_admin:
                now = pool.clock()
                replicas = [{"id": r.id, "state": r.state.value, "uptime_s": int(now - r.started_at),
                             "in_flight": r.outstanding, "served": r.served}
                            for r in pool.replicas]
            entry["replicas"] = replicas
            entry["limits"] = _limits(spec)
            rows.append(entry)
        return rows

    async def models(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        events = [e.__dict__ for e in self.services.fleet.events()][-50:][::-1] \
            if ctx.principal.is_admin else []
        poll = _int_or_none(request.query_params.get("poll_ms"), "poll_ms") or 1000
        return self.web.render(ctx, "models.html", page="models", rows=self.model_rows(ctx),
                               events=_events(ctx, events), notice=self.web.notice(ctx),
                               poll_ms=max(250, min(poll, 60_000)))

    async def models_live(self, request: Request) -> Response:
        """The live part of the models page (polled every second; does not
        keep an idle session alive)."""
        ctx = await self.web.ctx(request, touch=False)
        events = [e.__dict__ for e in self.services.fleet.events()][-50:][::-1] \
            if ctx.principal.is_admin else []
        return self.web.render(ctx, "models_live.html", rows=self.model_rows(ctx),
                               events=_events(ctx, events))

    async def scale(self, request: Request) -> Response:
        """Operators: set a model's minimum replicas (stored in the catalog)."""
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        self.web.require_admin(ctx)
        model = fields.get("model", "")
        spec = self.services.catalog.resolve(model)
        if spec is None:
            raise NotFound(f"model {model!r} is not in the catalog", code="model_not_found")
        step = {"up": 1, "down": -1}.get(fields.get("direction", ""), 0)
        target = max(0, min(spec.scaling.min_replicas + step, spec.scaling.max_replicas))
        await catalogstore.CatalogStore(self.services.db).update(
            spec.id, {"scaling": {"min_replicas": target}})
        await self.services.watcher.check()
        return self.web.redirect(ctx, "/models", f"{spec.id}: min_replicas is now {target}")

    # -- keys -------------------------------------------------------------------------

    async def keys(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        q = request.query_params
        project = self.project_for(ctx, q.get("project")) if q.get("project") or \
            not ctx.principal.is_admin else None
        if not (ctx.principal.has(Scope.read) or ctx.principal.has(Scope.inference)):
            raise PermissionDenied("this key cannot read keys", code="insufficient_scope")
        started = time.perf_counter()
        page = await queries.key_page(self.services.db, project_id=project.id if project else None,
                                      before=q.get("before") or None, limit=KEYS_PER_PAGE)
        now = datetime.now(UTC)
        rows = [{**reports.key_row(k), "created": ctx.local(k.created_at),
                 "expires": ctx.local(k.expires_at), "last_used": ctx.local(k.last_used_at),
                 "status": reports.key_status(k, now)} for k in page.rows]
        out = self.web.render(ctx, "keys.html", page="keys", rows=rows, page_info=page,
                              project=project, projects=self.projects(ctx),
                              created=None, notice=self.web.notice(ctx),
                              scopes=self.grantable(ctx.principal))
        out.headers["Server-Timing"] = f"db;dur={(time.perf_counter() - started) * 1000:.1f}"
        return out

    @staticmethod
    def grantable(principal: Principal) -> list[str]:
        """Scopes this viewer may give a new key: never more than its own."""
        if principal.is_admin:
            return [s.value for s in Scope]
        return [s.value for s in Scope if s.value in principal.scopes]

    def key_project(self, ctx: Ctx, key_project_id: str | None) -> None:
        if key_project_id is None or (key_project_id != ctx.principal.project_id
                                      and not ctx.principal.is_admin):
            raise NotFound("no key with this id", code="key_not_found")

    async def create_key(self, request: Request) -> Response:
        """Create a key; its secret is on the answer page, once."""
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        project = self.project_for(ctx, fields.get("project") or None)
        scopes = parse_scopes([s for s in ("inference", "read", "admin") if fields.get(f"scope_{s}")])
        if not set(scopes) <= set(self.grantable(ctx.principal)):
            raise PermissionDenied("a key cannot grant a scope it does not have",
                                   code="insufficient_scope")
        days = (fields.get("expires_days") or "").strip()
        expires = None
        if days:
            try:
                expires = datetime.now(UTC) + timedelta(days=float(days))
            except (ValueError, OverflowError):
                raise InvalidRequest("expiry must be a number of days", param="expires_days") from None
            if not 0 < float(days) <= 3660:
                raise InvalidRequest("expiry must be between 0 and 3660 days", param="expires_days")
        created = await self.services.keys.create(project.name, scopes,
                                                  name=fields.get("name", "")[:100],
                                                  expires_at=expires)
        await self.services.watcher.check()
        return self.web.render(ctx, "key_created.html", page="keys", created=created,
                               expires=ctx.local(expires), replaces=None)

    async def revoke_key(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        await self.web.form(request, ctx)
        key_id = request.path_params["key_id"]
        row = await queries.key_row(self.services.db, key_id)
        self.key_project(ctx, row.project_id if row else None)
        await self.services.keys.revoke(key_id)
        await self.services.watcher.check()
        if key_id == ctx.principal.key_id:  # this session's own key: it has ended
            return RedirectResponse(ctx.base + "/login", status_code=303)
        return self.web.redirect(ctx, f"/keys?project={row.project_id if row else ''}",
                                 f"revoked {key_id}")

    async def rotate_key(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        key_id = request.path_params["key_id"]
        row = await queries.key_row(self.services.db, key_id)
        self.key_project(ctx, row.project_id if row else None)
        grace = _int_or_none(fields.get("grace_seconds"), "grace_seconds") or 0
        if not 0 <= grace <= MAX_GRACE_S:
            raise InvalidRequest("grace must be between 0 and 30 days", param="grace_seconds")
        created = await self.services.keys.rotate(key_id, grace)
        await self.services.watcher.check()
        old = await self.services.keys.get(key_id)
        return self.web.render(ctx, "key_created.html", page="keys", created=created,
                               expires=ctx.local(old.expires_at), replaces=old)

    # -- usage ------------------------------------------------------------------------

    async def usage_data(self, ctx: Ctx) -> tuple[ProjectInfo, queries.Usage]:
        q = ctx.request.query_params
        project = self.project_for(ctx, q.get("project"))
        if not ctx.principal.has(Scope.read) and not ctx.principal.has(Scope.inference):
            raise PermissionDenied("this key cannot read usage", code="insufficient_scope")
        today = datetime.now(ctx.zone).date()
        try:
            last = date.fromisoformat(q["until"]) if q.get("until") else today
            first = date.fromisoformat(q["since"]) if q.get("since") else last - timedelta(days=13)
        except ValueError:
            raise InvalidRequest("dates are YYYY-MM-DD", param="since") from None
        if first > last or (last - first).days >= queries.MAX_DAYS:
            raise InvalidRequest(f"pick 1 to {queries.MAX_DAYS} days, since before until",
                                 param="since")
        data = await queries.usage(self.services.db, project.id, zone=ctx.zone, first=first,
                                   last=last, key_id=q.get("key") or None)
        return project, data

    async def usage(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        project, data = await self.usage_data(ctx)
        chart = {"days": [d.isoformat() for d in data.days()],
                 "cost": [data.by_day[d].cost for d in data.days()],
                 "requests": [data.by_day[d].requests for d in data.days()]}
        return self.web.render(ctx, "usage.html", page="usage", project=project, data=data,
                               projects=self.projects(ctx), chart=chart,
                               query=str(request.query_params),
                               key_id=request.query_params.get("key") or None)

    async def usage_csv(self, request: Request) -> Response:
        """The tables of the usage page, as CSV: the same rows, the same zone."""
        ctx = await self.web.ctx(request)
        project, data = await self.usage_data(ctx)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["table", "day", "model", "key_id", "requests", "input_tokens",
                         "output_tokens", "images", "cost_micro_units", "time_zone"])
        tables: list[tuple[str, list[tuple[str, str, str, queries.Sums]]]] = [
            ("day", [(d.isoformat(), "", "", data.by_day[d]) for d in data.days()]),
            ("model", [("", m, "", s) for m, s in sorted(data.by_model.items())]),
            ("key", [("", "", k, s) for k, s in sorted(data.by_key.items())]),
        ]
        for table, rows in tables:
            for day, model, key, s in rows:
                writer.writerow([table, day, model, key, s.requests, s.input_tokens,
                                 s.output_tokens, s.images, s.cost, data.zone])
        name = f"usage-{project.name}-{data.first}-{data.last}.csv"
        return Response(out.getvalue(), media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

    # -- credits ----------------------------------------------------------------------

    async def credits(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        q = request.query_params
        project = self.project_for(ctx, q.get("project"))
        before = _int_or_none(q.get("before"), "before")
        rows = await reports.ledger_entries(self.services.db, project.id, 51, before)
        more = len(rows) > 50
        rows = rows[:50]
        for row in rows:
            row["local"] = ctx.local(datetime.fromisoformat(row["created_at"]))
        return self.web.render(ctx, "credits.html", page="credits", project=project,
                               money=await self.services.ledger.money(project.id), rows=rows,
                               next_before=rows[-1]["seq"] if more else None,
                               projects=self.projects(ctx), notice=self.web.notice(ctx))

    async def add_credit(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        self.web.require_admin(ctx)
        project = self.project_for(ctx, fields.get("project"))
        kind = "topup" if fields.get("kind") == "topup" else "adjustment"
        amount = parse_money(fields.get("amount", ""), "amount")
        await self.services.ledger.credit(project.id, amount, kind=kind,
                                          reason=fields.get("reason", "")[:500],
                                          actor=ctx.principal.key_id)
        await self.services.watcher.check()
        return self.web.redirect(ctx, f"/credits?project={project.id}", f"{kind} recorded")

    # -- jobs -------------------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        project = self.project_for(ctx, request.query_params.get("project"))
        acting = self.acting_for(ctx.principal, project)
        rows = await self.services.jobs.list(acting, None, 50)
        views = []
        for row in rows:
            view = job_view(row, str(request.base_url))
            view["created"] = ctx.local(row.created_at)
            views.append(view)
        return self.web.render(ctx, "jobs.html", page="jobs", project=project, rows=views,
                               projects=self.projects(ctx), notice=self.web.notice(ctx),
                               live_url=f"{ctx.base}/jobs?project={project.id}")

    async def job(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        project = self.project_for(ctx, request.query_params.get("project"))
        row = await self.services.jobs.get(self.acting_for(ctx.principal, project),
                                           request.path_params["job_id"])
        view = job_view(row, str(request.base_url))
        view["created"] = ctx.local(row.created_at)
        return self.web.render(ctx, "jobs.html", page="jobs", project=project, rows=[view],
                               projects=self.projects(ctx), notice=None,
                               live_url=f"{ctx.base}/jobs/{row.id}?project={project.id}")

    async def job_image(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        project = self.project_for(ctx, request.query_params.get("project"))
        data, media_type = await self.services.jobs.read_media(
            self.acting_for(ctx.principal, project), request.path_params["job_id"],
            int(request.path_params["index"]))  # a PNG, or a video job's MP4
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "private, max-age=3600"})

    async def cancel_job(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        project = self.project_for(ctx, fields.get("project") or None)
        if not ctx.principal.has(Scope.inference):
            raise PermissionDenied("cancelling needs the inference scope", code="insufficient_scope")
        job_id = request.path_params["job_id"]
        await self.services.jobs.cancel(self.acting_for(ctx.principal, project), job_id)
        return self.web.redirect(ctx, f"/jobs?project={project.id}", f"cancelled {job_id}")

    # -- operators --------------------------------------------------------------------

    async def operators(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        self.web.require_admin(ctx)
        rows = []
        for info in self.services.projects.list_projects():
            rows.append({"info": info, "money": await self.services.ledger.money(info.id)})
        return self.web.render(ctx, "operators.html", page="operators", rows=rows,
                               plans=self.services.projects.list_plans(), fields=LIMIT_FIELDS,
                               models=[s.id for s in self.services.catalog],
                               notice=self.web.notice(ctx))

    async def create_project(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        self.web.require_admin(ctx)
        name = fields.get("name", "").strip()
        check_project_name(name)
        self._check_plan(fields.get("plan"))
        if self.services.projects.by_name(name) is not None:
            raise InvalidRequest(f"a project named {name!r} exists", param="name")
        project_id, _ = await self.services.keys.ensure_project(name)
        await self.services.projects.update_project(project_id, plan=fields.get("plan") or None)
        await self.services.watcher.check()
        return self.web.redirect(ctx, "/operators", f"created project {name}")

    def _check_plan(self, plan: str | None) -> None:
        if plan and plan not in {p.name for p in self.services.projects.list_plans()}:
            raise InvalidRequest(f"no plan named {plan!r}", param="plan")

    async def update_project(self, request: Request) -> Response:
        """Assign a plan, and the models deployed to the project (none ticked: every model)."""
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        self.web.require_admin(ctx)
        project = self.project_for(ctx, request.path_params["project_id"])
        self._check_plan(fields.get("plan"))
        models = [m.strip() for m in fields.get("models", "").split(",") if m.strip()]
        for model in models:
            if self.services.catalog.resolve(model) is None:
                raise InvalidRequest(f"model {model!r} is not in the catalog", param="models")
        await self.services.projects.update_project(project.id, plan=fields.get("plan") or None,
                                                    models=models or None,
                                                    all_models=not models)
        await self.services.watcher.check()
        return self.web.redirect(ctx, "/operators", f"updated project {project.name}")

    async def put_plan(self, request: Request) -> Response:
        ctx = await self.web.ctx(request)
        fields = await self.web.form(request, ctx)
        self.web.require_admin(ctx)
        limits = {f: _int_or_none(fields.get(f), f) for f in LIMIT_FIELDS}
        for name, value in limits.items():
            if value is not None and not 1 <= value <= 2**31 - 1:
                raise InvalidRequest(f"{name} must be a positive whole number, or empty",
                                     param=name)
        plan = PlanLimits(name=fields.get("name", "").strip(), **limits,
                          priority=_int_or_none(fields.get("priority"), "priority") or 0,
                          weight=max(1, _int_or_none(fields.get("weight"), "weight") or 1),
                          batch_discount_pct=_int_or_none(fields.get("batch_discount_pct"),
                                                          "batch_discount_pct"))
        await self.services.projects.set_plan(plan)
        await self.services.watcher.check()
        return self.web.redirect(ctx, "/operators", f"saved plan {plan.name}")


LIMITS_BY_KIND = {
    "chat": ("max_messages", "max_output_tokens", "context_length", "max_prompt_chars"),
    "completion": ("max_output_tokens", "context_length", "max_prompt_chars"),
    "embedding": ("max_inputs", "max_input_tokens"),
    "image": ("min_input_images", "max_input_images", "max_prompt_chars"),
    "task": ("max_prompt_chars",),
    "video": ("max_prompt_chars", "max_frames", "max_fps", "max_seconds"),
}


def _limits(spec: Any) -> dict[str, Any]:
    """The limits that apply to a model of this kind."""
    lim = spec.limits
    out: dict[str, Any] = {name: getattr(lim, name) for name in LIMITS_BY_KIND[spec.kind.value]
                           if getattr(lim, name, None) is not None}
    if spec.kind.value in ("image", "video") and getattr(lim, "sizes", None):
        out["sizes"] = ", ".join(str(s) for s in lim.sizes)
    return out


def _events(ctx: Ctx, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "when": ctx.local(datetime.fromtimestamp(e["at"], UTC))} for e in events]
