"""Usage counts every choice: with n > 1 (chat and completions, several
prompts too) the body's usage, the stream's usage chunk and the usage record
sum all choices, the prompt counted once, and the charge follows; ``echo`` is
refused.  Real server, real llama.cpp workers, the official openai SDK."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from modelfleet.ledger import cost_of
from tests.conftest import Server
from tests.test_money import wait_usage

pytestmark = pytest.mark.workers
PRICED = "test/priced"  # SmolLM2; 1 micro-unit per input token, 10 per output token
PRICES = (1_000_000, 10_000_000)
BASE = "google/gemma-3-270m"
MSG: Any = [{"role": "user", "content": "Name a fruit."}]
PROMPTS = ["The sky is", "Cats are"]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                         timeout=120)


def _record(server: Server, request_id: str) -> tuple[Any, ...]:
    row = wait_usage(server, [request_id])[request_id]
    status, tokens_in, tokens_out, cost = row
    assert status == "succeeded"
    assert cost == cost_of(tokens_in, tokens_out, PRICES)
    return row


def test_chat_n2_usage_sums_both_choices_and_the_charge_follows(
        client: openai.OpenAI, server: Server) -> None:
    # ignore_eos: every choice runs to max_tokens, so each one counts exactly 5
    common: Any = {"model": PRICED, "messages": MSG, "max_tokens": 5, "temperature": 1.0,
                   "seed": 3, "metadata": {"ignore_eos": True}}
    one = client.chat.completions.with_raw_response.create(**common)
    two = client.chat.completions.with_raw_response.create(n=2, **common)
    single, double = one.parse(), two.parse()
    assert single.usage is not None and double.usage is not None
    assert single.usage.completion_tokens == 5
    assert [c.index for c in double.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in double.choices)
    assert double.usage.completion_tokens == 2 * 5
    assert double.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt once
    assert double.usage.total_tokens == double.usage.prompt_tokens + 10
    row = _record(server, two.headers["x-request-id"])
    assert row[1:3] == (double.usage.prompt_tokens, 10)
    assert row[3] == cost_of(single.usage.prompt_tokens, 10, PRICES)

    raw = client.chat.completions.with_raw_response.create(
        n=2, stream=True, stream_options={"include_usage": True}, **common)
    chunks = list(raw.parse())
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1 and chunks[-1].usage == usages[0] and chunks[-1].choices == []
    assert usages[0].completion_tokens == 10
    assert usages[0].prompt_tokens == single.usage.prompt_tokens
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert _record(server, raw.headers["x-request-id"])[1:3] == (usages[0].prompt_tokens, 10)


def test_completions_prompts_times_n_count_each_prompt_once(
        client: openai.OpenAI, server: Server) -> None:
    """Natural stops, temperature 0: each choice is its prompt's n=1 answer, so
    the sums are known from the n=1 twins."""
    common: Any = {"model": BASE, "max_tokens": 4, "temperature": 0.0}
    twins = [client.completions.create(prompt=p, **common) for p in PROMPTS]
    raw = client.completions.with_raw_response.create(prompt=PROMPTS, n=2, **common)
    both = raw.parse()
    assert both.usage is not None
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for choice in both.choices:  # choice i answers prompt i // n
        assert choice.text == twins[choice.index // 2].choices[0].text
    want_in = sum(t.usage.prompt_tokens for t in twins if t.usage)
    want_out = 2 * sum(t.usage.completion_tokens for t in twins if t.usage)
    assert (both.usage.prompt_tokens, both.usage.completion_tokens) == (want_in, want_out)
    row = wait_usage(server, [raw.headers["x-request-id"]])[raw.headers["x-request-id"]]
    assert row[:3] == ("succeeded", want_in, want_out)

    chunks = list(client.completions.create(prompt=PROMPTS, n=2, stream=True,
                                            stream_options={"include_usage": True}, **common))
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1 and chunks[-1].choices == []
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (want_in, want_out)
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(4)}
    assert texts == {c.index: c.text for c in both.choices}


def test_echo_is_refused_like_suffix(client: openai.OpenAI, server: Server) -> None:
    for field in ("echo", "suffix"):
        value: Any = True if field == "echo" else " and so on."
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=BASE, prompt="One, two,", max_tokens=2,
                                      **{field: value})
        err = info.value.body
        assert isinstance(err, dict)
        assert err["type"] == "invalid_request_error" and err["param"] == field
        assert field in err["message"]
    # echo false asks for nothing: accepted
    plain = client.completions.create(model=BASE, prompt="One, two,", max_tokens=2, echo=False)
    assert plain.choices[0].text is not None
