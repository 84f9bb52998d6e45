"""POST /v1/responses: the Responses API on top of the chat path.

A Responses request becomes a chat request (``to_chat``): ``instructions``
the first system message, a stored conversation (``previous_response_id``)
and this ``input`` its messages, function tools and ``tool_choice`` the chat
ones (so the same grammar enforcement applies, openai/tools.py),
``text.format`` the ``response_format``.  It then runs as one chat request
through the gateway (keys, limits, fair queue, billing), and its answer is
rendered back: a whole chat completion as a Response object (``render``), a
chat stream as the typed events of a Responses stream (``EventStream``).

Items get ids of their own (``msg_``, ``fc_``, ``fco_``); a stored response
keeps its input items, and every item the model saw (``context``), so a
continuation reads one row (modelfleet/responsestore.py).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.errors import ImageInputNotSupported, InvalidRequest, ModelfleetError
from modelfleet.openai import chat
from modelfleet.openai.chat import _Lenient  # items sent back as got: unknown keys dropped
from modelfleet.openai.common import (
    Float,
    Int64,
    ModelName,
    Strict,
    require_kind,
    validation_failed,
)

RESPONSES_PATH = "/v1/responses"
# Chat-side names of what a Responses request calls otherwise (errors name the
# Responses field).
_PARAMS = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "messages": "input"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# -- the request ------------------------------------------------------------------


Text = Annotated[str, Field(max_length=1_000_000)]


class InputText(_Lenient):
    type: Literal["input_text", "output_text"]
    text: Text


class Refusal(_Lenient):
    type: Literal["refusal"]
    refusal: Text


class InputImage(_Lenient):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(_Lenient):
    type: Literal["input_file", "input_audio"]


Part = Annotated[InputText | Refusal | InputImage | InputFile, Field(discriminator="type")]


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    id: Annotated[str, Field(max_length=256)] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Annotated[list[Part], Field(max_length=1000)]


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    id: Annotated[str, Field(max_length=256)] | None = None
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: Text


class FunctionOutputItem(_Lenient):
    type: Literal["function_call_output"]
    id: Annotated[str, Field(max_length=256)] | None = None
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    output: Text | Annotated[list[InputText], Field(max_length=1000)]


_ITEMS: dict[str, TypeAdapter[Any]] = {
    "message": TypeAdapter(MessageItem),
    "function_call": TypeAdapter(FunctionCallItem),
    "function_call_output": TypeAdapter(FunctionOutputItem),
}
Item = MessageItem | FunctionCallItem | FunctionOutputItem


class FunctionTool(Strict):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(Strict):
    type: Literal["function"]
    name: str


class FormatText(Strict):
    type: Literal["text"]


class FormatJsonObject(Strict):
    type: Literal["json_object"]


class FormatJsonSchema(Strict):
    type: Literal["json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


Format = Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]


class TextParam(Strict):
    format: Format | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(Strict):
    include_obfuscation: bool | None = None


MetaKey = Annotated[str, Field(max_length=64)]
MetaText = Annotated[str, Field(max_length=512)]


class ResponsesRequest(Strict):
    model: ModelName
    input: Text | Annotated[list[dict[str, Any]], Field(max_length=10_000)] | None = None
    instructions: Text | None = None
    previous_response_id: Annotated[str, Field(max_length=256)] | None = None
    max_output_tokens: Int64 | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool | None = None
    metadata: Annotated[dict[MetaKey, MetaText], Field(max_length=16)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    service_tier: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    include: Annotated[list[str], Field(max_length=16)] | None = None

    @property
    def stored(self) -> bool:
        return self.store is not False


def parse_items(body: ResponsesRequest) -> list[Item]:
    """``input`` as items: a string is one user message; each item checked by its type."""
    raw = body.input
    if raw is None or raw == "" or raw == []:
        raise InvalidRequest("input is required: a string or a list of items", param="input")
    if isinstance(raw, str):
        return [MessageItem(role="user", content=raw)]
    items: list[Item] = []
    for i, entry in enumerate(raw):
        kind = entry.get("type", "message")
        adapter = _ITEMS.get(kind) if isinstance(kind, str) else None
        if adapter is None:
            raise InvalidRequest(f"input[{i}]: items of type {kind!r} are not supported (messages, "
                                 "function_call and function_call_output are)",
                                 param=f"input[{i}].type", code="unsupported_item")
        try:
            items.append(adapter.validate_python(entry))
        except ValidationError as exc:
            raise validation_failed(exc, f"input[{i}].") from None
    return items


def check_request(spec: ModelSpec, body: ResponsesRequest) -> None:
    """What this platform does not do with a Responses request: a clear 400."""
    require_kind(spec, (ModelKind.chat,), RESPONSES_PATH)
    if body.background:
        raise InvalidRequest("background responses are not supported; use stream or wait for "
                             "the answer", param="background", code="unsupported_parameter")
    if body.truncation == "auto":
        raise InvalidRequest('truncation "auto" is not supported; the input must fit the '
                             "model's context", param="truncation", code="unsupported_parameter")
    if body.include:
        raise InvalidRequest(f"include {body.include[0]!r} is not available from this model",
                             param="include", code="unsupported_parameter")


def _text_of(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text if isinstance(p, InputText) else getattr(p, "refusal", "")
                   for p in content)


def _chat_content(spec: ModelSpec, item: MessageItem, param: str) -> Any:
    if isinstance(item.content, str):
        return item.content
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(item.content):
        where = f"{param}.content[{j}]"
        if isinstance(part, InputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, Refusal):
            parts.append({"type": "text", "text": part.refusal})
        elif isinstance(part, InputImage):
            if not spec.capabilities.image_input:
                raise ImageInputNotSupported(f"model {spec.id!r} takes text only; input_image "
                                             "parts are not supported", param=where)
            if not part.image_url or not part.image_url.startswith("data:"):
                raise InvalidRequest("input_image needs image_url as a data: URL (base64); the "
                                     "platform does not fetch images or read files",
                                     param=where, code="image_url_not_allowed")
            parts.append({"type": "image_url", "image_url": {"url": part.image_url}})
        else:
            raise InvalidRequest(f"content parts of type {part.type!r} are not supported",
                                 param=where, code="unsupported_content")
    return parts


def to_messages(spec: ModelSpec, items: list[Item], param: str = "input") -> list[dict[str, Any]]:
    """Items as chat messages: function calls in a row are one assistant
    message's ``tool_calls``, their outputs ``role: "tool"`` messages."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _chat_content(spec, item, f"{param}[{i}]")})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            output = item.output if isinstance(item.output, str) else _text_of(item.output)
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return out


