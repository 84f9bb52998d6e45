"""Webhooks reach only allowed destinations (modelfleet.netguard).

The address policy over many notations of internal addresses; the guarded
aiohttp session against a real listener on 127.0.0.1 (a resolver that
answers loopback for a public-looking name is refused at connect, literal
addresses are refused by the socket factory); and end to end: a real server
running the tiny image model, given webhook targets at that listener in many
notations, never contacts it, and shows ``failed`` / ``destination not
allowed`` without retrying; an allow-listed target is delivered."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.errors import InvalidRequest
from modelfleet.jobs import verify_signature
from modelfleet.netguard import (
    NOT_ALLOWED,
    DestinationNotAllowed,
    Guard,
    GuardedResolver,
    Policy,
    check_url,
    literal_address,
    not_allowed,
    refusal,
)
from modelfleet.settings import Settings
from modelfleet.workers.tinydiffusion import build_tiny_pipeline
from tests.conftest import Server, launch_server, stop_server

TINY = "modelfleet/tiny-random-sd"

# -- the address policy ---------------------------------------------------------

DENIED = [
    "127.0.0.1", "127.1", "127.0.1", "0x7f000001", "0X7F.0.0.1", "2130706433", "0177.0.0.1",
    "017700000001", "0x7f.1", "127.0.0.1.", "127.255.255.254", "127.0.0.2",
    "0.0.0.0", "0", "0.1.2.3", "[::]", "::", "::1", "[::1]", "0:0:0:0:0:0:0:1",
    "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "::ffff:8.8.8.8", "::127.0.0.1",
    "::ffff:0:127.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1",
    "2002:a9fe:a9fe::", "64:ff9b:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "169.254.169.254", "0xa9fea9fe", "2852039166", "169.254.0.1", "fe80::1", "fe80::1%25eth0",
    "fec0::1", "10.0.0.1", "012.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.0.1",
    "100.64.0.1", "100.127.255.254", "fd00::1", "[fd00::1]", "fc00::1", "fdff:ffff::1",
    "224.0.0.1", "239.255.255.250", "ff02::1", "ff05::1:3", "255.255.255.255", "240.0.0.1",
    "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9", "2001:db8::1",
    "100::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "0x08080808", "134744072", "2606:4700::1111",
           "[2a00:1450:4001:80b::200e]", "2002:808:808::1", "64:ff9b::8.8.8.8"]


@pytest.mark.parametrize("host", DENIED)
def test_internal_addresses_are_denied_in_every_notation(host: str) -> None:
    ip = literal_address(host)
    assert ip is not None
    assert refusal(ip) is not None
    assert not Policy().allows(ip, 80)


@pytest.mark.parametrize("host", ALLOWED)
def test_public_addresses_are_allowed(host: str) -> None:
    ip = literal_address(host)
    assert ip is not None and refusal(ip) is None


def test_legacy_ipv4_notations_read_as_inet_aton_does() -> None:
    for host in ("0x7f000001", "2130706433", "0177.0.0.1", "127.1", "127.0.1", "0x7f.0.0.0x1"):
        assert literal_address(host) == ipaddress.IPv4Address("127.0.0.1")
        assert literal_address(host) == ipaddress.IPv4Address(socket.inet_aton(host))
    for bad in ("08.0.0.1", "1.2.3.4.5", "256.0.0.1", "1.2.3.256", "4294967296",
                "0x100000000", "1.16777216", "1..2.3", "[::g]"):
        with pytest.raises(ValueError):
            literal_address(bad)
    assert literal_address("hooks.example.com") is None
    assert literal_address("0x1g") is None  # a name, left to the resolver


def test_allow_list_entries() -> None:
    policy = Policy.parse(["10.1.0.0/16", " 127.0.0.1 ", "[::1]:9000", "hooks.internal:8443",
                           "relay.lan", ""])
    loop = ipaddress.ip_address("127.0.0.1")
    assert policy.allows(ipaddress.ip_address("10.1.2.3"), 80)
    assert not policy.allows(ipaddress.ip_address("10.2.0.1"), 80)
    assert policy.allows(loop, 1) and policy.allows(loop, 65535)
    assert not policy.allows(ipaddress.ip_address("127.0.0.2"), 80)
    assert policy.allows(ipaddress.ip_address("::1"), 9000)
    assert not policy.allows(ipaddress.ip_address("::1"), 9001)
    assert policy.allows_name("hooks.internal", 8443) and policy.allows_name("HOOKS.internal.", 8443)
    assert not policy.allows_name("hooks.internal", 443)
    assert policy.allows_name("relay.lan", 1234)
    assert Policy.parse(["0x7f000001:80"]).allows(loop, 80)  # normalised
    for bad in ("10.0.0.0/33", "http://x", "a b", "user@host", "host/path", "08.1.2.3", "x:y", "-bad-.lan"):
        with pytest.raises(ValueError):
            Policy.parse([bad])


def test_settings_read_the_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_WEBHOOK_ALLOW", "127.0.0.1, 10.0.0.0/8,,hooks.internal:8443")
    assert Settings.from_env().jobs.webhook_allow == ("127.0.0.1", "10.0.0.0/8",
                                                      "hooks.internal:8443")
    monkeypatch.delenv("MODELFLEET_WEBHOOK_ALLOW")
    assert Settings.from_env().jobs.webhook_allow == ()


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "file:///etc/passwd", "gopher://127.0.0.1:6379/_x", "example.com/x",
    "http://user:pass@example.com/", "http://user@example.com/", "https://:pw@example.com/",
    "http://08.0.0.1/", "http://1.2.3.4.5/", "http:///nohost", "http://exa mple.com/",
])
def test_urls_wrong_on_their_face_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        check_url(url)
    assert exc.value.param == "webhook_url" and exc.value.status == 400


# -- the guarded session, against a real listener ------------------------------------


@dataclass
class Listener:
    """An HTTP endpoint on 127.0.0.1 that counts every connection it accepts."""

    port: int = 0
    connections: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"


def _listen() -> tuple[Listener, ThreadingHTTPServer]:
    rec = Listener()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            rec.calls.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": body})
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Counting(ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            conn = super().get_request()
            rec.connections += 1
            return conn

    httpd = Counting(("127.0.0.1", 0), Handler)
    rec.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return rec, httpd


@pytest.fixture
def listener() -> Iterator[Listener]:
    rec, httpd = _listen()
    yield rec
    httpd.shutdown()
    httpd.server_close()


class FixedResolver(AbstractResolver):
    """A DNS stand-in: each name answers the next list of addresses in turn
    (the last one repeats), as a rebinding attacker's server would."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        turns = self.answers[host]
        addresses = turns.pop(0) if len(turns) > 1 else turns[0]
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for a in addresses]

    async def close(self) -> None:
        pass


