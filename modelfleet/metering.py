"""Admission and settlement: rate limits and money around one request.

    admit:  deployed model? (404) → limits, worst case, hold, in one step of
            the admission store (429 / 403 / 503) → Ticket
    settle: once, in the cleanup step of the task that owns the request:
            return unused tokens, free its concurrency, charge the actual
            cost, queue one usage record

What is charged: requests that succeeded, and streams the client left early
(for the tokens generated until then).  Failed requests and abandoned ones
(deadline passed while running) cost nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from modelfleet.admission import AdmissionStore, Ask, Grant, StoreNotReady
from modelfleet.catalog import ModelSpec
from modelfleet.errors import ModelNotFound
from modelfleet.keys import Principal
from modelfleet.ledger import Ledger, cost_of
from modelfleet.openai.embeddings import inputs_of
from modelfleet.projects import ProjectService
from modelfleet.scheduler import Claim
from modelfleet.states import CHARGED, RequestState

log = logging.getLogger(__name__)

# Tokens a chat template may add around the messages (role markers, a default
# system prompt), per request and per message.
TEMPLATE_OVERHEAD = 96
MESSAGE_OVERHEAD = 8


def prompt_upper_bound(spec: ModelSpec, payload: dict[str, Any]) -> int:
    """At most this many prompt tokens: one per UTF-8 byte (a token is at least a
    byte) plus template overhead, and never more than the context holds."""
    if "messages" in payload:
        size = sum(len(json.dumps(m.get("content"), ensure_ascii=False).encode())
                   for m in payload["messages"])
        size += len(payload["messages"]) * MESSAGE_OVERHEAD + TEMPLATE_OVERHEAD
        if payload.get("tools"):
            size += len(json.dumps(payload["tools"]).encode())
        return min(size, spec.limits.context_length)
    if "input" in payload:  # embeddings: each input is at most max_input_tokens
        cap = spec.limits.max_input_tokens
        return sum(min(len(one) if isinstance(one, list) else len(one.encode()) + 2, cap)
                   for one in inputs_of(payload["input"]))
    prompt = payload.get("prompt")
    prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
        else [prompt]
    total = 0
    for one in prompts:
        size = len(one) if isinstance(one, list) else len(str(one).encode())
        total += min(size + 2, spec.limits.context_length)
    return total


def completions_count(payload: dict[str, Any]) -> int:
    n = int(payload.get("n") or 1)
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt)
    return n


def conversation_prefix(payload: dict[str, Any]) -> str | None:
    """A key for "the same conversation": its first two messages (system prompt
    and opening turn), or a prompt's first 512 characters."""
    if "messages" in payload:
        head = payload["messages"][:2]
        raw = json.dumps(head, sort_keys=True, ensure_ascii=False)
    elif isinstance(payload.get("prompt"), str):
        raw = payload["prompt"][:512]
    else:
        return None
    return hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


def discounted(prices: tuple[int, int], pct: int) -> tuple[int, int]:
    """Per-million prices less ``pct`` percent, rounded down to a micro-unit."""
    if not pct:
        return prices
    return prices[0] * (100 - pct) // 100, prices[1] * (100 - pct) // 100


@dataclass
class Ticket:
    """What one admitted request holds."""

    grant: Grant
    spec: ModelSpec
    prices: tuple[int, int]  # per million input, output tokens
    per_image: int = 0

    @property
    def headers(self) -> dict[str, str]:
        return self.grant.headers


@dataclass(frozen=True)
class Outcome:
    """How a request ended, as settlement needs it."""

    request_id: str
    status: RequestState
    usage: dict[str, Any]
    wait_s: float
    run_s: float
    images: int = 0