def _chat_tools(body: ResponsesRequest, data: dict[str, Any]) -> None:
    if body.tools:
        data["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"},
                                                                       exclude_none=True)}
                         for t in body.tools]
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        data["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        data["tool_choice"] = choice


def _chat_format(fmt: FormatText | FormatJsonObject | FormatJsonSchema) -> dict[str, Any]:
    if not isinstance(fmt, FormatJsonSchema):
        return {"type": fmt.type}
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def to_chat(spec: ModelSpec, body: ResponsesRequest, context: list[Item],
            items: list[Item]) -> chat.ChatRequest:
    """The chat request this Responses request is."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    messages += to_messages(spec, context, "previous_response_id")
    messages += to_messages(spec, items)
    data: dict[str, Any] = {"model": body.model, "messages": messages}
    for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
        if getattr(body, name) is not None:
            data[name] = getattr(body, name)
    if body.max_output_tokens is not None:
        data["max_completion_tokens"] = body.max_output_tokens
    _chat_tools(body, data)
    fmt = body.text.format if body.text is not None else None
    if fmt is not None:
        data["response_format"] = _chat_format(fmt)
    if body.stream:
        data["stream"] = True
    try:
        return chat.ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_failed(exc) from None


def renamed(exc: ModelfleetError) -> ModelfleetError:
    """A chat check's error, naming the Responses field."""
    if exc.param == "tool_choice.function.name":
        exc.param = "tool_choice.name"
    elif exc.param:
        head, _, rest = exc.param.partition(".")
        if head in _PARAMS:
            exc.param = _PARAMS[head] + ("." + rest if rest and head != "response_format" else "")
    for chat_name, name in _PARAMS.items():
        if chat_name != "messages":
            exc.message = exc.message.replace(chat_name, name)
    return exc


# -- items with ids, as stored and listed --------------------------------------------


def item_resource(item: Item) -> dict[str, Any]:
    """An input item as ``GET .../input_items`` lists it (ItemResource)."""
    if isinstance(item, MessageItem):
        if item.role == "assistant":
            text = _text_of(item.content)
            return {"id": item.id or new_id("msg"), "type": "message", "role": "assistant",
                    "status": "completed",
                    "content": [_output_text(text)]}
        content = ([{"type": "input_text", "text": item.content}] if isinstance(item.content, str)
                   else [p.model_dump(exclude_none=True) for p in item.content])
        return {"id": item.id or new_id("msg"), "type": "message", "role": item.role,
                "status": "completed", "content": content}
    if isinstance(item, FunctionCallItem):
        return {"id": item.id or new_id("fc"), "type": "function_call", "status": "completed",
                "call_id": item.call_id, "name": item.name, "arguments": item.arguments}
    output = item.output if isinstance(item.output, str) else _text_of(item.output)
    return {"id": item.id or new_id("fco"), "type": "function_call_output",
            "status": "completed", "call_id": item.call_id, "output": output}


def items_of(stored: list[dict[str, Any]]) -> list[Item]:
    """Stored items (input resources and output items) read back as input items."""
    out: list[Item] = []
    for entry in stored:
        adapter = _ITEMS.get(entry.get("type", "message"))
        if adapter is not None:
            out.append(adapter.validate_python(entry))
    return out


# -- the answer ----------------------------------------------------------------------


@dataclass
class Shape:
    """What a Response object says about its request, beside its output."""

    id: str
    body: ResponsesRequest
    spec: ModelSpec
    temperature: float
    top_p: float
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 *, incomplete: str | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text is not None and body.text.format is not None else None
        choice = body.tool_choice
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.spec.id,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.stored,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, ToolChoiceFunction)
            else (choice or "auto"),
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": t.strict} for t in body.tools or []],
            "truncation": "disabled",
            "metadata": body.metadata or {},
        }
        if usage is not None:
            out["usage"] = usage
        if body.user is not None:
            out["user"] = body.user
        return out


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    prompt = int(chat_usage.get("prompt_tokens", 0))
    completion = int(chat_usage.get("completion_tokens", 0))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(chat_usage.get("total_tokens", prompt + completion))}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(text: str, status: str = "completed", item_id: str | None = None
                  ) -> dict[str, Any]:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant",
            "status": status,
            "content": [_output_text(text)]}


