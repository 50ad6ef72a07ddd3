"""LoRA for the PyTorch backend through `peft`: rank-r adapters on every attention projection, merged at export.

With `training.lora_rank: r` the base weights are frozen and only the adapters of `attn.c_attn` and `attn.c_proj` train
(Hu et al. 2021, "LoRA"; GPT-2's Conv1D layers store [in, out], hence peft's `fan_in_fan_out`). The optimizer then holds
moments for the adapters only, which is what lets GPT-2 large (774M) fine-tune inside 16 GB (training.pt.memory).
A checkpoint's safetensors file holds the wrapped model's keys plus `lora_rank` / `lora_alpha` in its metadata;
`merged_state` folds the adapters back into plain GPT2LMHeadModel weights (`textmill convert`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from textmill.config import TrainingConfig
from textmill.errors import UserError

TARGETS = r".*\.attn\.(c_attn|c_proj)"


def _config(rank: int, alpha: float):
    try:
        from peft import LoraConfig
    except ModuleNotFoundError:
        raise UserError("config key training.lora_rank needs the `peft` package: pip install 'textmill[torch]'") from None
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True,
                      bias="none")


def wrap(model, tc: TrainingConfig):
    """The model with trainable LoRA adapters on attention and every other weight frozen (a peft PeftModel)."""
    from peft import get_peft_model

    return get_peft_model(model, _config(tc.lora_rank, tc.lora_alpha))


def metadata(tc: TrainingConfig) -> dict[str, str]:
    """What `merged_state` needs to rebuild the adapters, stored in the checkpoint's safetensors header."""
    return {"lora_rank": str(tc.lora_rank), "lora_alpha": str(tc.lora_alpha)}


def merged_state(weights_file: Path, hp, eot: int) -> dict[str, torch.Tensor]:
    """Plain GPT2LMHeadModel weights (no lm_head: it is tied) with the checkpoint's adapters merged in."""
    from peft import get_peft_model
    from safetensors import safe_open
    from safetensors.torch import load_file

    from textmill.training.pt.trainer import build_model

    with safe_open(str(weights_file), "pt") as f:
        meta = f.metadata() or {}
    if "lora_rank" not in meta:
        raise UserError(f"{weights_file}: holds LoRA adapters but no lora_rank in its metadata; re-save the checkpoint")
    model = get_peft_model(build_model(hp, eot, torch.device("cpu")),
                           _config(int(meta["lora_rank"]), float(meta["lora_alpha"])))
    missing = model.load_state_dict(load_file(str(weights_file)), strict=False).missing_keys
    if [k for k in missing if not k.endswith("lm_head.weight")]:
        raise UserError(f"{weights_file}: LoRA checkpoint lacks {missing[:3]}; it belongs to another model shape")
    merged = model.merge_and_unload()
    return {k: v.detach().contiguous() for k, v in merged.state_dict().items() if k != "lm_head.weight"}
