"""modelfleet: a self-hosted inference platform behind one OpenAI-compatible API."""

__version__ = "0.1.0"
