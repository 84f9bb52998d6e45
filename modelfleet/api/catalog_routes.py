"""The model list (OpenAI shape), the public catalog with live state, and runtime."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from modelfleet.api import openapi_doc
from modelfleet.api.auth import require
from modelfleet.catalog import ModelKind, ModelSpec, VideoDefaults
from modelfleet.errors import ModelNotFound
from modelfleet.keys import Principal, Scope
from modelfleet.openai import rerank, taskchat, tokenize
from modelfleet.services import Services

ENDPOINTS = {
    ModelKind.chat: ["/v1/chat/completions", "/v1/completions"],
    ModelKind.completion: ["/v1/completions"],
    ModelKind.embedding: ["/v1/embeddings"],
    ModelKind.image: ["/v1/inference/image", "/v1/images/generations"],
    ModelKind.task: ["/v1/chat/completions"],
    ModelKind.video: ["/v1/inference/video", "/v1/videos"],
}
# The catalog's groups: "text" holds chat and completion models.
GROUP = {ModelKind.chat: "text", ModelKind.completion: "text",
         ModelKind.embedding: "embedding", ModelKind.image: "image", ModelKind.task: "task",
         ModelKind.video: "video"}


def _image_parameters(spec: ModelSpec) -> dict[str, Any]:
    lim, dft = spec.limits, spec.parameter_defaults
    return {
        "min_input_images": lim.min_input_images,
        "max_input_images": lim.max_input_images,
        "max_prompt_length": lim.max_prompt_chars,
        "sizes": list(lim.sizes),
        "steps": {"default": dft.steps, "min": lim.min_steps, "max": lim.max_steps},
        "n": {"default": 1, "min": 1, "max": lim.max_n},
        "parameter_defaults": dft.model_dump(),
    }


def _video_parameters(spec: ModelSpec) -> dict[str, Any]:
    lim, dft = spec.limits, spec.parameter_defaults
    assert isinstance(dft, VideoDefaults)
    return {
        "max_prompt_length": lim.max_prompt_chars,
        "sizes": list(lim.sizes),
        "steps": {"default": dft.steps, "min": lim.min_steps, "max": lim.max_steps},
        "frames": {"default": dft.frames, "min": lim.min_frames, "max": lim.max_frames,
                   "step": lim.frame_step},
        "fps": {"default": dft.fps, "min": lim.min_fps, "max": lim.max_fps},
        "max_seconds": lim.max_seconds,
        "parameter_defaults": dft.model_dump(exclude={"strength"}),
    }


def _parameters(spec: ModelSpec) -> dict[str, Any]:
    if spec.kind is ModelKind.image:
        return _image_parameters(spec)
    if spec.kind is ModelKind.video:
        return _video_parameters(spec)
    if spec.kind is ModelKind.task:
        return taskchat.parameters(spec)
    lim, dft = spec.limits, spec.defaults
    if spec.kind is ModelKind.embedding:
        return {"max_inputs": lim.max_inputs, "max_input_tokens": lim.max_input_tokens,
                "encoding_format": ["float", "base64"],
                "rerank": {"method": rerank.METHOD, "max_documents": lim.max_inputs - 1}}
    return {
        "max_tokens": {"default": dft.max_tokens, "min": 1, "max": lim.max_output_tokens},
        "temperature": {"default": dft.temperature, "min": 0.0, "max": 2.0},
        "top_p": {"default": dft.top_p, "min": 0.0, "max": 1.0},
        "n": {"default": 1, "min": 1, "max": lim.max_n},
        "stop": {"max_sequences": lim.max_stop, "max_chars": lim.max_stop_chars},
        "messages": {"max": lim.max_messages},
        "prompts": {"max": lim.max_prompts},
        "context_length": lim.context_length,
        "stream": {"allowed": spec.capabilities.streaming},
        # What is refused before a worker sees it (docs/api.md, "Costly inputs").
        "tools": {"max": lim.max_tools, "max_schema_bytes": lim.max_tool_schema_bytes},
        "response_format": {"max_schema_bytes": lim.max_schema_bytes,
                            "max_enum_entries": lim.max_schema_enum,
                            "max_repeat": lim.max_schema_repeat},
        "json": {"max_depth": lim.max_json_depth},
        "metadata": {"max_bytes": lim.max_metadata_bytes},
        "logit_bias": {"min": -100, "max": 100, "vocab_size": lim.vocab_size},
    }


class CatalogView:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.created = int(
            services.catalog.source.stat().st_mtime if services.catalog.source else time.time()
        )

    def runtime(self, spec: ModelSpec) -> dict[str, Any]:
        pool = self.services.fleet.pools[spec.id]
        state = pool.describe()
        # Every gateway's requests (several gateways share one fleet: fleetshare.py).
        state["queued"], state["in_flight"] = pool.fleet_load()
        return state

    def entry(self, spec: ModelSpec) -> dict[str, Any]:
        pool = self.services.fleet.pools.get(spec.id)
        capabilities = spec.capabilities.model_dump()
        if pool is not None and spec.capabilities.tool_calling == "auto":
            capabilities = pool.engine.effective(spec).capabilities.model_dump()
            capabilities["tool_calling_detected"] = pool.engine.tool_calling_source(spec)
        return {
            "model": spec.id,
            "aliases": list(spec.aliases),
            "kind": spec.kind.value,
            "description": spec.description,
            "owned_by": spec.owned_by,
            "backend": spec.backend,
            "endpoints": ENDPOINTS[spec.kind] + tokenize.endpoints(spec) + rerank.endpoints(spec),
            "parameters": _parameters(spec),
            "capabilities": capabilities,
            "scaling": spec.scaling.model_dump(),
            "pricing": self.pricing(spec),
            "runtime": self.runtime(spec),
            "recent_summary_stats": self.services.scheduler.queue(spec.id).stats.summary(),
        }

    def pricing(self, spec: ModelSpec) -> dict[str, Any]:
        if spec.kind is ModelKind.image:
            return {"unit": "micro-units per image", "per_image": spec.prices.per_image}
        if spec.kind is ModelKind.video:
            return {"unit": "micro-units per second of video",
                    "per_video_second": spec.prices.per_video_second}
        return {
            "unit": "micro-units per million tokens",
            "input_per_million_tokens": spec.prices.input_per_million,
            "output_per_million_tokens": spec.prices.output_per_million,
        }

    def openai_model(self, spec: ModelSpec) -> dict[str, Any]:
        return {"id": spec.id, "object": "model", "created": self.created, "owned_by": spec.owned_by}


def router(services: Services) -> APIRouter:
    api = APIRouter()
    view = CatalogView(services)
    catalog = services.catalog

    def visible(principal: Principal, spec: ModelSpec) -> bool:
        info = services.projects.project(principal.project_id)
        return info is None or info.may_use(spec.id)

    @api.get("/v1/models", tags=["models"], responses=openapi_doc.errors(scope="any"))
    async def list_models(request: Request) -> dict[str, Any]:
        """The models this key's project may use (its deployed models, or all)."""
        principal = await require(services, request, None)
        return {"object": "list",
                "data": [view.openai_model(s) for s in catalog if visible(principal, s)]}

    @api.get("/v1/models/{model_id:path}", tags=["models"],
             responses=openapi_doc.errors(404, scope="any"))
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        principal = await require(services, request, None)
        spec = catalog.resolve(model_id)
        if spec is None or not visible(principal, spec):
            raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
        return view.openai_model(spec)

    @api.get("/v1/inference/models", tags=["catalog"])
    async def inference_models() -> dict[str, Any]:
        """The public catalog: limits, defaults, prices, live state and recent stats."""
        out: dict[str, Any] = {"object": "catalog", "text": [], "embedding": [], "image": []}
        for kind in ModelKind:
            out.setdefault(kind.value, [])
        for spec in catalog:
            entry = view.entry(spec)
            out[GROUP[spec.kind]].append(entry)
            if GROUP[spec.kind] != spec.kind.value:
                out[spec.kind.value].append(entry)
        return out

    @api.get("/v1/inference/runtime/models", tags=["catalog"])
    async def runtime_models() -> dict[str, Any]:
        """Per group: whether each model can serve, and its ready/desired replicas."""
        out: dict[str, list[dict[str, Any]]] = {"text": [], "embedding": [], "image": [],
                                                "task": [], "video": []}
        for spec in catalog:
            row = {"model": spec.id, "kind": spec.kind.value, **view.runtime(spec)}
            if spec.kind is ModelKind.image:
                lim = spec.limits
                row.update({"min_input_images": lim.min_input_images,
                            "max_input_images": lim.max_input_images,
                            "max_prompt_length": lim.max_prompt_chars,
                            "parameter_defaults": spec.parameter_defaults.model_dump()})
            out[GROUP[spec.kind]].append(row)
        return out

    return api


