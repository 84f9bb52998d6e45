"""The OpenAI Agents SDK (which calls the Responses API) against modelfleet
with the real SmolLM2: an agent with a function tool calls it (the call is
forced, then tool_choice resets), gets the result back as a
``function_call_output`` item and answers; streamed the same."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Server

pytestmark = pytest.mark.workers


def _agent(server: Server, seen: list[str], client: Any) -> Any:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        function_tool,
        set_tracing_disabled,
    )
    set_tracing_disabled(True)  # nothing leaves this machine

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"It is sunny in {city}."

    return Agent(name="weather", instructions="Use the tools.", tools=[get_weather],
                 model=OpenAIResponsesModel(model="smollm2", openai_client=client),
                 model_settings=ModelSettings(tool_choice="required", max_tokens=60,
                                              temperature=0),
                 reset_tool_choice=True)


def _client(server: Server) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)


def test_agent_calls_its_tool_and_answers(server: Server) -> None:
    from agents import Runner

    seen: list[str] = []

    async def run() -> Any:
        async with _client(server) as client:
            return await Runner.run(_agent(server, seen, client),
                                    "What is the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    assert len(seen) == 1 and seen[0]  # the tool ran once, with a city
    assert isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item"


def test_agent_streamed(server: Server) -> None:
    from agents import Runner

    seen: list[str] = []

    async def run() -> tuple[list[str], Any]:
        async with _client(server) as client:
            stream = Runner.run_streamed(_agent(server, seen, client), "Weather in Oslo?",
                                         max_turns=4)
            kinds = [event.type async for event in stream.stream_events()]
            return kinds, stream.final_output

    kinds, final = asyncio.run(run())
    assert len(seen) == 1
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert isinstance(final, str) and final
