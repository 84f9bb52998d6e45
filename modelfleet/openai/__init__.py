"""The OpenAI-compatible API surface, one module per feature."""
