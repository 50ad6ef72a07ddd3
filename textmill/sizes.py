"""GPT-2 size table: one place mapping names <-> OpenAI hparams.json <-> transformers.GPT2Config. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

GPT2_VOCAB = 50257
GPT2_EOT_ID = 50256


@dataclass(frozen=True)
class Hparams:
    """OpenAI's hparams.json fields (names kept exactly: n_vocab, n_ctx, n_embd, n_head, n_layer)."""

    n_vocab: int = GPT2_VOCAB
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    def __post_init__(self) -> None:
        for key in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"hparams.{key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"hparams.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def n_params(self) -> int:
        """Parameter count with tied embeddings (what OpenAI's names like 355M refer to, roughly)."""
        e, l, v, c = self.n_embd, self.n_layer, self.n_vocab, self.n_ctx
        per_block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
        return v * e + c * e + l * per_block + 2 * e

    def to_json(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Hparams":
        unknown = set(d) - {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
        if unknown:
            raise ValueError(f"hparams.json has unknown keys {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in d.items()})


# name -> hparams. `tiny` is for CPU demos and tests; its n_vocab is a placeholder, replaced by the trained tokenizer's size.
SIZES: dict[str, Hparams] = {
    "tiny": Hparams(n_vocab=4096, n_ctx=128, n_embd=64, n_head=2, n_layer=2),
    "124M": Hparams(n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "355M": Hparams(n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": Hparams(n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": Hparams(n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}
ALIASES = {"gpt2": "124M", "gpt2-124M": "124M", "gpt2-medium": "355M", "gpt2-355M": "355M",
           "gpt2-large": "774M", "gpt2-774M": "774M", "gpt2-xl": "1558M", "gpt2-1558M": "1558M"}


def from_name(name: str, **overrides: int) -> Hparams:
    """Hparams for a size name (`tiny`, `124M`, `355M`, `gpt2-medium`, ...), with field overrides."""
    key = ALIASES.get(name, name)
    if key not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES) + sorted(ALIASES)}")
    return replace(SIZES[key], **{k: int(v) for k, v in overrides.items() if v is not None})


def to_hf_config_kwargs(hp: Hparams, *, eot_id: int) -> dict[str, Any]:
    """kwargs for transformers.GPT2Config matching OpenAI's math (tanh GELU, LN eps 1e-5, tied embeddings)."""
    return dict(
        vocab_size=hp.n_vocab, n_positions=hp.n_ctx, n_embd=hp.n_embd, n_layer=hp.n_layer, n_head=hp.n_head,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=eot_id, eos_token_id=eot_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def from_hf_config(cfg: Any) -> Hparams:
    """Hparams from a transformers GPT2Config (or its dict)."""
    get = (lambda k: cfg[k]) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    return Hparams(n_vocab=get("vocab_size"), n_ctx=get("n_positions"), n_embd=get("n_embd"),
                   n_head=get("n_head"), n_layer=get("n_layer"))