async def _post(guard: Guard, url: str) -> int:
    async with guard.session() as session, session.post(url, data=b"{}",
                                                         allow_redirects=False) as resp:
        return resp.status


async def test_a_name_resolving_to_loopback_is_refused_at_connect(listener: Listener) -> None:
    resolver = FixedResolver({"hooks.example.com": [["93.184.216.34"], ["127.0.0.1"]],
                              "split.example.com": [["93.184.216.34", "127.0.0.1"]]})
    guard = Guard(Policy(), resolver)
    # the rebinding pattern: public for a first look, loopback for the connect
    guarded = GuardedResolver(guard, resolver)
    assert [r["host"] for r in await guarded.resolve("hooks.example.com", listener.port)] \
        == ["93.184.216.34"]
    with pytest.raises(DestinationNotAllowed):
        await guarded.resolve("hooks.example.com", listener.port)
    for name in ("hooks.example.com", "split.example.com"):
        with pytest.raises(aiohttp.ClientError) as exc:
            await _post(guard, listener.url(name))
        refused = not_allowed(exc.value)
        assert refused is not None and str(refused) == NOT_ALLOWED
    assert resolver.asked.count("split.example.com") == 1
    assert listener.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "0.0.0.0", "localhost"])
async def test_literal_and_local_targets_are_refused_by_the_session(listener: Listener,
                                                                   host: str) -> None:
    # no pre-check: the socket factory (literals) and resolver (names) refuse alone
    with pytest.raises(aiohttp.ClientError) as exc:
        await _post(Guard(Policy()), listener.url(host))
    assert not_allowed(exc.value) is not None
    with pytest.raises(DestinationNotAllowed):
        Guard(Policy()).check_destination(listener.url("0x7f000001"))
    assert listener.connections == 0


async def test_allow_listed_destinations_are_reached(listener: Listener) -> None:
    assert await _post(Guard(Policy.parse(["127.0.0.0/8"])), listener.url()) == 200
    resolver = FixedResolver({"hooks.internal": [["127.0.0.1"]]})
    named = Guard(Policy.parse([f"hooks.internal:{listener.port}"]), resolver)
    assert await _post(named, listener.url("hooks.internal")) == 200
    other_port = Guard(Policy.parse(["hooks.internal:1"]), resolver)
    with pytest.raises(aiohttp.ClientError):
        await _post(other_port, listener.url("hooks.internal"))
    assert listener.connections == 2


