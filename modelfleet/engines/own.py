"""modelfleet's own workers: embeddings (sentence-transformers), images and
videos (diffusers), task models (classification, NER, PII), each a Python
process per replica speaking OpenAI-style HTTP.

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
from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.catalog import SentenceTransformersEngine as SentenceTransformersSpec
from modelfleet.catalog import TaskEngine as TaskSpec
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
    marker = "model_index.json"

    def __init__(self, spec: ModelSpec, models_dir: Path) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, DiffusersSpec)
        # the same pipeline folder, served by the image or the video worker
        self.module = "modelfleet.workers.videos" if spec.kind is ModelKind.video \
            else "modelfleet.workers.images"

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


class TaskEngine(_OwnWorker):
    """Task models (classification, NER, PII) behind the chat body: the worker
    answers ``/v1/chat/completions`` with the task's JSON (docs/tasks.md)."""

    backend = "modelfleet-task"
    module = "modelfleet.workers.tasks"
    marker = "modules.json"
    # What each task imports, as (module, PyPI distribution).
    NEEDS = {"classification": [("sentence_transformers", "sentence-transformers")],
             "ner": [("spacy", "spacy")],
             "pii": [("spacy", "spacy"), ("presidio_analyzer", "presidio-analyzer"),
                     ("presidio_anonymizer", "presidio-anonymizer")]}

    def __init__(self, spec: ModelSpec, models_dir: Path) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, TaskSpec)

    def check(self) -> None:
        for module, pypi in self.NEEDS[self.conf.task]:
            _require_module(module, pypi)
        if self.conf.spacy_model:
            _require_module(self.conf.spacy_model, self.conf.pypi_package or self.conf.spacy_model)
        else:
            self.model_dir()

    def launch(self, port: int) -> LaunchPlan:
        model = ["--spacy-model", self.conf.spacy_model] if self.conf.spacy_model \
            else ["--model-dir", str(self.model_dir())]
        argv = [sys.executable, "-m", self.module, "--task", self.conf.task, *model,
                "--host", "127.0.0.1", "--port", str(port), "--model-name", self.spec.id,
                "--threads", str(self.conf.threads), "--parent-pid", str(os.getpid())]
        argv += [f"--label={label}" for label in self.conf.labels]
        return LaunchPlan(argv=argv, env=_worker_env(self.conf.threads), health_path="/health")

    def adapt(self, payload: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
        return payload  # the task's parameters are in the payload already, checked
