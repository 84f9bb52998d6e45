"""Tool calls enforced by a grammar, for models whose chat template has no
tool section (``capabilities.tool_calling = "grammar"``, docs/api.md "Tools").

The worker never sees ``tools`` or ``tool_choice``.  The gateway instead
1. lists the functions in a system message and says what to answer,
2. sends a ``json_schema`` ``response_format`` the engine turns into a
   grammar: a named function's ``parameters``; for ``"required"`` one
   ``{"name", "arguments"}`` object per function (``anyOf``); for ``"auto"``
   the same plus ``{"type": "message", "content"}``,
3. turns the JSON answer into OpenAI ``tool_calls`` (or, for a message,
   plain content): ``answer`` for a whole response, ``ToolStream`` for a
   stream (the JSON is buffered; the tool-call deltas follow at its end),
4. renders earlier tool turns (assistant ``tool_calls``, ``role: "tool"``
   results) as plain text messages the template can show.

The schema's ``name`` (``MARK`` prefix, reserved: clients cannot send it)
tells ``gateway`` which of the three the worker was asked for.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelfleet.errors import InvalidRequest

if TYPE_CHECKING:
    from modelfleet.openai.chat import ChatRequest, Message, Tool

MARK = "modelfleet-tools-"
_NAMED, _REQUIRED, _AUTO = MARK + "call-", MARK + "required", MARK + "auto"
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {},
                                  "additionalProperties": False}
_NAME_RE = re.compile(r'"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"')
_ARGS_RE = re.compile(r'"arguments"\s*:\s*')
_CONTENT_RE = re.compile(r'"content"\s*:\s*"')


@dataclass(frozen=True)
class Plan:
    """What the worker was asked for: a call of ``name``, a call of any
    function (``"required"``), or a call or a message (``"auto"``)."""

    mode: str  # "named", "required" or "auto"
    name: str | None = None


def plan_of(payload: dict[str, Any]) -> Plan | None:
    """The plan a worker body was built for (None: not a grammar tool call)."""
    fmt = payload.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    name = (fmt.get("json_schema") or {}).get("name")
    if not isinstance(name, str) or not name.startswith(MARK):
        return None
    if name.startswith(_NAMED):
        return Plan("named", name[len(_NAMED):])
    return Plan("required" if name == _REQUIRED else "auto")


# -- the request ------------------------------------------------------------------


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    params = tool.function.parameters
    return dict(params) if params else dict(_NO_PARAMETERS)


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.function.name},
                                             "arguments": _arguments_schema(tool)},
            "required": ["name", "arguments"], "additionalProperties": False}


_MESSAGE_SCHEMA = {"type": "object", "properties": {"type": {"const": "message"},
                                                    "content": {"type": "string"}},
                   "required": ["type", "content"], "additionalProperties": False}


def _hoist_defs(root: dict[str, Any], arguments: list[dict[str, Any]]) -> dict[str, Any]:
    """``$defs`` (and ``definitions``) move to the root, where ``#/$defs/...`` points."""
    for key in ("$defs", "definitions"):
        found: dict[str, Any] = {}
        for args in arguments:
            for name, sub in (args.pop(key, None) or {}).items():
                if found.get(name, sub) != sub:
                    raise InvalidRequest(f"two tools define different {key}/{name}; rename one",
                                         param="tools", code="invalid_schema")
                found[name] = sub
        if found:
            root[key] = found
    return root


def _schema(body: ChatRequest, plan: Plan) -> dict[str, Any]:
    tools = body.tools or []
    if plan.mode == "named":
        tool = next(t for t in tools if t.function.name == plan.name)
        args = _arguments_schema(tool)
        return _hoist_defs(args, [args])
    calls = [_call_schema(t) for t in tools]
    parts = [dict(_MESSAGE_SCHEMA), *calls] if plan.mode == "auto" else calls
    root: dict[str, Any] = parts[0] if len(parts) == 1 else {"anyOf": parts}
    return _hoist_defs(root, [c["properties"]["arguments"] for c in calls])


