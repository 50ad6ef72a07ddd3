"""The one place a model version is loaded from its folder (weights + tokenizer), for every engine that runs
transformers models. The device is resolved here; the precision is chosen by `serving.precision`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["check_config_matches_weights", "load_model", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(path: Path | str, device: str = "auto", dtype: str = "auto", *,
               tolerance: float = 0.01, lean: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, precision report) from an export folder: `AutoModelForCausalLM` in eval mode on `device`, in
    the precision `serving.precision` chooses for `dtype` (auto | float32 | bfloat16 | float16 | int8: on CPU a
    reduced precision is kept only when its loss on the version's validation sample is within `tolerance` of fp32's),
    `AutoTokenizer`'s fast tokenizer (a `transformers.PreTrainedTokenizerFast`; its `.backend_tokenizer` is the Rust
    tokenizer the engines share across threads), and the `serving.precision.PrecisionReport` of that choice.
    A GPT-2 model in a reduced precision on CPU comes wrapped in `serving.gpt2_runtime.GPT2Runtime` (the lean
    serving forward pass, same call signature as transformers' for what the engines use) unless `lean=False`;
    float32 stays transformers' own forward, the reference that greedy output is tested against.
    Raises whatever transformers raises for a bad folder, ValueError for a model whose fp32 loss is not finite."""
    from transformers import AutoTokenizer

    from textmill.serving import gpt2_runtime, precision

    check_config_matches_weights(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, report = precision.load_model(Path(path), dtype, resolve_device(device), tokenizer.backend_tokenizer,
                                         tolerance=tolerance)
    return (gpt2_runtime.for_serving(model, report.chosen) if lean else model), tokenizer, report


def check_config_matches_weights(path: Path | str) -> None:
    """Raise ValueError when `config.json` describes a model with more parameters than the folder's safetensors weights
    hold (counted from the files' headers; the model is built on the meta device, nothing
    allocated). transformers fills parameters missing from the weights with random values: a config.json edited to
    400 layers of 4096 made a serving node allocate tens of GB before anything failed, a smaller edit served a model
    with random layers. More stored values than described (persisted buffers of older exports) are left to
    transformers, as are folders without safetensors files."""
    import math

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return
    stored = 0
    for f in files:
        with safe_open(str(f), "pt") as weights:
            stored += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    described = sum(p.numel() for p in skeleton.parameters())
    if described > stored:
        raise ValueError(f"{path}: config.json describes a model of {described:,} parameters, but its weights hold "
                         f"{stored:,}; the config does not belong to these weights (not loaded)")
