"""modelfleet's task worker: one task model (zero-shot classification, NER or
PII detection) behind ``POST /v1/chat/completions`` (docs/tasks.md).

    python -m modelfleet.workers.tasks --task ner --spacy-model PKG --port P
    python -m modelfleet.workers.tasks --task classification --model-dir DIR --port P

The text is the last user message and ``metadata`` holds the task's
parameters, checked here with the gateway's own rules (``openai/taskchat.py``).
The answer is a ``chat.completion`` whose message content is the task's JSON
result, with usage: the text's tokens in, the result's items out.

The model is loaded before the port opens, so a worker that answers
``/health`` is ready.  Requests run one at a time on one model thread (spaCy
and Presidio are not made for concurrent calls on one pipeline); the event
loop stays free to parse, queue and answer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from modelfleet.errors import InvalidRequest
from modelfleet.openai.taskchat import parse_params
from modelfleet.workers import common
from modelfleet.workers.taskmodels import TaskModel, load

log = logging.getLogger("modelfleet.workers.tasks")

MAX_BODY = 8 << 20
MAX_TEXT_CHARS = 1_000_000  # the platform's per-model limit is far lower


def _text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if not isinstance(content, str) or not content.strip():
                raise InvalidRequest("the last user message must be a non-empty string",
                                     param="messages")
            if len(content) > MAX_TEXT_CHARS:
                raise InvalidRequest(f"the text is longer than {MAX_TEXT_CHARS} characters",
                                     param="messages", code="prompt_too_long")
            return content
    raise InvalidRequest("no user message: the last one is the text to read", param="messages")


class TaskWorker:
    """The HTTP side: check a request, run it on the model thread, answer."""

    def __init__(self, model: TaskModel, *, task: str, name: str,
                 default_labels: Sequence[str] = ()) -> None:
        self.model = model
        self.task = task
        self.name = name
        self.default_labels = list(default_labels)
        self.requests = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task")

    async def chat(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return common.error_response(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return common.error_response(400, "the request body must be a JSON object")
        try:
            text = _text(body)
            meta = body.get("metadata")
            if meta is not None and not isinstance(meta, dict):
                raise InvalidRequest("'metadata' must be an object", param="metadata")
            params = parse_params(self.task, meta, self.default_labels)
        except InvalidRequest as exc:
            return common.error_response(400, exc.message, exc.param, exc.code)
        self.requests += 1
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self.model.run, text, params)
        except Exception as exc:
            log.exception("the %s model failed", self.task)
            return common.error_response(500, f"{self.task} failed: {type(exc).__name__}: {exc}")
        content = orjson.dumps(result.body).decode()
        return common.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.items,
                      "total_tokens": result.prompt_tokens + result.items},
        })

    async def health(self, request: web.Request) -> web.Response:
        return common.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return common.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "owned_by": "modelfleet", "task": self.task}]})

    async def stats(self, request: web.Request) -> web.Response:
        return common.json_response({"requests": self.requests})

    def app(self) -> web.Application:
        app = common.json_app(MAX_BODY, {"/health": self.health, "/v1/models": self.models,
                                  "/stats": self.stats}, {"/v1/chat/completions": self.chat})

        async def executor_life(app: web.Application) -> Any:
            yield
            self._executor.shutdown(wait=False, cancel_futures=True)

        app.cleanup_ctx.append(executor_life)
        return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.workers.tasks",
                                     description="modelfleet's task worker")
    parser.add_argument("--task", choices=("classification", "ner", "pii"), required=True)
    parser.add_argument("--model-dir", type=Path, help="classification: a sentence-transformers "
                        "folder")
    parser.add_argument("--spacy-model", help="ner, pii: an installed spaCy pipeline package")
    parser.add_argument("--label", action="append", default=[],
                        help="classification: a default label (repeat)")
    common.serving_args(parser, "the task")
    args = parser.parse_args(argv)
    if args.task == "classification" and (args.model_dir is None or not args.model_dir.is_dir()):
        parser.error("classification needs --model-dir, a folder")
    if args.task != "classification" and not args.spacy_model:
        parser.error(f"{args.task} needs --spacy-model")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    model = load(args.task, model_dir=args.model_dir, spacy_model=args.spacy_model,
                 threads=args.threads)
    worker = TaskWorker(model, task=args.task, name=args.model_name or args.task,
                        default_labels=args.label)
    asyncio.run(common.run_app(worker.app(), args.host, args.port, args.parent_pid))


if __name__ == "__main__":
    main()
    common.exit_now()
