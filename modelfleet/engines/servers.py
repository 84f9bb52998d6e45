"""Managed vLLM and SGLang servers, one process per replica, on GPUs.

Declared in the catalog by model and GPU count; the launch command is the
engine's usual one (or the catalog's own template).  Both serve the OpenAI
API, so the same client reaches them.  On a machine without GPUs the fleet's
budget has none, so such a model is reported as waiting for room.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from modelfleet.catalog import ModelSpec, ServerEngine
from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, Resources

DEFAULT_COMMANDS = {
    "vllm": ["vllm", "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}",
             "--tensor-parallel-size", "{gpus}", "--served-model-name", "{id}"],
    "sglang": [sys.executable, "-m", "sglang.launch_server", "--model-path", "{model}",
               "--host", "127.0.0.1", "--port", "{port}", "--tp-size", "{gpus}",
               "--served-model-name", "{id}"],
}


class ManagedServer(Engine):
    def __init__(self, spec: ModelSpec, models_dir: Path) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, ServerEngine)
        self.conf: ServerEngine = spec.engine
        self.backend = self.conf.type

    def command(self, port: int) -> list[str]:
        template = self.conf.command or DEFAULT_COMMANDS[self.conf.type]
        values = {"model": self.conf.model, "port": str(port), "gpus": str(self.conf.gpus),
                  "id": self.spec.id}
        return [part.format(**values) for part in template] + list(self.conf.args)

    def check(self) -> None:
        program = self.command(0)[0]
        if self.conf.type == "vllm" and shutil.which(program) is None:
            raise ModelFileMissing(f"{program!r} is not installed on this machine")
        if self.conf.type == "sglang":
            import importlib.util

            if importlib.util.find_spec("sglang") is None:
                raise ModelFileMissing("the Python package 'sglang' is not installed")

    def resources(self) -> Resources:
        return Resources(self.conf.threads, self.conf.memory_mib, self.conf.gpus)

    def launch(self, port: int) -> LaunchPlan:
        return LaunchPlan(argv=self.command(port), env=dict(self.conf.env), health_path="/health")

    def prepare_stream(self, payload: dict[str, Any]) -> None:
        super().prepare_stream(payload)
        # usage on every chunk: a client that leaves early pays for what it got
        payload["stream_options"]["continuous_usage_stats"] = True