class Metering:
    def __init__(self, projects: ProjectService, ledger: Ledger, *, enabled: bool = True) -> None:
        self.projects = projects
        self.ledger = ledger
        self.enabled = enabled

    @property
    def store(self) -> AdmissionStore:
        return self.ledger.store

    def check_model(self, principal: Principal, spec: ModelSpec, route_name: str) -> None:
        """404 for a model not deployed to the key's project (ids are not probed)."""
        info = self.projects.project(principal.project_id)
        if info is not None and not info.may_use(spec.id):
            raise ModelNotFound(f"model {route_name!r} does not exist", param="model")

    def claim(self, principal: Principal, payload: dict[str, Any]) -> Claim:
        """The request's place in the fair queue."""
        return self.claim_for(principal.project_id, conversation_prefix(payload))

    def claim_for(self, project_id: str, prefix: str | None = None) -> Claim:
        plan = self.projects.plan_of(project_id)
        return Claim(project=project_id, weight=plan.weight, priority=plan.priority,
                     cap=plan.project_concurrency, prefix=prefix)

    async def peek_headers(self, principal: Principal) -> dict[str, str]:
        plan = self.projects.plan_of(principal.project_id)
        return await self.store.peek(plan, principal.key_id, principal.project_id)

    def ask(self, request_id: str, principal: Principal, spec: ModelSpec,
            payload: dict[str, Any], max_tokens: int, *,
            discount_pct: int = 0) -> tuple[Ask, tuple[int, int]]:
        """The worst case of a token request: prompt upper bound plus every output
        token, at the model's prices less ``discount_pct`` percent (batch lines)."""
        prices = discounted(self.projects.prices(spec), discount_pct)
        prompt_max = prompt_upper_bound(spec, payload)
        output_max = max_tokens * completions_count(payload)
        ask = Ask(request_id, self.projects.plan_of(principal.project_id), principal.key_id,
                  principal.project_id, tokens=prompt_max + output_max,
                  amount=cost_of(prompt_max, output_max, prices),
                  ttl_s=spec.scaling.request_timeout_s + 60)
        return ask, prices

    async def admit(self, ask: Ask, spec: ModelSpec, prices: tuple[int, int] = (0, 0),
                    per_image: int = 0) -> Ticket:
        return Ticket(await self.take(ask), spec, prices, per_image)

    async def take(self, ask: Ask) -> Grant:
        """One admission from the store (which reloads balances if it lost them)."""
        self.ledger.check_writable()
        try:
            return await self.store.admit(ask)
        except StoreNotReady:
            await self.ledger.reload()
            return await self.store.admit(ask)

    async def settle(self, ticket: Ticket, outcome: Outcome, key_id: str, *,
                     durable: bool = False, record: bool = True) -> asyncio.Future[None] | None:
        """Charge the actual cost (never above the hold) and queue the usage
        record.  ``durable``: returns a future resolved when the record is
        committed (an answer waits for it before its end is sent).  ``record``
        False: an attempt that is run again under the same request id (a
        preempted batch line) leaves no usage row if it cost nothing."""
        usage = outcome.usage
        tokens_in = int(usage.get("prompt_tokens", 0))
        tokens_out = int(usage.get("completion_tokens", 0))
        cost = 0
        if outcome.status in CHARGED:
            cost = cost_of(tokens_in, tokens_out, ticket.prices) + ticket.per_image * outcome.images
        ask = ticket.grant.ask
        if cost > ask.amount:
            log.error("request %s cost %d above its hold %d; charging the hold",
                      outcome.request_id, cost, ask.amount)
            cost = ask.amount
        try:
            await self.store.settle(ticket.grant, used_tokens=tokens_in + tokens_out, cost=cost)
        except Exception as exc:  # the store gives the hold back when the debit is applied
            log.warning("request %s: could not settle with the admission store (%s)",
                        outcome.request_id, exc)
        if not record and cost == 0:
            return None
        return self.ledger.record({
            "request_id": outcome.request_id,
            "project_id": ask.project_id,
            "key_id": key_id,
            "model_id": ticket.spec.id,
            "status": outcome.status.value,
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "wait_ms": round(outcome.wait_s * 1000),
            "run_ms": round(outcome.run_s * 1000),
            "total_ms": round((outcome.wait_s + outcome.run_s) * 1000),
            "created_at": datetime.now(UTC),
            "images": outcome.images,
        }, cost, durable=durable)
