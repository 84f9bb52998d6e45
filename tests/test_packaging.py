"""A gateway-only install does not need the workers' libraries: the gateway
(the app, the CLI, the services, started and answering requests) never imports
torch, transformers, diffusers, sentence-transformers or ray.  Those live in
the ``workers`` and ``ray`` extras (pyproject.toml, docs/dependencies.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers", "sentence_transformers", "ray", "spacy",
         "presidio_analyzer", "presidio_anonymizer")

# Runs in a fresh interpreter: build and start the services on the built-in
# catalog plus a model whose file is missing, answer requests through the app
# (list models, the public catalog, a chat completion refused before a worker,
# one that fails as unavailable, an embeddings request refused by its limits),
# then report which heavy modules were imported.
SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path

import modelfleet.api.app
import modelfleet.cli
import modelfleet.services

import httpx

from modelfleet.api.app import create_app
from modelfleet.catalog import DEFAULT_CATALOG
from modelfleet.services import Services
from modelfleet.settings import Settings

HEAVY = %(heavy)r
tmp = Path(sys.argv[1])


async def main():
    catalog = tmp / "catalog.toml"
    catalog.write_text(DEFAULT_CATALOG.read_text() + '''
[[models]]
id = "test/missing"
kind = "chat"
[models.engine]
type = "llama.cpp"
model_file = "/nonexistent/model.gguf"
''')
    settings = Settings(data_dir=tmp / "data", catalog_path=catalog, bootstrap_default_key=False)
    services = Services.build(settings)
    app = create_app(settings, services)
    await services.start()
    statuses = []
    try:
        key = await services.keys.create("tenant", ["inference"])
        await services.ledger.credit(key.project_id, 10**9, kind="topup", reason="", actor="t")
        headers = {"Authorization": f"Bearer {key.key}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses.append((await client.get("/v1/models", headers=headers)).status_code)
            statuses.append((await client.get("/v1/inference/models", headers=headers)).status_code)
            chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
            statuses.append((await client.post("/v1/chat/completions", headers=headers,
                                               json={**chat, "max_tokens": 10**6})).status_code)
            statuses.append((await client.post("/v1/chat/completions", headers=headers,
                                               json={**chat, "model": "test/missing"})).status_code)
            statuses.append((await client.post("/v1/embeddings", headers=headers, json={
                "model": "minilm", "input": ["x"] * 1000})).status_code)
    finally:
        await services.stop()
    print(json.dumps({"statuses": statuses,
                      "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))


asyncio.run(main())
"""


def test_gateway_never_imports_worker_libraries(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT % {"heavy": HEAVY}, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [200, 200, 400, 503, 400], report
    assert report["heavy"] == [], f"the gateway imported {report['heavy']}"


def test_heavy_libraries_are_extras() -> None:
    """torch & co. are in the ``workers`` extra, ray in ``ray``, not in the core
    dependencies; the test extra installs every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for dep in project["dependencies"]}
    for name in ("torch", "transformers", "diffusers", "sentence-transformers", "ray", "spacy",
                 "presidio-analyzer", "presidio-anonymizer"):
        assert name not in core
    extras = project["optional-dependencies"]
    assert "torch==2.13.0" in extras["workers"]
    assert extras["ray"] == ["ray==2.60.0"]
    assert "presidio-analyzer==2.2.366" in extras["tasks"]
    assert "modelfleet[workers,tasks,postgres,redis,otel,ray]" in extras["test"]
