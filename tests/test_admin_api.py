"""The admin API (/v1/admin) and the account endpoints (/v1/projects/...), in
process: scopes, the 404-not-403 rule, money in integer micro-units, keys,
plans and prices.  No model worker is started here; usage rows are written
straight into the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from modelfleet.ids import new_id
from modelfleet.keys import CreatedKey
from modelfleet.tables import LedgerEntry, UsageRecord
from tests.conftest import CHAT, Actors

PRICED = "test/priced"  # catalog: 1_000_000 in, 10_000_000 out per million tokens


def assert_error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code", "param", "status"}
    assert err["status"] == status
    if code is not None:
        assert err["code"] == code, err
    return err


def bearer(key: CreatedKey | str) -> dict[str, str]:
    raw = key if isinstance(key, str) else key.key
    return {"Authorization": f"Bearer {raw}"}


async def ledger_rows(app: Actors, project_id: str) -> int:
    async with app.services.db.session() as session:
        count = await session.scalar(
            select(func.count()).select_from(LedgerEntry).where(LedgerEntry.project_id == project_id)
        )
    return int(count or 0)


async def balance(app: Actors, project_id: str) -> int:
    resp = await app.client.get(f"/v1/admin/projects/{project_id}", headers=app.auth(app.admin))
    assert resp.status_code == 200, resp.text
    return int(resp.json()["balance"])


async def top_up(app: Actors, project_id: str, amount: int, reason: str = "") -> dict[str, Any]:
    resp = await app.client.post(f"/v1/admin/projects/{project_id}/credits",
                                 json={"amount": amount, "reason": reason},
                                 headers=app.auth(app.admin))
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


# -- scopes -------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/v1/admin/projects", {"name": "x"}),
    ("GET", "/v1/admin/projects", None),
    ("GET", "/v1/admin/projects/{pid}", None),
    ("PATCH", "/v1/admin/projects/{pid}", {"plan": "default"}),
    ("POST", "/v1/admin/projects/{pid}/keys", {"scopes": ["admin"]}),
    ("GET", "/v1/admin/projects/{pid}/keys", None),
    ("POST", "/v1/admin/keys/{kid}/revoke", None),
    ("POST", "/v1/admin/keys/{kid}/rotate", {"grace_seconds": 0}),
    ("POST", "/v1/admin/projects/{pid}/credits", {"amount": 1_000_000}),
    ("POST", "/v1/admin/projects/{pid}/adjustments", {"amount": 5, "reason": "x"}),
    ("GET", "/v1/admin/plans", None),
    ("PUT", "/v1/admin/plans/gold", {"key_rpm": 5}),
    ("GET", "/v1/admin/prices", None),
    ("PUT", f"/v1/admin/prices/{CHAT}", {"input_per_million": 0, "output_per_million": 0}),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_admin_routes_refuse_non_admin_keys(
    app: Actors, method: str, path: str, body: dict[str, Any] | None
) -> None:
    reader = await app.services.keys.create("tenant", ["inference", "read"])
    url = path.format(pid=app.tenant.project_id, kid=app.tenant.key_id)
    for key in (app.tenant, reader):
        resp = await app.client.request(method, url, json=body, headers=bearer(key))
        assert_error(resp, 403, "insufficient_scope")
    assert_error(await app.client.request(method, url, json=body), 401, "missing_api_key")
    # nothing changed: the tenant's key still works, no money moved, no project made
    assert (await app.client.get("/v1/models", headers=bearer(app.tenant))).status_code == 200
    assert await ledger_rows(app, app.tenant.project_id) == 0
    assert app.services.projects.by_name("x") is None


# -- projects -----------------------------------------------------------------------


async def test_create_list_get_and_patch_projects(app: Actors) -> None:
    admin = app.auth(app.admin)
    await app.client.put("/v1/admin/plans/gold", json={"key_rpm": 50}, headers=admin)
    resp = await app.client.post("/v1/admin/projects", headers=admin,
                                 json={"name": "acme", "plan": "gold", "models": ["smollm2"]})
    assert resp.status_code == 201, resp.text
    acme = resp.json()
    assert acme["name"] == "acme" and acme["plan"] == "gold" and acme["models"] == [CHAT]
    assert (acme["balance"], acme["held"], acme["available"]) == (0, 0, 0)

    listing = (await app.client.get("/v1/admin/projects", headers=admin)).json()["data"]
    by_name = {p["name"]: p for p in listing}
    assert set(by_name) == {"tenant", "other", "ops", "acme"}
    assert by_name["acme"]["id"] == acme["id"]
    assert all({"balance", "held", "available"} <= set(p) for p in listing)

    one = await app.client.get(f"/v1/admin/projects/{acme['id']}", headers=admin)
    assert one.json() == acme
    by_project_name = await app.client.get("/v1/admin/projects/acme", headers=admin)
    assert by_project_name.json()["id"] == acme["id"]

    patched = await app.client.patch(f"/v1/admin/projects/{acme['id']}", headers=admin,
                                     json={"models": None})
    assert patched.status_code == 200 and patched.json()["models"] is None
    assert patched.json()["plan"] == "gold"  # untouched
    patched = await app.client.patch(f"/v1/admin/projects/{acme['id']}", headers=admin,
                                     json={"plan": "default", "models": ["gemma3-270m", CHAT]})
    assert patched.json()["plan"] == "default"
    assert patched.json()["models"] == sorted([CHAT, "google/gemma-3-270m"])
    # the change is what requests see: the project's deployed models
    info = app.services.projects.project(acme["id"])
    assert info is not None and info.may_use(CHAT) and not info.may_use("test/priced")


async def test_project_errors(app: Actors) -> None:
    admin = app.auth(app.admin)
    pid = app.tenant.project_id
    assert_error(await app.client.post("/v1/admin/projects", json={"name": "tenant"},
                                       headers=admin), 409, "project_exists")
    assert_error(await app.client.post("/v1/admin/projects", json={"name": "../x"},
                                       headers=admin), 400)
    # a bad plan or model creates nothing
    for body in ({"name": "new-a", "plan": "nope"}, {"name": "new-a", "models": ["nope"]},
                 {"name": "new-a", "models": []}):
        assert_error(await app.client.post("/v1/admin/projects", json=body, headers=admin), 400)
    assert app.services.projects.by_name("new-a") is None
    assert_error(await app.client.post("/v1/admin/projects", json={"name": 5}, headers=admin), 422)
    assert_error(await app.client.post("/v1/admin/projects", json={"name": "z", "extra": 1},
                                       headers=admin), 422)
    assert_error(await app.client.get("/v1/admin/projects/no-such", headers=admin),
                 404, "project_not_found")
    assert_error(await app.client.patch("/v1/admin/projects/no-such", json={}, headers=admin),
                 404, "project_not_found")
    for body in ({"plan": "nope"}, {"plan": None}, {"models": []}, {"models": ["nope"]}):
        assert_error(await app.client.patch(f"/v1/admin/projects/{pid}", json=body,
                                            headers=admin), 400)
    assert_error(await app.client.patch(f"/v1/admin/projects/{pid}", json={"models": "all"},
                                        headers=admin), 422)


# -- keys ---------------------------------------------------------------------------


async def test_create_key_is_shown_once_and_works(app: Actors) -> None:
    admin = app.auth(app.admin)
    pid = app.tenant.project_id
    resp = await app.client.post(f"/v1/admin/projects/{pid}/keys", headers=admin,
                                 json={"scopes": ["inference", "read"], "name": "ci",
                                       "expires_in_seconds": 3600})
    assert resp.status_code == 201, resp.text
    made = resp.json()
    assert made["key"].startswith("mf-") and made["prefix"] == made["key"][:11]
    assert made["scopes"] == ["inference", "read"] and made["project_id"] == pid
    expires = datetime.fromisoformat(made["expires_at"])
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    ok = await app.client.get("/v1/projects/current/balance", headers=bearer(made["key"]))
    assert ok.status_code == 200 and ok.json()["project_id"] == pid

    for url in (f"/v1/admin/projects/{pid}/keys", f"/v1/projects/{pid}/keys"):
        listing = await app.client.get(url, headers=admin)
        assert listing.status_code == 200
        assert made["key"] not in listing.text
        rows = {k["id"]: k for k in listing.json()["data"]}
        assert "key" not in rows[made["id"]] and "key_hash" not in rows[made["id"]]
        assert rows[made["id"]]["prefix"] == made["prefix"]
        assert rows[made["id"]]["status"] == "active" and rows[made["id"]]["name"] == "ci"
        assert app.tenant.key_id in rows

    at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    resp = await app.client.post(f"/v1/admin/projects/{pid}/keys", headers=admin,
                                 json={"scopes": ["read"], "expires_at": at})
    assert resp.status_code == 201 and resp.json()["expires_at"] == at


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"scopes": ["root"]}, 400),
        ({"scopes": []}, 400),
        ({"scopes": ["read"], "expires_in_seconds": 0}, 400),
        ({"scopes": ["read"], "expires_in_seconds": 10**12}, 400),
        ({"scopes": ["read"], "expires_at": "2001-01-01T00:00:00Z"}, 400),
        ({"scopes": ["read"], "expires_at": "tomorrow"}, 400),
        ({"scopes": ["read"], "expires_in_seconds": 60,
          "expires_at": "2999-01-01T00:00:00Z"}, 400),
        ({"scopes": ["read"], "expires_in_seconds": 1.5}, 422),
        ({"scopes": "read"}, 422),
        ({}, 422),
        ({"scopes": ["read"], "secret": "mine"}, 422),
    ],
)
async def test_create_key_rejects_bad_bodies(app: Actors, body: dict[str, Any],
                                             status: int) -> None:
    pid = app.tenant.project_id
    before = await app.services.keys.list_keys(project_id=pid)
    resp = await app.client.post(f"/v1/admin/projects/{pid}/keys", json=body,
                                 headers=app.auth(app.admin))
    assert_error(resp, status)
    assert len(await app.services.keys.list_keys(project_id=pid)) == len(before)


async def test_create_key_for_unknown_project_is_404(app: Actors) -> None:
    resp = await app.client.post("/v1/admin/projects/no-such/keys", json={"scopes": ["read"]},
                                 headers=app.auth(app.admin))
    assert_error(resp, 404, "project_not_found")


async def test_revoke_refuses_the_next_request(app: Actors) -> None:
    key = await app.services.keys.create("tenant", ["inference"])
    assert (await app.client.get("/v1/models", headers=bearer(key))).status_code == 200
    resp = await app.client.post(f"/v1/admin/keys/{key.key_id}/revoke",
                                 headers=app.auth(app.admin))
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "revoked" and resp.json()["revoked_at"]
    assert_error(await app.client.get("/v1/models", headers=bearer(key)), 401, "revoked_api_key")
    assert (await app.client.get("/v1/models", headers=bearer(app.tenant))).status_code == 200
    assert_error(await app.client.post("/v1/admin/keys/no-such/revoke",
                                       headers=app.auth(app.admin)), 404, "key_not_found")
    # a revoked key cannot be rotated back to life
    assert_error(await app.client.post(f"/v1/admin/keys/{key.key_id}/rotate",
                                       json={"grace_seconds": 60}, headers=app.auth(app.admin)),
                 400)


async def test_rotate_with_no_grace_stops_the_old_key_now(app: Actors) -> None:
    old = await app.services.keys.create("tenant", ["inference", "read"], name="svc")
    assert (await app.client.get("/v1/models", headers=bearer(old))).status_code == 200
    resp = await app.client.post(f"/v1/admin/keys/{old.key_id}/rotate",
                                 json={"grace_seconds": 0}, headers=app.auth(app.admin))
    assert resp.status_code == 201, resp.text
    new = resp.json()
    assert new["key"] != old.key and new["id"] != old.key_id
    assert new["scopes"] == ["inference", "read"] and new["project_id"] == old.project_id
    assert new["replaces"]["id"] == old.key_id
    assert (await app.client.get("/v1/models", headers=bearer(new["key"]))).status_code == 200
    assert_error(await app.client.get("/v1/models", headers=bearer(old)), 401, "expired_api_key")
    # and an expired key cannot be rotated again
    assert_error(await app.client.post(f"/v1/admin/keys/{old.key_id}/rotate",
                                       json={"grace_seconds": 0}, headers=app.auth(app.admin)),
                 400)


async def test_rotate_with_grace_keeps_the_old_key_working(app: Actors) -> None:
    old = await app.services.keys.create("tenant", ["inference"])
    resp = await app.client.post(f"/v1/admin/keys/{old.key_id}/rotate",
                                 json={"grace_seconds": 60}, headers=app.auth(app.admin))
    assert resp.status_code == 201, resp.text
    new = resp.json()
    ends = datetime.fromisoformat(new["replaces"]["expires_at"])
    assert timedelta(seconds=55) < ends - datetime.now(UTC) <= timedelta(seconds=60)
    assert (await app.client.get("/v1/models", headers=bearer(old))).status_code == 200
    assert (await app.client.get("/v1/models", headers=bearer(new["key"]))).status_code == 200


@pytest.mark.parametrize(("body", "status"), [
    ({"grace_seconds": -1}, 400), ({"grace_seconds": 31 * 86400}, 400),
    ({"grace_seconds": 1.5}, 422), ({"grace_seconds": "60"}, 422), ({}, 422),
])
async def test_rotate_rejects_bad_grace(app: Actors, body: dict[str, Any], status: int) -> None:
    resp = await app.client.post(f"/v1/admin/keys/{app.tenant.key_id}/rotate", json=body,
                                 headers=app.auth(app.admin))
    assert_error(resp, status)
    assert (await app.client.get("/v1/models", headers=bearer(app.tenant))).status_code == 200
    assert len(await app.services.keys.list_keys(project_id=app.tenant.project_id)) == 1


async def test_rotate_unknown_key_is_404(app: Actors) -> None:
    resp = await app.client.post("/v1/admin/keys/no-such/rotate", json={"grace_seconds": 0},
                                 headers=app.auth(app.admin))
    assert_error(resp, 404, "key_not_found")


# -- money --------------------------------------------------------------------------


async def test_top_up_moves_the_balance_and_is_a_ledger_row(app: Actors) -> None:
    pid = app.tenant.project_id
    assert await balance(app, pid) == 0
    body = await top_up(app, pid, 2_500_000, "invoice 7")
    assert body["balance"] == 2_500_000 and body["available"] == 2_500_000 and body["held"] == 0
    entry = body["entry"]
    assert entry["amount"] == 2_500_000 and entry["kind"] == "topup"
    assert entry["reason"] == "invoice 7" and entry["actor"] == app.admin.key_id
    assert entry["project_id"] == pid and isinstance(entry["seq"], int)
    assert await balance(app, pid) == 2_500_000
    assert (await app.services.ledger.balance(pid))[0] == 2_500_000
    assert await ledger_rows(app, pid) == 1
    # another project is untouched
    assert await balance(app, app.other_tenant.project_id) == 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"amount": -5}', 400),
        (b'{"amount": 0}', 400),
        (b'{"amount": 1000000000000000001}', 400),
        (b'{"amount": 1.5}', 422),
        (b'{"amount": 1000000.0}', 422),
        (b'{"amount": 1e6}', 422),
        (b'{"amount": "1000000"}', 422),
        (b'{"amount": true}', 422),
        (b'{"amount": null}', 422),
        (b'{"amount": [1]}', 422),
        (b'{"reason": "no amount"}', 422),
        (b'{"amount": 5, "currency": "USD"}', 422),
        (b'{"amount": 5, "amount": 6}', 422),
        (b'{"amount": NaN}', 422),
        (b"[5]", 422),
        (b"not json", 422),
    ],
)
async def test_bad_top_ups_change_nothing(app: Actors, raw: bytes, status: int) -> None:
    pid = app.tenant.project_id
    await top_up(app, pid, 1_000_000)
    before, rows = await balance(app, pid), await ledger_rows(app, pid)
    resp = await app.client.post(f"/v1/admin/projects/{pid}/credits", content=raw,
                                 headers={**app.auth(app.admin),
                                          "content-type": "application/json"})
    err = assert_error(resp, status)
    if status == 400:
        assert err["param"] == "amount"
    assert await balance(app, pid) == before == 1_000_000
    assert await ledger_rows(app, pid) == rows == 1


async def test_adjustments_need_a_reason_and_a_non_zero_amount(app: Actors) -> None:
    pid = app.tenant.project_id
    admin = app.auth(app.admin)
    url = f"/v1/admin/projects/{pid}/adjustments"
    await top_up(app, pid, 1_000_000)
    assert_error(await app.client.post(url, json={"amount": -100}, headers=admin), 422)
    err = assert_error(await app.client.post(url, json={"amount": -100, "reason": "  "},
                                             headers=admin), 400)
    assert err["param"] == "reason"
    assert_error(await app.client.post(url, json={"amount": 0, "reason": "x"}, headers=admin), 400)
    assert_error(await app.client.post(url, json={"amount": -1.0, "reason": "x"}, headers=admin),
                 422)
    assert await balance(app, pid) == 1_000_000 and await ledger_rows(app, pid) == 1
    resp = await app.client.post(url, json={"amount": -250_000, "reason": "refund of a mistake"},
                                 headers=admin)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["balance"] == 750_000
    assert body["entry"]["kind"] == "adjustment" and body["entry"]["amount"] == -250_000
    assert body["entry"]["reason"] == "refund of a mistake"
    resp = await app.client.post(url, json={"amount": 5, "reason": "goodwill"}, headers=admin)
    assert resp.json()["balance"] == 750_005
    assert await ledger_rows(app, pid) == 3


async def test_money_for_unknown_project_is_404(app: Actors) -> None:
    admin = app.auth(app.admin)
    for path, body in (("credits", {"amount": 5}), ("adjustments", {"amount": 5, "reason": "x"})):
        resp = await app.client.post(f"/v1/admin/projects/no-such/{path}", json=body,
                                     headers=admin)
        assert_error(resp, 404, "project_not_found")


async def test_ledger_lists_every_change_newest_first(app: Actors) -> None:
    pid = app.tenant.project_id
    amounts = [1_000_000, 2_000_000, 3_000_000]
    for amount in amounts:
        await top_up(app, pid, amount)
    await app.client.post(f"/v1/admin/projects/{pid}/adjustments",
                          json={"amount": -500, "reason": "fix"}, headers=app.auth(app.admin))
    reader = await app.services.keys.create("tenant", ["read"])
    resp = await app.client.get(f"/v1/projects/{pid}/ledger", headers=bearer(reader))
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [e["amount"] for e in data] == [-500, 3_000_000, 2_000_000, 1_000_000]
    assert [e["seq"] for e in data] == sorted((e["seq"] for e in data), reverse=True)
    assert resp.json()["has_more"] is False
    assert len(data) == await ledger_rows(app, pid) == 4

    page = (await app.client.get(f"/v1/projects/{pid}/ledger?limit=3",
                                 headers=bearer(reader))).json()
    assert [e["amount"] for e in page["data"]] == [-500, 3_000_000, 2_000_000]
    assert page["has_more"] is True and page["next_before_seq"] == page["data"][-1]["seq"]
    rest = (await app.client.get(f"/v1/projects/{pid}/ledger",
                                 params={"before_seq": page["next_before_seq"]},
                                 headers=bearer(reader))).json()
    assert [e["amount"] for e in rest["data"]] == [1_000_000] and rest["has_more"] is False
    for query in ("limit=0", "limit=1001", "before_seq=0"):
        assert_error(await app.client.get(f"/v1/projects/{pid}/ledger?{query}",
                                          headers=bearer(reader)), 400)
    assert_error(await app.client.get(f"/v1/projects/{pid}/ledger?limit=many",
                                      headers=bearer(reader)), 422)


# -- the account endpoints: who may read what ---------------------------------------

ACCOUNT = ["balance", "ledger", "usage", "keys"]


@pytest.mark.parametrize("what", ACCOUNT)
async def test_account_scope_rules(app: Actors, what: str) -> None:
    pid = app.tenant.project_id
    url = f"/v1/projects/{pid}/{what}"
    reader = await app.services.keys.create("tenant", ["read"])
    other_reader = await app.services.keys.create("other", ["read", "inference"])

    own = await app.client.get(url, headers=bearer(reader))
    assert own.status_code == 200, own.text
    assert own.json()["project_id"] == pid
    current = await app.client.get(f"/v1/projects/current/{what}", headers=bearer(reader))
    assert current.status_code == 200 and current.json()["project_id"] == pid
    # an admin key reads any project
    assert (await app.client.get(url, headers=app.auth(app.admin))).status_code == 200
    # own project without the read scope: 403
    assert_error(await app.client.get(url, headers=bearer(app.tenant)), 403, "insufficient_scope")
    # another project's id: 404, with or without the read scope, exactly like no project
    for key in (other_reader, app.other_tenant):
        theirs = assert_error(await app.client.get(url, headers=bearer(key)),
                              404, "project_not_found")
        missing = assert_error(await app.client.get(f"/v1/projects/no-such/{what}",
                                                    headers=bearer(key)),
                               404, "project_not_found")
        assert theirs["type"] == missing["type"]
    assert_error(await app.client.get("/v1/projects/no-such/" + what,
                                      headers=app.auth(app.admin)), 404, "project_not_found")
    assert_error(await app.client.get(url), 401)


async def test_balance_shows_micro_units(app: Actors) -> None:
    pid = app.tenant.project_id
    await top_up(app, pid, 1_234_567)
    reader = await app.services.keys.create("tenant", ["read"])
    resp = await app.client.get("/v1/projects/current/balance", headers=bearer(reader))
    assert resp.json() == {"object": "balance", "project_id": pid, "balance": 1_234_567,
                           "held": 0, "available": 1_234_567}


# -- usage --------------------------------------------------------------------------


async def insert_usage(app: Actors, rows: list[dict[str, Any]]) -> None:
    full = []
    for row in rows:
        full.append({"request_id": new_id(), "input_tokens": 10, "output_tokens": 5, "cost": 7,
                     "status": "succeeded", "wait_ms": 1, "run_ms": 2, "total_ms": 3, **row})
    async with app.services.db.session() as session, session.begin():
        await session.execute(insert(UsageRecord), full)


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2025, 3, day, hour, tzinfo=UTC)


async def test_usage_summary_groups_and_filters(app: Actors) -> None:
    pid = app.tenant.project_id
    key_a, key_b = app.tenant.key_id, new_id()
    base = {"project_id": pid}
    await insert_usage(app, [
        {**base, "key_id": key_a, "model_id": CHAT, "created_at": at(1, 0)},
        {**base, "key_id": key_a, "model_id": CHAT, "created_at": at(1, 23), "status": "failed",
         "cost": 0},
        {**base, "key_id": key_b, "model_id": PRICED, "created_at": at(1, 5),
         "input_tokens": 100, "output_tokens": 50, "cost": 600},
        {**base, "key_id": key_b, "model_id": CHAT, "created_at": at(3),
         "status": "disconnected"},
        # another project's usage never shows
        {"project_id": app.other_tenant.project_id, "key_id": app.other_tenant.key_id,
         "model_id": CHAT, "created_at": at(1)},
    ])
    reader = await app.services.keys.create("tenant", ["read"])
    headers = bearer(reader)

    async def get(**params: str) -> dict[str, Any]:
        resp = await app.client.get(f"/v1/projects/{pid}/usage", params=params, headers=headers)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    by_day = await get()
    assert by_day["group"] == "day"
    assert [(r["day"], r["model_id"], r["requests"], r["input_tokens"], r["output_tokens"],
             r["cost"]) for r in by_day["data"]] == [
        ("2025-03-01", None, 3, 120, 60, 607), ("2025-03-03", None, 1, 10, 5, 7)]
    assert by_day["data"][0]["statuses"] == {"succeeded": 2, "failed": 1, "cancelled": 0,
                                             "abandoned": 0, "disconnected": 0}
    totals = by_day["totals"]
    assert (totals["requests"], totals["cost"], totals["input_tokens"]) == (4, 614, 130)
    assert totals["statuses"]["disconnected"] == 1

    by_model = await get(group="model")
    assert [(r["day"], r["model_id"], r["requests"]) for r in by_model["data"]] == [
        (None, CHAT, 3), (None, PRICED, 1)]
    both = await get(group="day_model")
    assert [(r["day"], r["model_id"], r["requests"]) for r in both["data"]] == [
        ("2025-03-01", CHAT, 2), ("2025-03-01", PRICED, 1), ("2025-03-03", CHAT, 1)]

    only_b = await get(key_id=key_b, group="model")
    assert [(r["model_id"], r["requests"]) for r in only_b["data"]] == [(CHAT, 1), (PRICED, 1)]
    # a bare date for until includes that whole day; since is inclusive
    first_day = await get(since="2025-03-01", until="2025-03-01")
    assert [r["requests"] for r in first_day["data"]] == [3]
    later = await get(since="2025-03-01T06:00:00Z")
    assert [(r["day"], r["requests"]) for r in later["data"]] == [
        ("2025-03-01", 1), ("2025-03-03", 1)]
    assert (await get(since="2025-04-01"))["data"] == []

    for params in ({"group": "week"}, {"since": "yesterday"}, {"until": "2025-02-30"},
                   {"since": "2025-03-05", "until": "2025-03-01"}):
        resp = await app.client.get(f"/v1/projects/{pid}/usage", params=params, headers=headers)
        assert_error(resp, 400)


async def test_usage_of_another_projects_key_is_empty(app: Actors) -> None:
    await insert_usage(app, [{"project_id": app.other_tenant.project_id, "created_at": at(2),
                              "key_id": app.other_tenant.key_id, "model_id": CHAT}])
    reader = await app.services.keys.create("tenant", ["read"])
    resp = await app.client.get("/v1/projects/current/usage",
                                params={"key_id": app.other_tenant.key_id}, headers=bearer(reader))
    assert resp.status_code == 200 and resp.json()["data"] == []
    assert resp.json()["totals"]["requests"] == 0


# -- plans and prices ---------------------------------------------------------------


async def test_plans_put_then_get(app: Actors) -> None:
    admin = app.auth(app.admin)
    body = {"key_rpm": 60, "key_tpm": 10_000, "key_concurrency": 2, "project_rpm": None,
            "project_tpm": 100_000, "project_concurrency": 8, "priority": 5, "weight": 3,
            "batch_discount_pct": 25}
    resp = await app.client.put("/v1/admin/plans/gold", json=body, headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"object": "plan", "name": "gold", **body}
    plans = {p["name"]: p for p in (await app.client.get("/v1/admin/plans",
                                                         headers=admin)).json()["data"]}
    assert set(plans) == {"default", "gold"}
    assert plans["gold"] == {"object": "plan", "name": "gold", **body}
    assert plans["default"]["key_rpm"] == 1000

    # a PUT replaces: omitted fields take a new plan's defaults
    resp = await app.client.put("/v1/admin/plans/gold", json={"key_rpm": None}, headers=admin)
    assert resp.json() == {"object": "plan", "name": "gold", "key_rpm": None, "key_tpm": None,
                           "key_concurrency": None, "project_rpm": None, "project_tpm": None,
                           "project_concurrency": None, "priority": 0, "weight": 1,
                           "batch_discount_pct": None}
    # the plan applies to a project put on it
    pid = app.tenant.project_id
    await app.client.patch(f"/v1/admin/projects/{pid}", json={"plan": "gold"}, headers=admin)
    assert app.services.projects.plan_of(pid).name == "gold"


@pytest.mark.parametrize(("body", "status"), [
    ({"key_rpm": 0}, 400), ({"key_tpm": -1}, 400), ({"weight": 0}, 400),
    ({"project_rpm": 2**40}, 400), ({"key_rpm": 1.5}, 422), ({"key_rpm": "5"}, 422),
    ({"key_rpm": True}, 422), ({"burst": 5}, 422), ({"batch_discount_pct": 101}, 400),
    ({"batch_discount_pct": -1}, 400),
])
async def test_bad_plans_are_refused(app: Actors, body: dict[str, Any], status: int) -> None:
    resp = await app.client.put("/v1/admin/plans/bad", json=body, headers=app.auth(app.admin))
    assert_error(resp, status)
    assert [p.name for p in app.services.projects.list_plans()] == ["default"]


async def test_prices_put_changes_the_effective_price(app: Actors) -> None:
    admin = app.auth(app.admin)
    prices = {p["model"]: p for p in (await app.client.get("/v1/admin/prices",
                                                           headers=admin)).json()["data"]}
    assert {s.id for s in app.services.catalog} == set(prices)
    priced = prices[PRICED]
    assert (priced["input_per_million"], priced["output_per_million"]) == (1_000_000, 10_000_000)
    assert priced["overridden"] is False
    assert priced["catalog"] == {"input_per_million": 1_000_000, "output_per_million": 10_000_000}

    resp = await app.client.put(f"/v1/admin/prices/{PRICED}", headers=admin,
                                json={"input_per_million": 2_000_000, "output_per_million": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["input_per_million"] == 2_000_000 and resp.json()["overridden"] is True
    prices = {p["model"]: p for p in (await app.client.get("/v1/admin/prices",
                                                           headers=admin)).json()["data"]}
    assert (prices[PRICED]["input_per_million"], prices[PRICED]["output_per_million"]) == (
        2_000_000, 0)
    assert prices[PRICED]["catalog"]["input_per_million"] == 1_000_000
    assert prices[CHAT]["overridden"] is False
    spec = app.services.catalog.resolve(PRICED)
    assert spec is not None and app.services.projects.prices(spec) == (2_000_000, 0)

    # by alias: the override lands on the model's id
    resp = await app.client.put("/v1/admin/prices/smollm2", headers=admin,
                                json={"input_per_million": 3, "output_per_million": 4})
    assert resp.json()["model"] == CHAT and resp.json()["overridden"] is True


@pytest.mark.parametrize(("model", "body", "status"), [
    ("no/such-model", {"input_per_million": 1, "output_per_million": 1}, 404),
    (PRICED, {"input_per_million": -1, "output_per_million": 1}, 400),
    (PRICED, {"input_per_million": 10**16, "output_per_million": 1}, 400),
    (PRICED, {"input_per_million": 1.5, "output_per_million": 1}, 422),
    (PRICED, {"input_per_million": "1", "output_per_million": 1}, 422),
    (PRICED, {"input_per_million": 1}, 422),
])
async def test_bad_prices_are_refused(app: Actors, model: str, body: dict[str, Any],
                                      status: int) -> None:
    resp = await app.client.put(f"/v1/admin/prices/{model}", json=body,
                                headers=app.auth(app.admin))
    assert_error(resp, status)
    spec = app.services.catalog.resolve(PRICED)
    assert spec is not None and app.services.projects.prices(spec) == (1_000_000, 10_000_000)
