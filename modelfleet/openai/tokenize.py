"""POST /v1/tokenize and /v1/detokenize (vLLM's shapes) for llama.cpp models.

    tokenize   {model, prompt, add_special_tokens?}             → {count, max_model_len, tokens}
               {model, messages, add_generation_prompt?}       (chat models: the chat template
                                                                 applied first, as chat does)
    detokenize {model, tokens}                                  → {prompt}

llama-server answers ``/tokenize`` ({content, add_special} → {tokens}),
``/detokenize`` ({tokens} → {content}) and ``/apply-template`` ({messages} →
{prompt}).  A messages request takes two worker calls on the one slot it
won: the template, then the tokens.  The token count is the usage
(``prompt_tokens``), charged at the model's input price.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, model_validator

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.engines.http import WorkerBroke, WorkerClient, WorkerUnreachable
from modelfleet.errors import InvalidRequest, ModelUnavailable, UpstreamError
from modelfleet.openai.chat import Message
from modelfleet.openai.common import ModelName, Strict, require_kind
from modelfleet.scheduler import Lease

if TYPE_CHECKING:
    from modelfleet.gateway import Call

TOKENIZE_PATH = "/v1/tokenize"
DETOKENIZE_PATH = "/v1/detokenize"
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKENS = 262_144
Token = Annotated[int, Field(ge=0, lt=2**31)]


def serves_tokens(spec: ModelSpec) -> bool:
    """Whether the model answers /v1/tokenize and /v1/detokenize."""
    return spec.engine.type == "llama.cpp" and spec.kind in (ModelKind.chat, ModelKind.completion)


def endpoints(spec: ModelSpec) -> list[str]:
    return [TOKENIZE_PATH, DETOKENIZE_PATH] if serves_tokens(spec) else []


class _NotStreamed(Strict):
    # The chat-shaped fields the shared request path reads.
    stream: None = None
    stream_options: None = None
    metadata: None = None


class TokenizeRequest(_NotStreamed):
    model: ModelName
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_NotStreamed):
    model: ModelName
    tokens: Annotated[list[Token], Field(max_length=MAX_TOKENS)]


def _require_tokens(spec: ModelSpec, endpoint: str) -> None:
    require_kind(spec, (ModelKind.chat, ModelKind.completion), endpoint)
    if not serves_tokens(spec):
        raise InvalidRequest(
            f"model {spec.id!r} is served by {spec.backend}; {endpoint} is served for "
            "llama.cpp models only", param="model", code="unsupported_endpoint")


def validate_tokenize(spec: ModelSpec, body: TokenizeRequest) -> int:
    """Check against the model; returns 0 (nothing is generated)."""
    _require_tokens(spec, TOKENIZE_PATH)
    if body.messages is not None:
        if spec.kind is not ModelKind.chat:
            raise InvalidRequest(f"model {spec.id!r} is a {spec.kind.value} model with no chat "
                                 "template; send prompt instead of messages", param="messages")
        if len(body.messages) > spec.limits.max_messages:
            raise InvalidRequest(f"messages has {len(body.messages)} entries; model {spec.id!r} "
                                 f"takes at most {spec.limits.max_messages}", param="messages")
    return 0


def validate_detokenize(spec: ModelSpec, body: DetokenizeRequest) -> int:
    _require_tokens(spec, DETOKENIZE_PATH)
    vocab = spec.limits.vocab_size
    if vocab is not None:
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token {bad} is outside model {spec.id!r}'s vocabulary "
                                 f"(0..{vocab - 1})", param="tokens", code="invalid_token")
    return 0


def tokenize_body(spec: ModelSpec, body: TokenizeRequest, _max_tokens: int) -> dict[str, Any]:
    """What metering bounds (``prompt`` or ``messages``, as a chat request's are);
    ``worker_body`` turns it into llama-server's."""
    if body.messages is not None:
        return {"messages": [m.model_dump(exclude_none=True) for m in body.messages],
                "add_generation_prompt": body.add_generation_prompt,
                "add_special": True if body.add_special_tokens is None else body.add_special_tokens}
    return {"prompt": body.prompt,
            "add_special": True if body.add_special_tokens is None else body.add_special_tokens}


def detokenize_body(spec: ModelSpec, body: DetokenizeRequest, _max_tokens: int) -> dict[str, Any]:
    return {"prompt": list(body.tokens)}


class TokenWork:
    """One tokenize or detokenize request's worker calls and its answer.

    ``starting`` runs on the won slot before the gateway posts ``payload`` to
    ``path``: it applies the chat template first where messages were sent."""

    settle_before_end = False  # the tokens are counted as the answer is rendered

    def __init__(self, spec: ModelSpec, route: str, body: object, request: dict[str, Any],
                 client: WorkerClient) -> None:
        self.spec = spec
        self.client = client
        self.request = request
        self.detokenize = route == DETOKENIZE_PATH
        self.path = "/detokenize" if self.detokenize else "/tokenize"
        self.payload: dict[str, Any] = (
            {"tokens": request["prompt"]} if self.detokenize
            else {"content": request.get("prompt", ""), "add_special": request["add_special"]})

    async def starting(self, lease: Lease) -> None:
        if "messages" not in self.request:
            return
        template = {"messages": self.request["messages"],
                    "add_generation_prompt": self.request["add_generation_prompt"]}
        try:
            reply = await self.client.post(lease.replica.base_url + "/apply-template", template,
                                           lease.replica.headers)
        except (WorkerUnreachable, WorkerBroke) as exc:
            raise ModelUnavailable(f"model {self.spec.id!r}: the worker did not apply the "
                                   f"chat template: {exc}") from None
        prompt = reply.body.get("prompt")
        if reply.status != 200 or not isinstance(prompt, str):
            err = reply.body.get("error")
            message = err.get("message") if isinstance(err, dict) else None
            if reply.status == 400:
                raise InvalidRequest(str(message or "the chat template refused the messages"),
                                     param="messages")
            raise UpstreamError(f"worker answered {reply.status} to the chat template: "
                                f"{message or 'no prompt'}")
        self.payload["content"] = prompt

    def finish(self, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's answer from llama-server's; the tokens counted are the usage."""
        if self.detokenize:
            text = body.get("content")
            if not isinstance(text, str):
                raise UpstreamError("worker's detokenize answer has no content")
            count = len(self.payload["tokens"])
            out: dict[str, Any] = {"prompt": text}
        else:
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise UpstreamError("worker's tokenize answer has no token list")
            count = len(tokens)
            out = {"count": count, "max_model_len": self.spec.limits.context_length,
                   "tokens": tokens}
        call.usage = {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}
        return out
