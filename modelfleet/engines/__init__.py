"""Engines: how to launch a worker for a model and how to talk to it.

Every worker speaks OpenAI-compatible HTTP, so one client (``http.py``) reaches
all of them; an engine module only knows how to build the launch plan and
how to shape the request body for its server.
"""

from modelfleet.engines.base import Engine, LaunchPlan, ModelFileMissing, engine_for

__all__ = ["Engine", "LaunchPlan", "ModelFileMissing", "engine_for"]
