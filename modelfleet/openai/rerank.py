"""POST /v1/rerank (the Cohere/Jina shape vLLM and TEI serve), by embedding similarity.

No small cross-encoder ships its weights in a PyPI package, so rerank is
served by embedding models: the query and the documents are embedded in one
call to the model's worker (``/v1/embeddings``, the same path an embeddings
request takes) and each document's ``relevance_score`` is the cosine
similarity of its vector with the query's.  The catalog and docs name it
"rerank by embedding similarity".  The usage is the worker's token count of
the query and every document, charged like embeddings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import Field

from modelfleet.catalog import ModelKind, ModelSpec
from modelfleet.engines.http import WorkerClient
from modelfleet.errors import InvalidRequest, UpstreamError
from modelfleet.openai.common import ModelName, Strict, require_kind
from modelfleet.scheduler import Lease

if TYPE_CHECKING:
    from modelfleet.gateway import Call

RERANK_PATH = "/v1/rerank"
METHOD = "rerank by embedding similarity"
Text = Annotated[str, Field(min_length=1, max_length=2_000_000)]


def serves_rerank(spec: ModelSpec) -> bool:
    return spec.kind is ModelKind.embedding


def endpoints(spec: ModelSpec) -> list[str]:
    return [RERANK_PATH] if serves_rerank(spec) else []


class Document(Strict):
    text: Text


class RerankRequest(Strict):
    model: ModelName
    query: Text
    documents: Annotated[list[Text | Document], Field(min_length=1, max_length=4096)]
    top_n: Annotated[int, Field(ge=0, le=4096)] | None = None  # 0 or absent: every document
    return_documents: bool = True

    # The chat-shaped fields the shared request path reads.
    stream: None = None
    stream_options: None = None
    metadata: None = None


def _texts(body: RerankRequest) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in body.documents]


def validate_rerank(spec: ModelSpec, body: RerankRequest) -> int:
    """Check against the model; returns 0 (nothing is generated)."""
    require_kind(spec, (ModelKind.embedding,), RERANK_PATH)
    if len(body.documents) + 1 > spec.limits.max_inputs:
        raise InvalidRequest(
            f"documents has {len(body.documents)} entries; model {spec.id!r} takes at most "
            f"{spec.limits.max_inputs - 1} (its max_inputs, less the query)",
            param="documents", code="too_many_inputs")
    return 0


def worker_body(spec: ModelSpec, body: RerankRequest, _max_tokens: int) -> dict[str, Any]:
    """The embeddings request for the query and the documents (metering bounds ``input``)."""
    return {"model": spec.id, "input": [body.query, *_texts(body)], "encoding_format": "base64"}


class RerankWork:
    """One rerank request: an embeddings call on the worker, scored here."""

    settle_before_end = True  # the worker counts the tokens: settled as embeddings are

    def __init__(self, spec: ModelSpec, route: str, body: RerankRequest, payload: dict[str, Any],
                 client: WorkerClient) -> None:
        self.spec = spec
        self.path = "/v1/embeddings"
        self.payload = payload
        self.documents = _texts(body)
        self.top_n = body.top_n or len(self.documents)
        self.return_documents = body.return_documents

    async def starting(self, lease: Lease) -> None:
        return None

    def finish(self, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        """The rerank answer from the rendered embeddings (float vectors)."""
        data = sorted(body.get("data") or [], key=lambda d: int(d["index"]))
        if len(data) != len(self.documents) + 1:
            raise UpstreamError(f"worker returned {len(data)} vectors for "
                                f"{len(self.documents) + 1} inputs")
        scores = cosine(np.asarray(data[0]["embedding"], np.float32),
                        np.stack([np.asarray(d["embedding"], np.float32) for d in data[1:]]))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:self.top_n]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if self.return_documents:
                item["document"] = {"text": self.documents[i]}
            results.append(item)
        tokens = int(call.usage.get("prompt_tokens", 0))
        return {"id": f"rerank-{call.request_id}", "object": "rerank", "model": self.spec.id,
                "method": METHOD, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def cosine(query: np.ndarray, docs: np.ndarray) -> list[float]:
    """Cosine similarity of ``query`` with each row of ``docs``."""
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    norms = np.maximum(np.linalg.norm(docs, axis=1), 1e-12)
    return [float(s) for s in (docs @ q) / norms]
