"""OpenAI GPT-2 checkpoint variables as data: names, shapes and the release's init. numpy only (no TF, no torch).

Names are exactly those of OpenAI's releases and gpt-2-simple runs (`model/wte`, `model/h0/attn/c_attn/w`, ...). Conv1D
weights keep OpenAI's leading unit axis: `[1, nx, nf]`. The TF model, the base stage and the converter all use this table.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from textmill.sizes import Hparams

# (suffix inside a block, shape as a function of n_embd) for every per-block variable, in OpenAI's order.
BLOCK_VARS: tuple[tuple[str, str], ...] = (
    ("ln_1/g", "e"), ("ln_1/b", "e"),
    ("attn/c_attn/w", "1,e,3e"), ("attn/c_attn/b", "3e"),
    ("attn/c_proj/w", "1,e,e"), ("attn/c_proj/b", "e"),
    ("ln_2/g", "e"), ("ln_2/b", "e"),
    ("mlp/c_fc/w", "1,e,4e"), ("mlp/c_fc/b", "4e"),
    ("mlp/c_proj/w", "1,4e,e"), ("mlp/c_proj/b", "e"),
)


def _dims(spec: str, e: int) -> tuple[int, ...]:
    return tuple(int(d[:-1] or 1) * e if d.endswith("e") else int(d) for d in spec.split(","))


def openai_shapes(hp: Hparams) -> dict[str, tuple[int, ...]]:
    """Every model variable of a GPT-2 checkpoint with its shape, in OpenAI's order."""
    e = hp.n_embd
    shapes: dict[str, tuple[int, ...]] = {"model/wpe": (hp.n_ctx, e), "model/wte": (hp.n_vocab, e)}
    for i in range(hp.n_layer):
        for suffix, spec in BLOCK_VARS:
            shapes[f"model/h{i}/{suffix}"] = _dims(spec, e)
    shapes["model/ln_f/g"] = (e,)
    shapes["model/ln_f/b"] = (e,)
    return shapes


def init_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """OpenAI model.py's init: wte N(0, 0.02), wpe N(0, 0.01), conv weights N(0, 0.02), biases 0, LayerNorm g=1 b=0."""
    leaf = name.rsplit("/", 1)[-1]
    if name == "model/wpe":
        return rng.normal(0.0, 0.01, shape).astype(np.float32)
    if name == "model/wte" or leaf == "w":
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    if leaf == "g":
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


def init_numpy(hp: Hparams, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Fresh weights one variable at a time (a 1.5B model never needs to sit in RAM twice)."""
    rng = np.random.default_rng(seed)
    for name, shape in openai_shapes(hp).items():
        yield name, init_value(name, shape, rng)


def is_model_weight(name: str) -> bool:
    """True for GPT-2 weights; False for optimizer slots (Adam, beta1_power), global_step, counters, textmill state."""
    return name.startswith("model/") and not any(
        part in name for part in ("/Adam", "adam", "_power", "optimizer", "/slot", "global_step", "textmill"))