# -- end to end: a real server ---------------------------------------------------------
# The tiny image model (as in tests/test_images.py).  Each job is cancelled while
# it waits for the model's first replica: the webhook of a cancelled job goes out
# at once through the same delivery path as that of a finished one, so the test
# does not wait for image generation (a job that started anyway just finishes).


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny image pipeline (random weights), shared by this module's servers."""
    folder = tmp_path_factory.mktemp("tiny-models")
    build_tiny_pipeline(folder / "modelfleet-tiny-random-sd")
    return folder


def _server(tmp: Path, models: Path, allow: str | None = None) -> Server:
    (tmp / "data").mkdir(parents=True)
    (tmp / "data" / "models").symlink_to(models)
    env = {"MODELFLEET_JOBS_WEBHOOK_BACKOFF_S": "0.2"}
    if allow is not None:
        env["MODELFLEET_WEBHOOK_ALLOW"] = allow
    return launch_server(tmp, DEFAULT_CATALOG.read_text(), env=env)


def _submit(srv: Server, webhook_url: str) -> httpx.Response:
    return httpx.post(srv.url + "/v1/inference/image", headers={"x-api-key": srv.key},
                      json={"model": TINY, "prompt": "a fox", "n": 1, "steps": 1,
                            "webhook_url": webhook_url}, timeout=60)


def _job(srv: Server, webhook_url: str) -> str:
    """A job that ends now (cancelled while queued), with this webhook."""
    resp = _submit(srv, webhook_url)
    assert resp.status_code == 202, (webhook_url, resp.text)
    job_id: str = resp.json()["job_id"]
    cancel = httpx.post(f"{srv.url}/v1/inference/jobs/{job_id}/cancel",
                        headers={"x-api-key": srv.key}, timeout=30)
    assert cancel.status_code in (200, 409), cancel.text  # 409: it ended another way
    return job_id


def _hook_settled(srv: Server, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{srv.url}/v1/inference/jobs/{job_id}",
                                        headers={"x-api-key": srv.key}, timeout=30).json()
        if job["webhook"]["state"] in ("delivered", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_internal_targets_are_never_contacted(tmp_path: Path, models: Path,
                                              listener: Listener) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the answer must read the same
    srv = _server(tmp_path, models)
    try:
        p = listener.port
        targets = [f"http://{host}:{p}/hook" for host in (
            "localhost", "LocalHost.", "127.0.0.1", "[::ffff:127.0.0.1]", "0x7f000001",
            "2130706433", "0.0.0.0", "127.1", "0177.0.0.1", "[::1]", "169.254.169.254",
            "[fd00::1]", "10.0.0.1")]
        targets += [f"http://127.0.0.1:{closed_port}/hook",
                    "http://169.254.169.254/latest/meta-data/"]
        jobs = {url: _job(srv, url) for url in targets}
        for bad in (f"http://user:pass@127.0.0.1:{p}/hook", f"http://08.0.0.1:{p}/",
                    f"gopher://127.0.0.1:{p}/"):
            resp = _submit(srv, bad)
            assert resp.status_code == 400, bad
            error = resp.json()["error"]
            assert error["param"] == "webhook_url" and error["type"] == "invalid_request_error"
        for url, job_id in jobs.items():
            job = _hook_settled(srv, job_id)
            assert job["webhook"] == {"url": url, "state": "failed", "attempts": 0,
                                      "error": NOT_ALLOWED}, url
        time.sleep(0.5)  # a retry would come after 0.2 s
        for job_id in jobs.values():
            assert _hook_settled(srv, job_id)["webhook"]["attempts"] == 0
        assert listener.connections == 0 and listener.calls == []
    finally:
        stop_server(srv.proc)


def test_an_allow_listed_target_is_delivered(tmp_path: Path, models: Path,
                                             listener: Listener) -> None:
    srv = _server(tmp_path, models, allow="127.0.0.1")
    try:
        secret = httpx.get(srv.url + "/v1/inference/webhook-secret",
                           headers={"x-api-key": srv.key}).json()["secret"]
        job_id = _job(srv, listener.url())
        job = _hook_settled(srv, job_id)
        assert job["webhook"] == {"url": listener.url(), "state": "delivered", "attempts": 1}
        assert len(listener.calls) == 1
        call = listener.calls[0]
        assert call["headers"]["x-modelfleet-job-id"] == job_id
        assert verify_signature(secret, call["body"], call["headers"]["x-modelfleet-signature"])
        # an address outside the allow-list stays closed
        job = _hook_settled(srv, _job(srv, "http://169.254.169.254/latest/meta-data/"))
        assert job["webhook"]["state"] == "failed" and job["webhook"]["error"] == NOT_ALLOWED
    finally:
        stop_server(srv.proc)
