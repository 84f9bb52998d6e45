"""The web console at ``/console``: server-rendered pages (Jinja2) over the
platform's services, with vendored htmx and uPlot (``static/``, each with its
licence); no Node.js at install, build or run time.  See docs/console.md."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from modelfleet.console.pages import Pages
from modelfleet.console.playground import Playground
from modelfleet.console.sessions import SessionStore
from modelfleet.console.web import Web
from modelfleet.services import Services

PATH = "/console"


def router(services: Services, sessions: SessionStore | None = None) -> APIRouter:
    web = Web(services, sessions or SessionStore(services.db))
    pages = Pages(services, web)
    play = Playground(services, web)
    api = APIRouter(include_in_schema=False)

    async def static(request: Request) -> Response:
        return web.static_file(request.path_params["name"])

    api.add_route(PATH + "/static/{name:path}", static, methods=["GET"])
    routes = [
        ("GET", "/", pages.home),
        ("GET", "/login", pages.login_page), ("POST", "/login", pages.login),
        ("POST", "/logout", pages.logout),
        ("GET", "/models", pages.models), ("GET", "/models/live", pages.models_live),
        ("POST", "/models/scale", pages.scale),
        ("GET", "/keys", pages.keys), ("POST", "/keys", pages.create_key),
        ("POST", "/keys/{key_id}/revoke", pages.revoke_key),
        ("POST", "/keys/{key_id}/rotate", pages.rotate_key),
        ("GET", "/usage", pages.usage), ("GET", "/usage.csv", pages.usage_csv),
        ("GET", "/credits", pages.credits), ("POST", "/credits", pages.add_credit),
        ("GET", "/jobs", pages.jobs), ("GET", "/jobs/{job_id}", pages.job),
        ("GET", "/jobs/{job_id}/result/{index:int}", pages.job_image),
        ("POST", "/jobs/{job_id}/cancel", pages.cancel_job),
        ("GET", "/playground", play.page), ("POST", "/playground/chat", play.run_chat),
        ("POST", "/playground/image", play.run_image),
        ("GET", "/playground/usage/{request_id}", play.cost),
        ("GET", "/operators", pages.operators),
        ("POST", "/operators/projects", pages.create_project),
        ("POST", "/operators/projects/{project_id}", pages.update_project),
        ("POST", "/operators/plans", pages.put_plan),
    ]
    for method, path, handler in routes:
        api.add_route(PATH + path, web.guard(handler), methods=[method])
    return api