def _call_item(call: dict[str, Any], status: str = "completed",
               item_id: str | None = None) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"id": item_id or new_id("fc"), "type": "function_call", "status": status,
            "call_id": call.get("id") or new_id("call"), "name": fn.get("name") or "",
            "arguments": fn.get("arguments") or ""}


def _status(finish: Any) -> tuple[str, str | None]:
    if finish == "length":
        return "incomplete", "max_output_tokens"
    if finish == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


def render(shape: Shape, completion: dict[str, Any]) -> dict[str, Any]:
    """A chat completion (one choice) as a Response object."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(_message_item(message["content"]))
    output += [_call_item(c) for c in message.get("tool_calls") or []]
    status, reason = _status(choice.get("finish_reason"))
    for item in output:
        item["status"] = "completed" if status == "completed" else "incomplete"
    return shape.response(status, output, usage_of(completion.get("usage")), incomplete=reason)


# -- the stream ------------------------------------------------------------------------


def sse(event: dict[str, Any]) -> bytes:
    return (b"event: " + event["type"].encode() + b"\ndata: "
            + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def chat_events(raw: bytes) -> list[dict[str, Any] | None]:
    """The chat chunks in what the gateway yielded (None: ``[DONE]``)."""
    out: list[dict[str, Any] | None] = []
    for block in raw.split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n")
                          if line.startswith(b"data:"))
        if not data:
            continue
        out.append(None if data == b"[DONE]" else json.loads(data))
    return out


@dataclass
class _Open:
    """An output item being streamed."""

    index: int
    item: dict[str, Any]
    text: list[str] = field(default_factory=list)


class EventStream:
    """A chat stream (with usage) as a Responses stream: ``response.created``,
    ``response.in_progress``, per output item its ``added``/deltas/``done``
    events, then ``response.completed`` (or ``incomplete``/``failed``), which
    is sent once ``finish`` (storing the response) has run."""

    def __init__(self, shape: Shape,
                 finish: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.shape = shape
        self.finish = finish
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.message: _Open | None = None
        self.calls: dict[int, _Open] = {}
        self.finish_reason: Any = None
        self.usage: dict[str, Any] | None = None
        self.ended = False

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(event)

    async def run(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        start = self.shape.response("in_progress", [], None)
        yield self._event("response.created", response=start) + self._event(
            "response.in_progress", response=start)
        async for raw in chunks:
            out = b""
            for chunk in chat_events(raw):
                if self.ended:
                    continue  # after response.failed, nothing (the chat stream's [DONE])
                if chunk is None:
                    self.ended = True
                    out += self._close_all()
                    status, reason = _status(self.finish_reason)
                    response = self.shape.response(status, self.output, usage_of(self.usage),
                                                   incomplete=reason)
                    await self.finish(response)
                    out += self._event("response.completed" if status == "completed"
                                       else "response.incomplete", response=response)
                elif "error" in chunk:
                    self.ended = True
                    out += await self._failed(chunk["error"])
                else:
                    out += self._chunk(chunk)
            if out:
                yield out

    async def _failed(self, error: dict[str, Any]) -> bytes:
        """The stream broke or passed its deadline: an ``error`` event, the
        items so far marked incomplete, and ``response.failed`` (stored)."""
        message = str(error.get("message", "the request failed"))
        out = self._event("error", code=error.get("code"), message=message,
                          param=error.get("param"))
        self.finish_reason = "length"  # the open items end incomplete
        out += self._close_all()
        response = self.shape.response("failed", self.output, usage_of(self.usage),
                                       error={"code": "server_error", "message": message})
        await self.finish(response)
        return out + self._event("response.failed", response=response)

    def _chunk(self, chunk: dict[str, Any]) -> bytes:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        out = b""
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                out += self._call(call)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        return out

    def _add(self, item: dict[str, Any]) -> tuple[_Open, bytes]:
        opened = _Open(len(self.output), item)
        self.output.append(item)
        return opened, self._event("response.output_item.added", output_index=opened.index,
                                   item=item)

    def _text(self, text: str) -> bytes:
        out = b""
        if self.message is None:
            item = _message_item("", "in_progress")
            item["content"] = []
            self.message, out = self._add(item)
            out += self._event("response.content_part.added", item_id=self.message.item["id"],
                               output_index=self.message.index, content_index=0,
                               part=_output_text(""))
        self.message.text.append(text)
        return out + self._event("response.output_text.delta", item_id=self.message.item["id"],
                                 output_index=self.message.index, content_index=0, delta=text,
                                 logprobs=[])

    def _call(self, call: dict[str, Any]) -> bytes:
        index = int(call.get("index", 0))
        fn = call.get("function") or {}
        out = b""
        opened = self.calls.get(index)
        if opened is None:
            out += self._close_message()
            opened, added = self._add(_call_item({"id": call.get("id"),
                                                  "function": {"name": fn.get("name")}},
                                                 "in_progress"))
            self.calls[index] = opened
            out += added
        if fn.get("arguments"):
            opened.text.append(fn["arguments"])
            out += self._event("response.function_call_arguments.delta",
                               item_id=opened.item["id"], output_index=opened.index,
                               delta=fn["arguments"])
        return out

    def _item_status(self) -> str:
        return "completed" if _status(self.finish_reason)[0] == "completed" else "incomplete"

    def _close_message(self) -> bytes:
        opened, self.message = self.message, None
        if opened is None:
            return b""
        text = "".join(opened.text)
        part = _output_text(text)
        opened.item.update(status=self._item_status(), content=[part])
        where = {"item_id": opened.item["id"], "output_index": opened.index, "content_index": 0}
        return (self._event("response.output_text.done", **where, text=text, logprobs=[])
                + self._event("response.content_part.done", **where, part=part)
                + self._event("response.output_item.done", output_index=opened.index,
                              item=opened.item))

    def _close_all(self) -> bytes:
        out = self._close_message()
        for opened in self.calls.values():
            arguments = "".join(opened.text)
            opened.item.update(status=self._item_status(), arguments=arguments)
            out += self._event("response.function_call_arguments.done",
                               item_id=opened.item["id"], output_index=opened.index,
                               name=opened.item["name"], arguments=arguments)
            out += self._event("response.output_item.done", output_index=opened.index,
                               item=opened.item)
        self.calls = {}
        return out
