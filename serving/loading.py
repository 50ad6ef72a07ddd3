"""The one place a model version is loaded from its folder (weights + tokenizer), for every engine that runs
transformers models. Precision choices (device, dtype) are resolved here too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load_model", "resolve_device", "resolve_dtype"]


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> fp32 on CPU, bf16 (or fp16 where bf16 is unsupported) on CUDA; else the named dtype."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_model(path: Path | str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from an export folder: `AutoModelForCausalLM` in eval mode on `device` with `dtype`, and
    `AutoTokenizer`'s fast tokenizer (a `transformers.PreTrainedTokenizerFast`; its `.backend_tokenizer` is the Rust
    tokenizer the engines share across threads). Raises whatever transformers raises for a bad folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
