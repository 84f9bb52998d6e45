"""The OpenAPI document (``/openapi.json``) is valid and honest: every error a
request gets is declared for its operation, in the ``Error`` shape, and
schemathesis, over a real server with an inference key and an admin key,
finds no server error and no response outside the document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Server, catalog_text, launch_server, stop_server

DOC_URI = "urn:modelfleet:openapi"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of this module's own: schemathesis creates plans and projects."""
    tmp = tmp_path_factory.mktemp("openapi")
    running = launch_server(tmp, catalog_text(tmp, warm=False))
    try:
        yield running
    finally:
        stop_server(running.proc)


@pytest.fixture(scope="module")
def doc(api: Server) -> dict[str, Any]:
    response = httpx.get(api.url + "/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


# -- the document -------------------------------------------------------------------


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method, path, op


def test_document_validates_and_declares_errors(doc: dict[str, Any]) -> None:
    validate(doc)  # OpenAPI 3.1, every $ref resolved
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text
    assert "#/$defs/" not in text  # pydantic's $defs would resolve against the root
    assert doc["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer mf-...`"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                   "description": "`x-api-key: mf-...` (the same keys)."},
    }
    allow = doc["components"]["responses"]["MethodNotAllowed"]["headers"]["Allow"]
    assert doc["components"]["headers"]["Allow"]["required"] is True and "$ref" in allow
    public = set()
    for method, path, op in operations(doc):
        responses = op["responses"]
        assert {"408", "431", "503"} <= set(responses), (method, path)
        if op["security"] == []:
            public.add(path)
            assert "401" not in responses
        else:
            assert op["security"] == [{"bearer": []}, {"apiKey": []}]
            assert {"401", "403"} <= set(responses), (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")) and "$ref" not in response:
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
    assert public == {"/v1/inference/models", "/v1/inference/runtime/models"}
    for path in (CHAT, "/v1/completions", "/v1/embeddings", "/v1/inference/image"):
        limited = doc["paths"][path]["post"]["responses"]
        assert {"400", "404", "413", "422", "429"} <= set(limited)
        assert "Retry-After" in limited["429"]["headers"]
        ok = limited["200" if path != "/v1/inference/image" else "202"]["headers"]
        assert "x-ratelimit-remaining-requests" in ok and "X-RateLimit-Limit" in ok
    assert "text/event-stream" in doc["paths"][CHAT]["post"]["responses"]["200"]["content"]
    png = doc["paths"]["/v1/inference/jobs/{job_id}/result"]["get"]["responses"]["200"]
    assert list(png["content"]) == ["image/png"]


# -- every error seen is declared -------------------------------------------------------


class Conformance:
    """Checks a response against the operation the document gives it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.registry: Registry[Any] = Registry().with_resource(
            DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012))

    def response_object(self, method: str, path: str, status: int) -> tuple[str, dict[str, Any]]:
        """The declared response (its JSON pointer and the object, $ref followed)."""
        if path not in self.doc["paths"]:
            pointer = "/components/responses/NotFound"
        elif method.lower() not in self.doc["paths"][path]:
            pointer = "/components/responses/MethodNotAllowed"
        else:
            responses = self.doc["paths"][path][method.lower()]["responses"]
            assert str(status) in responses, f"{method} {path}: {status} is not declared"
            escaped = path.replace("~", "~0").replace("/", "~1")
            pointer = f"/paths/{escaped}/{method.lower()}/responses/{status}"
        node = self.resolve(pointer)
        while "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self.resolve(pointer)
        return pointer, node

    def resolve(self, pointer: str) -> dict[str, Any]:
        node: Any = self.doc
        for part in pointer.strip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return dict(node)

    def check(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        pointer, declared = self.response_object(method, path, response.status_code)
        media = response.headers["content-type"].split(";")[0]
        assert media in declared["content"], f"{method} {path}: {media} not declared"
        for name, header in declared.get("headers", {}).items():
            if "$ref" in header:
                header = self.resolve(header["$ref"].removeprefix("#"))
            if header.get("required"):
                assert name in response.headers, f"{method} {path}: no {name} header"
        if media != "application/json":
            return {}
        body = response.json()
        escaped_media = media.replace("/", "~1")
        schema = {"$ref": f"{DOC_URI}#{pointer}/content/{escaped_media}/schema"}
        Draft202012Validator(schema, registry=self.registry).validate(body)
        return dict(body)


def test_every_error_seen_is_declared(api: Server, doc: dict[str, Any]) -> None:
    conform = Conformance(doc)
    inference = {"Authorization": f"Bearer {api.key}"}
    admin = {"x-api-key": api.admin_key}
    seen: set[tuple[str, int]] = set()

    def call(method: str, template: str, expect: int, path: str | None = None,
             headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        response = httpx.request(method, api.url + (path or template), headers=headers,
                                 timeout=30, **kwargs)
        assert response.status_code == expect, (method, path or template, response.text)
        conform.check(method, template, response)
        seen.add((template, expect))
        return response

    def chat(model: str = "test/missing", **extra: Any) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1, **extra}

    # keys
    call("GET", "/v1/models", 401)
    call("GET", "/v1/models", 401, headers={"x-api-key": "mf-" + "x" * 43})
    call("GET", "/v1/models", 403, headers={**inference, "x-project-id": "someone-else"})
    call("POST", CHAT, 401, json=chat())
    call("GET", "/v1/admin/projects", 403, headers=inference)
    call("GET", "/v1/projects/{project_id}/balance", 403, "/v1/projects/current/balance",
         headers=inference)  # no `read` scope
    # bodies
    call("POST", CHAT, 404, headers=inference, json=chat("no/such-model"))
    call("POST", CHAT, 422, headers=inference, json={"model": "test/missing"})
    call("POST", CHAT, 422, headers=inference, content=b"{not json")
    call("POST", CHAT, 413, headers=inference, content=b"x" * (9 * 1024 * 1024))
    call("POST", CHAT, 400, headers={**inference, "content-type": "text/plain"},
         content=json.dumps(chat()).encode())
    call("POST", CHAT, 400, headers=inference, json=chat(max_tokens=10**6))
    call("POST", CHAT, 400, headers=inference, json=chat("test/nostream", stream=True))
    call("POST", "/v1/embeddings", 400, headers=inference,
         json={"model": "test/missing", "input": "hi"})
    call("POST", "/v1/inference/image", 422, headers=inference, json={"prompt": "x"})
    call("POST", "/v1/images/generations", 404, headers=inference,
         json={"model": "no/such-model", "prompt": "x"})
    # answers: JSON, and a stream (a real llama.cpp worker, one token each)
    ok = call("POST", CHAT, 200, headers=inference, json=chat("test/priced"))
    assert "x-ratelimit-remaining-requests" in ok.headers
    call("POST", CHAT, 200, headers=inference, json=chat("test/priced", stream=True))
    # the model cannot serve; the deadline passes while it starts
    call("POST", CHAT, 503, headers=inference, json=chat())
    call("POST", CHAT, 504, headers=inference, json=chat("test/queue-timeout"))
    # jobs and account
    call("GET", "/v1/inference/jobs", 400, "/v1/inference/jobs?limit=0", headers=inference)
    call("GET", "/v1/inference/jobs", 422, "/v1/inference/jobs?limit=many", headers=inference)
    call("GET", "/v1/inference/jobs/{job_id}", 404, "/v1/inference/jobs/nope", headers=inference)
    call("POST", "/v1/inference/jobs/{job_id}/cancel", 404, "/v1/inference/jobs/nope/cancel",
         headers=inference)
    call("GET", "/v1/inference/jobs/{job_id}/result/{index}", 422,
         "/v1/inference/jobs/nope/result/first", headers=inference)
    call("GET", "/v1/projects/{project_id}/ledger", 404, "/v1/projects/not-mine/ledger",
         headers=inference)
    call("GET", "/v1/projects/{project_id}/usage", 400, "/v1/projects/current/usage?group=hour",
         headers=admin)
    call("GET", "/v1/models/{model_id}", 404, "/v1/models/no/such-model", headers=inference)
    call("GET", "/v1/admin/scale-events", 404, "/v1/admin/scale-events?model=nope", headers=admin)
    # admin bodies
    call("POST", "/v1/admin/projects", 422, headers=admin, json={"name": 5})
    call("POST", "/v1/admin/projects", 400, headers=admin, json={"name": "p", "plan": "nope"})
    call("POST", "/v1/admin/projects", 201, headers=admin, json={"name": "tight"})
    call("POST", "/v1/admin/projects", 409, headers=admin, json={"name": "tight"})
    call("POST", "/v1/admin/projects", 413, headers=admin, content=b"x" * (65 * 1024))
    call("PUT", "/v1/admin/plans/{name}", 400, "/v1/admin/plans/one-rpm", headers=admin,
         json={"weight": 0})
    call("PUT", "/v1/admin/plans/{name}", 200, "/v1/admin/plans/one-rpm", headers=admin,
         json={"key_rpm": 1})
    call("PATCH", "/v1/admin/projects/{project_id}", 200, "/v1/admin/projects/tight",
         headers=admin, json={"plan": "one-rpm"})
    call("PUT", "/v1/admin/prices/{model_id}", 404, "/v1/admin/prices/nope", headers=admin,
         json={"input_per_million": 1, "output_per_million": 1})
    call("POST", "/v1/admin/keys/{key_id}/revoke", 404, "/v1/admin/keys/nope/revoke",
         headers=admin)
    tight = [{"x-api-key": call("POST", "/v1/admin/projects/{project_id}/keys", 201,
                                "/v1/admin/projects/tight/keys", headers=admin,
                                json={"scopes": ["inference"]}).json()["key"]} for _ in range(2)]
    # no credit: a priced model is refused
    refused = call("POST", CHAT, 403, headers=tight[0], json=chat("test/priced"))
    assert refused.json()["error"]["code"] == "insufficient_credits"
    # the plan's one request a minute, then 429 with Retry-After and the limit headers
    call("POST", CHAT, 503, headers=tight[1], json=chat())
    limited = call("POST", CHAT, 429, headers=tight[1], json=chat())
    declared = {name.lower() for name in doc["paths"][CHAT]["post"]["responses"]["429"]["headers"]}
    sent = {name.lower() for name in limited.headers if name.lower().startswith("x-ratelimit")}
    assert "retry-after" in limited.headers and "x-ratelimit-remaining-requests" in sent
    assert sent <= declared

    # no route: the document's shared response
    call("GET", "/v1/no-such-route", 404)
    statuses = {status for _, status in seen}
    assert statuses >= {400, 401, 403, 404, 409, 413, 422, 429, 503, 504}


@pytest.mark.parametrize(("method", "path"), [("DELETE", CHAT), ("GET", CHAT),
                                              ("POST", "/v1/models"), ("PUT", "/v1/admin/plans")])
def test_wrong_method_is_405_with_allow(api: Server, doc: dict[str, Any], method: str,
                                        path: str) -> None:
    """A method a path does not take: 405 as ``components.responses.MethodNotAllowed``
    declares it, with ``Allow`` naming the methods the path takes."""
    response = httpx.request(method, api.url + path, headers={"x-api-key": api.key})
    assert response.status_code == 405
    Conformance(doc).check(method, path, response)
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed == {m.upper() for m in doc["paths"][path]}


# -- schemathesis ------------------------------------------------------------------------


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
EXAMPLES = 10  # per operation, mode and key


def fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str],
         session: requests.Session) -> str | None:
    """``EXAMPLES`` cases of ``operation``, each checked; the first failure, if any
    (not shrunk: the run stays bounded)."""

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(session=session, headers=headers, checks=CHECKS, timeout=30)

    try:
        run()
    except (Exception, FailureGroup) as exc:  # schemathesis' failures are a BaseExceptionGroup
        return f"{operation.label} ({mode.value}): {exc}"
    return None


@pytest.mark.parametrize("actor", ["inference", "admin"])
def test_schemathesis(api: Server, doc: dict[str, Any], actor: str) -> None:
    """Every operation, with valid and (where it takes input) invalid data,
    under the key of ``actor``: no server error, and every answer declared
    (status, content type, body)."""
    key = api.key if actor == "inference" else api.admin_key
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    failures = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result  # the document is one schemathesis can read
            operation = result.ok()
            op = doc["paths"][operation.path][operation.method.lower()]
            takes_input = "parameters" in op or "requestBody" in op
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:1 + takes_input]:
                failure = fuzz(operation, mode, {"Authorization": f"Bearer {key}"}, session)
                if failure:
                    failures.append(failure)
    assert not failures, "\n\n".join(failures)
