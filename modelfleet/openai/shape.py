"""Worker answers reshaped into exactly the OpenAI response schemas.

Engines add fields of their own (llama-server: token ``id``, ``timings``,
``reasoning_content``) and omit some OpenAI requires (``message.refusal``,
``logprobs.refusal``).  These functions keep the OpenAI fields, fill the
required ones, and drop the rest; tests validate the result against the
official OpenAPI description.
"""

from __future__ import annotations

from typing import Any

_CHAT_FINISH = {"stop", "length", "tool_calls", "content_filter", "function_call"}
_TEXT_FINISH = {"stop", "length", "content_filter"}


def _top(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": entry.get("token", ""), "logprob": entry.get("logprob", 0.0),
            "bytes": entry.get("bytes")}


def chat_logprobs(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    content = []
    for entry in raw.get("content") or []:
        item = _top(entry)
        item["top_logprobs"] = [_top(t) for t in entry.get("top_logprobs") or []]
        content.append(item)
    return {"content": content, "refusal": None}


def _tool_calls(raw: Any, streaming: bool) -> list[dict[str, Any]]:
    calls = []
    for i, call in enumerate(raw or []):
        fn = call.get("function") or {}
        item: dict[str, Any] = {"id": call.get("id"), "type": "function",
                                "function": {"name": fn.get("name"), "arguments": fn.get("arguments")}}
        if streaming:
            item["index"] = call.get("index", i)
            item = {k: v for k, v in item.items() if v is not None}
            item["function"] = {k: v for k, v in item["function"].items() if v is not None}
        calls.append(item)
    return calls


def chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    msg = choice.get("message") or {}
    message: dict[str, Any] = {"role": "assistant", "content": msg.get("content"), "refusal": None}
    if msg.get("tool_calls"):
        message["tool_calls"] = _tool_calls(msg["tool_calls"], streaming=False)
    finish = choice.get("finish_reason")
    return {
        "index": choice.get("index", 0),
        "message": message,
        "finish_reason": finish if finish in _CHAT_FINISH else "stop",
        "logprobs": chat_logprobs(choice.get("logprobs")),
    }


def chat_chunk_choice(choice: dict[str, Any]) -> dict[str, Any]:
    raw = choice.get("delta") or {}
    delta: dict[str, Any] = {}
    if "role" in raw:
        delta["role"] = raw["role"]
    if "content" in raw:
        delta["content"] = raw["content"]
    if raw.get("tool_calls"):
        delta["tool_calls"] = _tool_calls(raw["tool_calls"], streaming=True)
    finish = choice.get("finish_reason")
    return {
        "index": choice.get("index", 0),
        "delta": delta,
        "finish_reason": finish if finish in _CHAT_FINISH else None,
        "logprobs": chat_logprobs(choice.get("logprobs")),
    }


def text_logprobs(raw: Any) -> dict[str, Any] | None:
    """Legacy completion logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    if not isinstance(raw, dict):
        return None
    if "tokens" in raw:
        return {k: raw.get(k) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    tokens, lps, tops, offsets = [], [], [], []
    offset = 0
    for entry in raw.get("content") or []:
        token = entry.get("token", "")
        tokens.append(token)
        lps.append(entry.get("logprob", 0.0))
        tops.append({t.get("token", ""): t.get("logprob", 0.0)
                     for t in entry.get("top_logprobs") or []})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def text_choice(choice: dict[str, Any], streaming: bool = False) -> dict[str, Any]:
    finish = choice.get("finish_reason")
    if finish not in _TEXT_FINISH:
        finish = None if streaming else "stop"
    return {
        "text": choice.get("text") or "",
        "index": choice.get("index", 0),
        "logprobs": text_logprobs(choice.get("logprobs")),
        "finish_reason": finish,
    }