def _instructions(body: ChatRequest, plan: Plan) -> str:
    lines = ["You can call these functions:"]
    for tool in body.tools or []:
        fn = tool.function
        about = f": {fn.description}" if fn.description else ""
        params = json.dumps(fn.parameters or _NO_PARAMETERS, separators=(",", ":"))
        lines.append(f"- {fn.name}{about}. Arguments (JSON Schema): {params}")
    if plan.mode == "named":
        lines.append(f"Call the function {plan.name}: answer only with a JSON object of its "
                     "arguments.")
    elif plan.mode == "required":
        lines.append('Call one of them: answer only with a JSON object {"name": <function '
                     'name>, "arguments": {<its arguments>}}.')
    else:
        lines.append('If a function call helps, answer only with a JSON object {"name": '
                     '<function name>, "arguments": {<its arguments>}}; otherwise answer '
                     'with {"type": "message", "content": <your reply>}.')
    return "\n".join(lines)


def plan_for(body: ChatRequest) -> Plan | None:
    """The plan for a request's ``tools``/``tool_choice`` (None: tools unused)."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return None
    if choice is not None and not isinstance(choice, str):
        return Plan("named", choice.function.name)
    return Plan("required" if choice == "required" else "auto")


def check(body: ChatRequest) -> None:
    """What a grammar cannot do: a second ``response_format``, an unknown name."""
    fmt = body.response_format
    schema = getattr(fmt, "json_schema", None)
    if schema is not None and schema.name.startswith(MARK):
        raise InvalidRequest(f"response_format names starting with {MARK!r} are reserved",
                             param="response_format.json_schema.name")
    plan = plan_for(body)
    if plan is None:
        return
    if fmt is not None and fmt.type != "text":
        raise InvalidRequest("response_format cannot be combined with tools (tool calls are "
                             "enforced with a JSON schema of their own); use tool_choice "
                             '"none" or drop response_format', param="response_format",
                             code="tools_with_response_format")
    names = {t.function.name for t in body.tools or []}
    if plan.mode == "named" and plan.name not in names:
        raise InvalidRequest(f"tool_choice names {plan.name!r}, which is not in tools",
                             param="tool_choice.function.name")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(getattr(part, "text", "") for part in content)


def render_messages(messages: list[Message], plan: Plan | None,
                    body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as a template without tools shows them: a call as
    "Calling N.", its result as a user message "Result of N(<arguments>): ...",
    and (with a plan) the functions and what to answer in the system message."""
    calls: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            for call in message.tool_calls:
                calls[call.id] = f"{call.function.name}({call.function.arguments})"
            said = [f"Calling {c.function.name}." for c in message.tool_calls]
            out.append({"role": "assistant",
                        "content": " ".join(filter(None, [_text(message.content), *said]))})
        elif message.role == "tool":
            name = calls.get(message.tool_call_id or "") or message.name or "the function call"
            out.append({"role": "user", "content": f"Result of {name}: {_text(message.content)}"})
        else:
            out.append(message.model_dump(exclude_none=True,
                                          exclude={"tool_calls", "tool_call_id"}))
    if plan is not None:
        note = _instructions(body, plan)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"],
                      "content": f"{_text(messages[0].content)}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def response_format(body: ChatRequest, plan: Plan) -> dict[str, Any]:
    name = _NAMED + (plan.name or "") if plan.mode == "named" else (
        _REQUIRED if plan.mode == "required" else _AUTO)
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": _schema(body, plan), "strict": True}}


# -- the answer ------------------------------------------------------------------


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _string_from(text: str, at: re.Match[str] | None) -> str | None:
    """The JSON string that starts at ``at``, as far as it goes (cut short)."""
    if at is None:
        return None
    rest = text[at.end():]
    for cut in range(min(len(rest), 6) + 1):  # a partial escape at the end
        try:
            value = json.loads('"' + rest[:len(rest) - cut] + '"')
        except ValueError:
            continue
        return value if isinstance(value, str) else None
    return None


