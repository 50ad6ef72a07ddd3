"""Inference engines behind one contract (serving/engines/base.py), chosen per node by `serving.engine`.

Adding a backend: a module here with a `ModelEngine` subclass, plus one entry in `ENGINES`.
"""

from __future__ import annotations

from textmill.serving.engines.base import ModelEngine
from textmill.serving.engines.batching import BatchingEngine

ENGINES: dict[str, type[ModelEngine]] = {
    "batching": BatchingEngine,   # continuous batching on a transformers model (CPU or CUDA)
}


def engine_class(name: str) -> type[ModelEngine]:
    """The engine registered as `name`; ValueError naming the choices when there is none."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"serving.engine={name!r} is not a known engine; choose one of {sorted(ENGINES)}") from None
