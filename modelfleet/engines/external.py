"""An OpenAI-compatible server that modelfleet does not run.

Nothing is started: the replica is *attached* to the URL, health-checked
like any other, and every request carries the credential from the
environment variable the catalog names.  Keys, limits, billing, stats and
headers apply exactly as for managed workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from modelfleet.catalog import ExternalEngine, ModelSpec
from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, Resources


class ExternalServer(Engine):
    def __init__(self, spec: ModelSpec, models_dir: Path,
                 environ: dict[str, str] | None = None) -> None:
        super().__init__(spec, models_dir)
        assert isinstance(spec.engine, ExternalEngine)
        self.conf: ExternalEngine = spec.engine
        self.backend = self.conf.backend
        self._environ = os.environ if environ is None else environ

    def _headers(self) -> dict[str, str]:
        name = self.conf.api_key_env
        if name is None:
            return {}
        secret = self._environ.get(name)
        if not secret:
            raise ModelFileMissing(f"the credential for this model is not set: export {name}")
        return {"Authorization": f"Bearer {secret}"}

    def check(self) -> None:
        self._headers()

    def resources(self) -> Resources:
        return Resources(self.conf.threads, self.conf.memory_mib, self.conf.gpus)

    def launch(self, port: int) -> LaunchPlan:
        return LaunchPlan(argv=[], url=self.conf.url.rstrip("/"),
                          health_path=self.conf.health_path, headers=self._headers())

    def adapt(self, payload: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
        payload["model"] = self.conf.upstream_model or self.spec.id
        return super().adapt(payload, metadata)