def _partial(plan: Plan, text: str) -> tuple[str | None, dict[str, Any] | None]:
    """An answer cut short (max_tokens): what of it can be read.  Never the
    raw JSON as content: a call with the arguments so far, the message so far,
    or nothing."""
    if plan.mode == "named":
        return None, _call(plan.name or "", text)
    name, args = _NAME_RE.search(text), _ARGS_RE.search(text)
    if name and args:
        return None, _call(name.group(1), text[args.end():])
    if plan.mode == "auto":
        return _string_from(text, _CONTENT_RE.search(text)) or None, None
    return None, None


def read(plan: Plan, text: str, finish: Any) -> tuple[str | None, dict[str, Any] | None, str]:
    """(content, tool call, finish_reason) from the model's JSON answer."""
    try:
        obj = json.loads(text)
    except ValueError:
        content, call = _partial(plan, text)
        return content, call, "length"
    cut = finish == "length"
    if plan.mode == "named":
        return None, _call(plan.name or "", json.dumps(obj)), "length" if cut else "tool_calls"
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj:
        return (None, _call(obj["name"], json.dumps(obj["arguments"])),
                "length" if cut else "tool_calls")
    if isinstance(obj, dict) and isinstance(obj.get("content"), str):
        return obj["content"], None, "length" if cut else "stop"
    # not what the schema admits (an engine that ignored it): never prose for a forced call
    return (text if plan.mode == "auto" else None), None, "length" if cut else "stop"


def answer(plan: Plan, choice: dict[str, Any]) -> dict[str, Any]:
    """A worker's non-streamed choice, with the JSON answer read as a tool call."""
    msg = choice.get("message") or {}
    content, call, finish = read(plan, msg.get("content") or "", choice.get("finish_reason"))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if call is not None:
        message["tool_calls"] = [call]
    return {**choice, "message": message, "finish_reason": finish}


def _event(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}


@dataclass
class ToolStream:
    """A stream's JSON answer, kept until its end, then sent as tool-call deltas."""

    plan: Plan
    text: dict[int, list[str]] = field(default_factory=dict)

    def feed(self, choices: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Shaped chunk choices in; the choices of each event to send out."""
        now: list[dict[str, Any]] = []
        later: list[list[dict[str, Any]]] = []
        for choice in choices:
            index, delta = choice["index"], choice["delta"]
            if delta.get("content"):
                self.text.setdefault(index, []).append(delta["content"])
            if "role" in delta:
                now.append(_event(index, {"role": "assistant", "content": None}))
            if choice["finish_reason"] is not None:
                later.extend(self._end(index, choice["finish_reason"]))
        return ([now] if now else []) + later

    def _end(self, index: int, finish: str) -> list[list[dict[str, Any]]]:
        content, call, reason = read(self.plan, "".join(self.text.pop(index, [])), finish)
        events: list[list[dict[str, Any]]] = []
        if call is not None:
            fn = call["function"]
            events.append([_event(index, {"tool_calls": [
                {"index": 0, "id": call["id"], "type": "function",
                 "function": {"name": fn["name"], "arguments": ""}}]})])
            events.append([_event(index, {"tool_calls": [
                {"index": 0, "function": {"arguments": fn["arguments"]}}]})])
        if content:
            events.append([_event(index, {"content": content})])
        events.append([_event(index, {}, reason)])
        return events


def stream_for(payload: dict[str, Any]) -> ToolStream | None:
    plan = plan_of(payload)
    return ToolStream(plan) if plan is not None else None


def sse(head: dict[str, Any], batches: list[list[dict[str, Any]]],
        include_usage: bool) -> bytes | None:
    """The SSE events of a chunk's rewritten choices (None: nothing to send yet)."""
    out = b""
    for choices in batches:
        obj = {**head, "choices": choices}
        if include_usage:
            obj["usage"] = None
        out += b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return out or None
