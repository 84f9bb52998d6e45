"""Admission and settlement: rate limits and money around one request.

    admit:  deployed model? (404) → limits, worst case (429) → hold (403) → Ticket
    settle: exactly once, when the work has ended: return unused tokens, charge
            the actual cost, write one usage record

What is charged: requests that succeeded, and streams the client left early
(for the tokens generated until then).  Failed requests and abandoned ones
(deadline passed while running) cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelfleet.catalog import ModelSpec
from modelfleet.errors import ModelNotFound
from modelfleet.keys import Principal
from modelfleet.ledger import Hold, Ledger, cost_of
from modelfleet.limits import Admission, RateLimiter
from modelfleet.openai.embeddings import inputs_of
from modelfleet.projects import ProjectService
from modelfleet.scheduler import Claim

log = logging.getLogger(__name__)

CHARGED = frozenset({"succeeded", "disconnected"})
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


@dataclass
class Ticket:
    principal: Principal
    spec: ModelSpec
    prices: tuple[int, int]
    admission: Admission
    hold: Hold
    metering: Metering
    settled: bool = False
    charged: int = field(default=0)

    @property
    def headers(self) -> dict[str, str]:
        return self.admission.headers

    def settle(self, *, request_id: str, status: str, usage: dict[str, int],
               wait_s: float, run_s: float) -> None:
        if self.settled:
            return
        self.settled = True
        tokens_in = int(usage.get("prompt_tokens", 0))
        tokens_out = int(usage.get("completion_tokens", 0))
        cost = cost_of(tokens_in, tokens_out, self.prices) if status in CHARGED else 0
        record = {
            "request_id": request_id,
            "project_id": self.principal.project_id,
            "key_id": self.principal.key_id,
            "model_id": self.spec.id,
            "status": status,
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "wait_ms": round(wait_s * 1000),
            "run_ms": round(run_s * 1000),
            "total_ms": round((wait_s + run_s) * 1000),
            "created_at": datetime.now(UTC),
            "images": 0,
        }
        m = self.metering
        m.limiter.release(self.admission, tokens_in + tokens_out)
        self.charged = m.ledger.settle(self.hold, cost, record)


class Metering:
    def __init__(self, projects: ProjectService, limiter: RateLimiter, ledger: Ledger,
                 *, enabled: bool = True) -> None:
        self.projects = projects
        self.limiter = limiter
        self.ledger = ledger
        self.enabled = enabled

    def check_model(self, principal: Principal, spec: ModelSpec, route_name: str) -> None:
        """404 for a model not deployed to the key's project (ids are not probed)."""
        info = self.projects.project(principal.project_id)
        if info is not None and not info.may_use(spec.id):
            raise ModelNotFound(f"model {route_name!r} does not exist", param="model")

    def claim(self, principal: Principal, payload: dict[str, Any]) -> Claim:
        """The request's place in the fair queue."""
        plan = self.projects.plan_of(principal.project_id)
        return Claim(project=principal.project_id, weight=plan.weight, priority=plan.priority,
                     cap=plan.project_concurrency, prefix=conversation_prefix(payload))

    def peek_headers(self, principal: Principal) -> dict[str, str]:
        plan = self.projects.plan_of(principal.project_id)
        return self.limiter.peek(plan, principal.key_id, principal.project_id)

    def admit(self, principal: Principal, spec: ModelSpec, payload: dict[str, Any],
              max_tokens: int) -> Ticket:
        prices = self.projects.prices(spec) if self.enabled else (0, 0)
        prompt_max = prompt_upper_bound(spec, payload)
        output_max = max_tokens * completions_count(payload)
        plan = self.projects.plan_of(principal.project_id)
        admission = self.limiter.admit(plan, principal.key_id, principal.project_id,
                                       prompt_max + output_max)
        try:
            hold = self.ledger.hold(principal.project_id, cost_of(prompt_max, output_max, prices))
        except BaseException:
            self.limiter.release(admission, 0)
            raise
        return Ticket(principal, spec, prices, admission, hold, self)
