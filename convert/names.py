"""OpenAI GPT-2 variable names -> Hugging Face GPT2LMHeadModel keys, as data (a table), with the shape checks on both sides.

HF's GPT-2 uses `Conv1D` layers that store `[nx, nf]` exactly like OpenAI's `[1, nx, nf]` minus the leading unit axis, so no
weight is ever transposed: the only reshape is dropping that axis on the four conv weights. `lm_head.weight` is tied to
`transformer.wte.weight` and is stored once (under the wte key), as `save_pretrained` does.
"""

from __future__ import annotations

import re

from textmill.sizes import Hparams
from textmill.weights import openai_shapes

# Top-level variables: OpenAI name -> HF key.
TOP_LEVEL: dict[str, str] = {
    "model/wte": "transformer.wte.weight",
    "model/wpe": "transformer.wpe.weight",
    "model/ln_f/g": "transformer.ln_f.weight",
    "model/ln_f/b": "transformer.ln_f.bias",
}

# Per-block variables: suffix after `model/h{i}/` -> suffix after `transformer.h.{i}.`.
PER_BLOCK: dict[str, str] = {
    "ln_1/g": "ln_1.weight",
    "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight",
    "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight",
    "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight",
    "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight",
    "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight",
    "mlp/c_proj/b": "mlp.c_proj.bias",
}

# The only reshape: OpenAI's conv weights carry a leading unit axis [1, nx, nf]; HF's Conv1D stores [nx, nf].
DROP_LEADING_AXIS: frozenset[str] = frozenset({"attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w"})

# Keys GPT2LMHeadModel has that a checkpoint does not store (tied to transformer.wte.weight).
TIED: dict[str, str] = {"lm_head.weight": "transformer.wte.weight"}

_BLOCK = re.compile(r"^model/h(\d+)/(.+)$")


def hf_key(name: str) -> tuple[str, bool]:
    """(HF key, whether to drop the leading axis) for an OpenAI model variable; KeyError for a name not in the table."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name], False
    m = _BLOCK.match(name)
    if m and m.group(2) in PER_BLOCK:
        return f"transformer.h.{m.group(1)}.{PER_BLOCK[m.group(2)]}", m.group(2) in DROP_LEADING_AXIS
    raise KeyError(name)


def hf_shapes(hp: Hparams) -> dict[str, tuple[int, ...]]:
    """Every key the converted safetensors file holds, with its shape (derived from the OpenAI table, not restated)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in openai_shapes(hp).items():
        key, drop = hf_key(name)
        out[key] = shape[1:] if drop else shape
    return out


def expected_key_count(hp: Hparams) -> int:
    """4 top-level tensors + 12 per block; the count the converter asserts before writing."""
    return len(TOP_LEVEL) + len(PER_BLOCK) * hp.n_layer
