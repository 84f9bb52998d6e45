"""The small interface every engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.catalog import ModelSpec


class ModelFileMissing(Exception):
    """The model's weights are not on this machine; the message says what to install."""


@dataclass(frozen=True)
class Resources:
    """What one replica needs, or what the fleet has."""

    threads: int = 0
    memory_mib: int = 0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.threads + other.threads, self.memory_mib + other.memory_mib,
                         self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.threads - other.threads, self.memory_mib - other.memory_mib,
                         self.gpus - other.gpus)

    def fits_in(self, budget: Resources) -> bool:
        return (self.threads <= budget.threads and self.memory_mib <= budget.memory_mib
                and self.gpus <= budget.gpus)

    def __str__(self) -> str:
        return f"{self.threads} threads, {self.memory_mib} MiB, {self.gpus} GPUs"


@dataclass(frozen=True)
class LaunchPlan:
    """How to run one replica.  An empty ``argv`` means nothing to run: the
    replica is attached to an existing server at ``url``."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    url: str | None = None
    # Sent with every request to the worker (an external server's credential).
    headers: dict[str, str] = field(default_factory=dict, repr=False)


class Engine(ABC):
    """Launches one kind of worker and adapts request bodies for it."""

    backend: str

    def __init__(self, spec: ModelSpec, models_dir: Path) -> None:
        self.spec = spec
        self.models_dir = models_dir
        self._effective: tuple[ModelSpec, ModelSpec, str | None] | None = None

    def effective(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with ``capabilities.tool_calling = "auto"`` resolved (once
        per spec): what requests are checked and built with."""
        if spec.capabilities.tool_calling != "auto":
            return spec
        cached = self._effective
        if cached is None or cached[0] is not spec:
            mode, why = self.detect_tool_calling(spec)
            caps = spec.capabilities.model_copy(update={"tool_calling": mode,
                                                        "tools": mode != "none"})
            cached = self._effective = (spec, spec.model_copy(update={"capabilities": caps}),
                                        why)
        return cached[1]

    def tool_calling_source(self, spec: ModelSpec) -> str | None:
        """Why an "auto" model's tool calls are made as they are (None: set in the catalog)."""
        if spec.capabilities.tool_calling != "auto":
            return None
        self.effective(spec)
        return self._effective[2] if self._effective is not None else None

    def detect_tool_calling(self, spec: ModelSpec) -> tuple[str, str]:
        """An "auto" model's mode: engines that parse tool calls themselves."""
        return "native", f"the {self.backend} engine parses tool calls"

    @abstractmethod
    def check(self) -> None:
        """Raise ModelFileMissing if a replica could not start for lack of files."""

    @abstractmethod
    def resources(self) -> Resources:
        """What one replica of this model needs."""

    @abstractmethod
    def launch(self, port: int) -> LaunchPlan:
        """The command that serves this model on 127.0.0.1:port."""

    def adapt(self, payload: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
        """The worker's body from a validated request (engines may lift metadata keys)."""
        if metadata is not None:
            payload["metadata"] = metadata
        return payload

    def prepare_stream(self, payload: dict[str, Any]) -> None:
        """Ask the worker for what a stream needs (usage at the end, at least)."""
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}


def engine_for(
    spec: ModelSpec,
    models_dir: Path,
    llama_server: Path | None = None,
    environ: dict[str, str] | None = None,
) -> Engine:
    from modelfleet.engines.external import ExternalServer
    from modelfleet.engines.llamacpp import LlamaCppEngine
    from modelfleet.engines.own import DiffusersEngine, SentenceTransformersEngine, TaskEngine
    from modelfleet.engines.servers import ManagedServer

    if spec.engine.type == "llama.cpp":
        return LlamaCppEngine(spec, models_dir, binary=llama_server)
    if spec.engine.type == "external":
        return ExternalServer(spec, models_dir, environ=environ)
    if spec.engine.type in ("vllm", "sglang"):
        return ManagedServer(spec, models_dir)
    if spec.engine.type == "sentence-transformers":
        return SentenceTransformersEngine(spec, models_dir)
    if spec.engine.type == "diffusers":
        return DiffusersEngine(spec, models_dir)
    if spec.engine.type == "modelfleet-task":
        return TaskEngine(spec, models_dir)
    raise ValueError(f"unknown engine {spec.engine.type!r}")  # pragma: no cover
