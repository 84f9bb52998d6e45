"""``tool_calling = "auto"``: how a model takes tools is read from its GGUF
chat template (engines/template.py), and agrees with what llama-server itself
reports (``GET /props`` ``chat_template_caps.supports_tools``).

The bundled SmolLM2's template has no tool section: "grammar".  The same
weights with a template that has one (written into a copy of the GGUF here,
in the Hermes ``<tool_call>`` format llama.cpp recognises) are "native":
the tools go to llama-server as sent, and it makes the calls."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from modelfleet.engines import modelfiles, template
from modelfleet.engines.llamacpp import find_llama_server
from tests.conftest import SMOL_FILE, Server, launch_server, stop_server
from tests.services import free_port

pytestmark = pytest.mark.workers

# A ChatML template with a tool section in the Hermes format (tools listed in
# <tools>, calls in <tool_call>, results in <tool_response>).
TOOL_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call functions. Their signatures are in <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor a call, answer with <tool_call>\\n{"name": <function-name>, \
"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' %}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}
{{- '<|im_start|>assistant' }}
{%- for call in message['tool_calls'] %}
{{- '\\n<tool_call>\\n{"name": "' + call['function']['name'] + '", "arguments": ' }}
{{- call['function']['arguments'] if call['function']['arguments'] is string \
else call['function']['arguments'] | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message['role'] == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
           "required": ["city"], "additionalProperties": False}
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}}]


_u32, _u64, _skip_value = template._u32, template._u64, template._skip


def with_template(src: Path, dst: Path, chat_template: str) -> None:
    """A copy of a GGUF file whose ``tokenizer.chat_template`` is another:
    the metadata is rewritten, the tensor infos kept, the tensor data moved
    to the new (aligned) start."""
    with open(src, "rb") as f:
        assert f.read(4) == b"GGUF"
        version, tensors, count = _u32(f), _u64(f), _u64(f)
        kvs: list[tuple[bytes, bytes]] = []
        alignment = 32
        for _ in range(count):
            key = f.read(_u64(f))
            start = f.tell()
            kind = _u32(f)
            if key == b"general.alignment":
                alignment = _u32(f)
            else:
                _skip_value(f, kind)
            end = f.tell()
            f.seek(start)
            kvs.append((key, f.read(end - start)))
        infos_start = f.tell()
        for _ in range(tensors):
            f.seek(_u64(f), 1)  # name
            dims = _u32(f)
            f.seek(8 * dims + 4 + 8, 1)  # dims, type, offset
        infos = (infos_start, f.tell())
        data_start = -(-f.tell() // alignment) * alignment
        text = chat_template.encode()
        value = struct.pack("<I", 8) + struct.pack("<Q", len(text)) + text
        kvs = [(k, v) for k, v in kvs if k != template.TEMPLATE_KEY.encode()]
        kvs.append((template.TEMPLATE_KEY.encode(), value))
        with open(dst, "wb") as out:
            out.write(b"GGUF" + struct.pack("<IQQ", version, tensors, len(kvs)))
            for key, raw in kvs:
                out.write(struct.pack("<Q", len(key)) + key + raw)
            f.seek(infos[0])
            out.write(f.read(infos[1] - infos[0]))
            out.write(b"\0" * (-out.tell() % alignment))
            f.seek(data_start)
            while chunk := f.read(1 << 22):
                out.write(chunk)


@pytest.fixture(scope="module")
def tool_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = modelfiles.resolve(SMOL_FILE, Path("/nonexistent"))
    dst = tmp_path_factory.mktemp("gguf") / "smol-tools.gguf"
    with_template(src, dst, TOOL_TEMPLATE)
    return dst


def _props(model: Path) -> dict[str, Any]:
    """llama-server's own reading of a model's template (GET /props)."""
    port = free_port()
    binary = find_llama_server(None)
    proc = subprocess.Popen([str(binary), "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--jinja", "--no-webui", "--threads", "1",
                             "--ctx-size", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return dict(httpx.get(f"http://127.0.0.1:{port}/props", timeout=5).json())
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "llama-server exited"
            time.sleep(0.2)
        raise AssertionError("llama-server did not start")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_gguf_template_is_read_and_agrees_with_llama_server(tool_gguf: Path) -> None:
    smol = modelfiles.resolve(SMOL_FILE, Path("/nonexistent"))
    assert template.read_metadata_string(tool_gguf, template.TEMPLATE_KEY) == TOOL_TEMPLATE
    assert template.tool_calling_of(smol, json_output=True)[0] == "grammar"
    assert template.tool_calling_of(smol, json_output=False)[0] == "none"
    assert template.tool_calling_of(tool_gguf, json_output=True)[0] == "native"
    for model, expected in ((smol, False), (tool_gguf, True)):
        assert template.props_supports_tools(_props(model)) is expected


@pytest.fixture(scope="module")
def native_server(tmp_path_factory: pytest.TempPathFactory, tool_gguf: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("native")
    catalog = f"""
[[models]]
id = "test/smol-native-tools"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "{tool_gguf}"
threads = 1
[models.limits]
max_messages = 8
max_output_tokens = 4000
context_length = 4096
[models.capabilities]
tools = true
tool_calling = "auto"
json_output = true
"""
    running = launch_server(tmp, catalog)
    try:
        yield running
    finally:
        stop_server(running.proc)


def test_auto_with_a_tool_template_is_native(native_server: Server) -> None:
    """"auto" goes to llama-server with the tools as sent (its template shows
    them, its parser reads the calls); a forced call still goes through the
    gateway's schema, because llama-server's own "required" lets prose come
    first (seen with this model: 200 tokens of prose, no call)."""
    listing = httpx.get(native_server.url + "/v1/inference/models", timeout=10).json()
    caps = listing["text"][0]["capabilities"]
    assert caps["tool_calling"] == "native" and caps["tools"] is True
    assert caps["tool_calling_detected"] == "the chat template renders tools"
    client = openai.OpenAI(base_url=native_server.url + "/v1", api_key=native_server.key,
                           max_retries=0, timeout=120)
    ask: Any = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        resp = client.chat.completions.create(model="test/smol-native-tools", tools=TOOLS,
                                              tool_choice=choice, temperature=0, max_tokens=60,
                                              messages=ask)
        out = resp.choices[0]
        assert out.finish_reason == "tool_calls" and out.message.tool_calls, out
        call = out.message.tool_calls[0]
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)  # type: ignore[union-attr]

    # "auto": the very prompt llama-server makes of the tools itself (the same
    # body straight to the replica counts the same prompt tokens)
    auto = client.chat.completions.create(model="test/smol-native-tools", tools=TOOLS,
                                          tool_choice="auto", temperature=0, max_tokens=8,
                                          messages=ask)
    replicas = httpx.get(native_server.url + "/v1/admin/replicas", timeout=10, headers={
        "Authorization": f"Bearer {native_server.admin_key}"}).json()["replicas"]
    direct = httpx.post(replicas[0]["url"] + "/v1/chat/completions", timeout=60, json={
        "messages": ask, "tools": TOOLS, "tool_choice": "auto", "temperature": 0,
        "max_tokens": 8}).json()
    assert auto.usage and auto.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert "<tool_call>" not in (auto.choices[0].message.content or "")