def fleet_router(services: Services) -> APIRouter:
    """The fleet as an operator sees it (admin scope): replicas and scale events."""
    api = APIRouter()
    catalog = services.catalog

    @api.get("/v1/admin/replicas", tags=["admin"], responses=openapi_doc.errors(scope="admin"))
    async def replicas(request: Request) -> dict[str, Any]:
        """Every replica with its process, port and load (admin scope)."""
        await require(services, request, Scope.admin)
        rows = []
        for model_id, pool in services.fleet.pools.items():
            for r in pool.replicas:
                rows.append({
                    "id": r.id, "model": model_id, "state": r.state.value, "pid": r.pid,
                    "url": r.base_url, "slots": r.slots, "share": r.share,
                    "outstanding": r.outstanding, "served": r.served,
                })
        return {"replicas": rows, "scale_events": [e.__dict__ for e in services.fleet.events()],
                "fleet": services.fleet.share.describe()}

    @api.get("/v1/admin/scale-events", tags=["admin"],
             responses=openapi_doc.errors(404, scope="admin"))
    async def scale_events(request: Request, model: str | None = None) -> dict[str, Any]:
        """Every autoscaler decision: time, model, from, to, reason (admin scope)."""
        await require(services, request, Scope.admin)
        spec = catalog.resolve(model) if model else None
        if model and spec is None:
            raise ModelNotFound(f"model {model!r} does not exist", param="model")
        events = [e.__dict__ for e in services.fleet.events()
                  if spec is None or e.model == spec.id]
        return {"object": "list", "data": events}

    return api
