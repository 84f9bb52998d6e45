"""Usage of an answer with several choices (``n`` > 1, or several prompts).

llama-server runs each choice as a task of its own and reports usage per
task: its non-streamed body carries only the first task's usage, and its
stream sends one usage chunk per choice (right after that choice's
``finish_reason`` chunk) and ``timings`` per choice.  So for a llama.cpp
worker the gateway counts each choice itself and sums:

- ``completion_tokens``: the sum over every choice;
- ``prompt_tokens``: each prompt once (OpenAI counts the prompt once for
  ``n`` > 1): choice ``i`` answers prompt ``i // n``;
- a non-streamed request with several choices is read from the worker as a
  stream and folded back into one body (``fold``), which gives the exact
  per-choice counts at no extra worker cost.
"""

from __future__ import annotations

from typing import Any

_DELTA_TEXT = ("content", "reasoning_content", "text")


class ChoiceUsage:
    """Token counts per choice index, summed into one OpenAI ``usage``."""

    def __init__(self, n: int, expected: int) -> None:
        self.n = max(1, n)
        self.expected = expected  # choices in all: n x prompts
        self.final: dict[int, dict[str, int]] = {}  # a choice's own usage, once it ended
        self.progress: dict[int, dict[str, int]] = {}  # a running choice's counts so far
        self._ended: int | None = None  # the choice whose finish_reason came last

    def add(self, index: int, usage: dict[str, Any], *, final: bool) -> None:
        counts = {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "cached_tokens": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                                 or 0),
        }
        (self.final if final else self.progress)[index] = counts

    def see(self, choices: list[Any], usage: Any, progress: dict[str, int]) -> None:
        """One worker event: a choice's running counts (``timings``), or a
        choice's own usage (on its ``finish_reason`` event for completions, on
        the event right after it for chat)."""
        for raw in choices:
            index = raw.get("index", 0) if isinstance(raw, dict) else 0
            if not isinstance(index, int):
                continue
            if progress:
                self.add(index, progress, final=False)
            if raw.get("finish_reason"):
                self._ended = index
        if isinstance(usage, dict) and self._ended is not None:
            self.add(self._ended, usage, final=True)

    @property
    def complete(self) -> bool:
        return len(self.final) >= self.expected

    def total(self) -> dict[str, Any]:
        per = {**self.progress, **self.final}
        prompts: dict[int, tuple[int, int]] = {}
        completion = 0
        for index, counts in per.items():
            completion += counts["completion_tokens"]
            group = index // self.n
            seen = prompts.get(group)
            prompt, cached = counts["prompt_tokens"], counts["cached_tokens"]
            if seen is not None:  # the same prompt: counted once
                prompt, cached = max(prompt, seen[0]), min(cached, seen[1])
            prompts[group] = (prompt, cached)
        prompt_tokens = sum(p for p, _ in prompts.values())
        out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                               "total_tokens": prompt_tokens + completion}
        if self.final:
            out["prompt_tokens_details"] = {"cached_tokens": sum(c for _, c in prompts.values())}
        return out


def _merge_tool_calls(into: list[dict[str, Any]], deltas: list[Any]) -> None:
    for i, delta in enumerate(deltas):
        if not isinstance(delta, dict):
            continue
        at = delta.get("index", i)
        while len(into) <= at:
            into.append({"id": None, "type": "function", "function": {"name": None,
                                                                       "arguments": ""}})
        call = into[at]
        if delta.get("id"):
            call["id"] = delta["id"]
        fn = delta.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""


def _merge_logprobs(into: dict[str, Any], raw: Any) -> None:
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(value)


def _merge_choice(choice: dict[str, Any], raw: dict[str, Any], chat: bool) -> None:
    if raw.get("finish_reason"):
        choice["finish_reason"] = raw["finish_reason"]
    if isinstance(raw.get("logprobs"), dict):
        if choice["logprobs"] is None:
            choice["logprobs"] = {}
        _merge_logprobs(choice["logprobs"], raw["logprobs"])
    if not chat:
        choice["text"] += raw.get("text") or ""
        return
    delta = raw.get("delta") or {}
    message = choice["message"]
    for key in _DELTA_TEXT:
        if isinstance(delta.get(key), str):
            message[key] = (message.get(key) or "") + delta[key]
    if delta.get("tool_calls"):
        _merge_tool_calls(message.setdefault("tool_calls", []), delta["tool_calls"])


def fold(events: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """A worker's stream folded into the body it would have sent unstreamed
    (choices by index; the last event's id, created, fingerprint)."""
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {}
    for event in events:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in event:
                head[key] = event[key]
        for raw in event.get("choices") or []:
            index = raw.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                choice = {"index": index, "finish_reason": None, "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": None}
                else:
                    choice["text"] = ""
                choices[index] = choice
            _merge_choice(choice, raw, chat)
    body = dict(head)
    body["object"] = "chat.completion" if chat else "text_completion"
    body["choices"] = [choices[i] for i in sorted(choices)]
    return body
