"""modelfleet's own workers: embeddings (sentence-transformers) and images
(diffusers), each a Python process per replica speaking OpenAI-style HTTP.

The API process never imports torch: the worker does, so a model's memory
and threads belong to its replica, and a crash takes down only the replica.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from modelfleet.catalog import DiffusersEngine as DiffusersSpec
from modelfleet.catalog import ModelSpec
from modelfleet.catalog import SentenceTransformersEngine as SentenceTransformersSpec
from modelfleet.engines import modelfiles
from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, Resources


def _require_module(module: str, pypi: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelFileMissing(f"the Python package {pypi!r} is not installed (run `make install`)")


def _worker_env(threads: int) -> dict[str, str]:
    # Offline for good: a worker must never reach for a hub.
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class _OwnWorker(Engine):
    module: str
    marker: str

    @property
    def conf(self) -> Any:
        return self.spec.engine

    def model_dir(self) -> Path:
        return modelfiles.resolve_dir(self.conf.model_dir, self.models_dir, self.marker,
                                      getattr(self.conf, "pypi_package", None))

    def resources(self) -> Resources:
        return Resources(threads=self.conf.threads, memory_mib=self.conf.memory_mib,
                         gpus=self.conf.gpus)

    def base_argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", self.module, "--model-dir", str(self.model_dir()),
                "--host", "127.0.0.1", "--port", str(port), "--model-name", self.spec.id,
                "--threads", str(self.conf.threads), "--parent-pid", str(os.getpid())]

    def prepare_stream(self, payload: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError(f"{self.backend} does not stream")


class SentenceTransformersEngine(_OwnWorker):
    backend = "sentence-transformers"
    module = "modelfleet.workers.embeddings"
    marker = "modules.json"

    def __init__(self, spec: ModelSpec, models_dir: Path) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, SentenceTransformersSpec)

    def check(self) -> None:
        _require_module("sentence_transformers", "sentence-transformers")
        self.model_dir()

    def launch(self, port: int) -> LaunchPlan:
        argv = [*self.base_argv(port), "--max-batch", str(self.conf.max_batch),
                "--max-input-tokens", str(self.spec.limits.max_input_tokens)]
        return LaunchPlan(argv=argv, env=_worker_env(self.conf.threads), health_path="/health")


class DiffusersEngine(_OwnWorker):
    backend = "diffusers"
    module = "modelfleet.workers.images"
    marker = "model_index.json"

    def __init__(self, spec: ModelSpec, models_dir: Path) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, DiffusersSpec)

    def check(self) -> None:
        _require_module("diffusers", "diffusers")
        try:
            self.model_dir()
        except ModelFileMissing as exc:
            raise ModelFileMissing(
                f"{exc}: the weights of {self.spec.id!r} are not on this machine; save a diffusers "
                f"pipeline there (pipeline.save_pretrained(folder))") from None

    def launch(self, port: int) -> LaunchPlan:
        return LaunchPlan(argv=self.base_argv(port), env=_worker_env(self.conf.threads),
                          health_path="/health")
