"""Serving node: registry sync into a verified cache, batched generation engine with hot swap, OpenAI-compatible API."""
