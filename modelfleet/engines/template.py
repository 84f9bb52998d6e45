"""What a model's chat template can do with tools, read from its GGUF file.

``capabilities.tool_calling = "auto"`` (catalog.py) is resolved here, once
per model, before any replica runs (a request to a sleeping model is built
before its replica starts): the ``tokenizer.chat_template`` string is read
from the GGUF header, and rendered with a probe tool, as llama.cpp decides
``chat_template_caps.supports_tools`` (its ``GET /props``): a template whose
output names the tool takes tools.  Then tool calls are the engine's own
("native"); otherwise the gateway's JSON-schema grammar ("grammar", where the
model can emit JSON) or none.  The engine's ``/props`` is read again when a
replica starts, and a difference is logged (``supervisor``/``fleet`` callers).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_MAGIC = b"GGUF"
TEMPLATE_KEY = "tokenizer.chat_template"
# GGUF value types: fixed sizes, strings (8) and arrays (9).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_PROBE = "modelfleet_probe_tool"


class GGUFError(ValueError):
    pass


def _u32(f: IO[bytes]) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: IO[bytes]) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _read(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("GGUF file ends inside its header")
    return data


def _string(f: IO[bytes]) -> bytes:
    return _read(f, _u64(f))


def _skip(f: IO[bytes], kind: int) -> None:
    if kind in _FIXED:
        f.seek(_FIXED[kind], 1)
    elif kind == _STRING:
        f.seek(_u64(f), 1)
    elif kind == _ARRAY:
        item, count = _u32(f), _u64(f)
        if item in _FIXED:
            f.seek(_FIXED[item] * count, 1)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise GGUFError(f"unknown GGUF value type {kind}")


def read_metadata_string(path: Path, key: str) -> str | None:
    """One string value of a GGUF file's metadata (None: not there)."""
    with open(path, "rb") as f:
        if _read(f, 4) != _MAGIC:
            raise GGUFError(f"{path} is not a GGUF file")
        version = _u32(f)
        if version < 2:
            raise GGUFError(f"GGUF version {version} is not supported")
        _u64(f)  # tensors
        for _ in range(_u64(f)):
            name = _string(f).decode("utf-8", "replace")
            kind = _u32(f)
            if name == key and kind == _STRING:
                return _string(f).decode("utf-8", "replace")
            _skip(f, kind)
    return None


def _raise(message: str) -> None:
    raise RuntimeError(message)


def supports_tools(template: str) -> bool:
    """Whether the template shows the functions it is given (rendered in a
    sandbox with one probe tool, as llama.cpp's capability check does)."""
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    tool = {"type": "function", "function": {
        "name": _PROBE, "description": "probe",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}},
                       "required": ["x"]}}}
    try:
        out = env.from_string(template).render(
            messages=[{"role": "user", "content": "hi"}], tools=[tool],
            add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as exc:  # a template that fails with tools does not take them
        log.info("chat template does not render with tools: %s", exc)
        return False
    return _PROBE in out


def tool_calling_of(model_path: Path, json_output: bool) -> tuple[str, str]:
    """The tool-calling mode of a GGUF model, and why."""
    try:
        template = read_metadata_string(model_path, TEMPLATE_KEY)
    except (OSError, GGUFError) as exc:
        log.warning("cannot read the chat template of %s: %s", model_path, exc)
        template = None
    if template is not None and supports_tools(template):
        return "native", "the chat template renders tools"
    why = "the chat template has no tool section" if template is not None \
        else "the model file has no chat template"
    return ("grammar" if json_output else "none"), why


def props_supports_tools(props: dict[str, Any]) -> bool | None:
    """llama-server's ``GET /props`` answer: does its template take tools."""
    caps = props.get("chat_template_caps")
    if isinstance(caps, dict) and isinstance(caps.get("supports_tools"), bool):
        return bool(caps["supports_tools"])
    return None
