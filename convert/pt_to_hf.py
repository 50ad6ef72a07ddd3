"""A PyTorch training run (`training.backend=pt`) -> the same export folder as a TF run: safetensors, tokenizer,
config, textmill.json. No TensorFlow.

A torch run folder holds `model-<step>.safetensors` (GPT2LMHeadModel keys, the tied lm_head stored once), `model-<step>.pt`
(optimizer state, not exported), `hparams.json`, `encoder.json`, `vocab.bpe` and `textmill_state.json` (`"backend": "pt"`).
LoRA runs store the wrapped model; the adapters are merged into the weights here (`training.pt.lora.merged_state`).
`--verify` loads the written folder with `from_pretrained` and compares its logits and greedy text with the run's
checkpoint loaded into the trainer's own model, and checks the tokenizer as for TF sources.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textmill.convert import tf_to_hf, verify as verify_mod
from textmill.convert.sources import Source
from textmill import tokenizer as textmill_tok
from textmill.errors import UserError
from textmill.storage import atomic_path, read_json
from textmill.training import openai_layout, run

WEIGHTS_SUFFIX = ".safetensors"


def is_torch_run(path: Path) -> bool:
    """A folder whose textmill_state.json says backend pt, or a `model-N.safetensors` prefix/file of one."""
    folder = path if path.is_dir() else path.parent
    state = read_json(folder / run.STATE_FILE, default={}, fix="re-run `textmill train`") \
        if (folder / run.STATE_FILE).is_file() else {}
    return state.get("backend") == "pt"


def resolve(path: Path, step: str | None) -> Source:
    """The run folder + --step (latest | best | N) -> a Source whose prefix names `model-<step>` of a torch run."""
    folder = path if path.is_dir() else path.parent
    state = read_json(folder / run.STATE_FILE, fix="re-run `textmill train`")
    if not path.is_dir():
        name = path.name[: -len(WEIGHTS_SUFFIX)] if path.name.endswith(WEIGHTS_SUFFIX) else path.name
        chosen = openai_layout.step_of(Path(name))
    elif step in (None, "latest"):
        chosen = state.get("step")
    elif step == "best":
        chosen = state.get("best_step")
        if chosen is None:
            raise UserError(f"{folder / run.STATE_FILE}: has no best_step yet (no validation pass ran); pass --step latest")
    elif step.isdigit():
        chosen = int(step)
    else:
        raise UserError(f"--step {step!r}: expected a step number, `best` or `latest`")
    prefix = folder / f"model-{chosen}"
    if not Path(f"{prefix}{WEIGHTS_SUFFIX}").is_file():
        have = sorted(int(p.name[6:-len(WEIGHTS_SUFFIX)]) for p in folder.glob(f"model-*{WEIGHTS_SUFFIX}"))
        raise UserError(f"{folder}: no checkpoint for step {chosen}; available steps: {have or 'none'}")
    for name in openai_layout.META_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing from the run folder; copy it from models/base/<model>/")
    return Source(path=path, layout="textmill-pt", prefix=prefix, step=chosen, meta_dir=folder, state=state)


def checkpoint_weights(src: Source, hp, eot: int) -> dict[str, torch.Tensor]:
    """The run's weights at the chosen step, LoRA adapters merged, HF keys without the tied lm_head."""
    from safetensors.torch import load_file

    path = Path(f"{src.prefix}{WEIGHTS_SUFFIX}")
    weights = load_file(str(path))
    if any(".lora_" in k for k in weights):
        from textmill.training.pt.lora import merged_state

        weights = merged_state(path, hp, eot)
    return weights


def reference_model(src: Source, hp, weights: dict[str, torch.Tensor], eot: int):
    from textmill.training.pt.trainer import build_model, load_weights

    model = build_model(hp, eot, torch.device("cpu"))
    load_weights(model, weights, Path(f"{src.prefix}{WEIGHTS_SUFFIX}"))
    return model.eval()


def compare_models(model, hf_dir: Path, hp, eot: int, dtype: str) -> dict[str, Any]:
    """Logits and greedy text of the exported folder (from_pretrained) vs the run's checkpoint in the trainer's model."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = verify_mod.fixed_ids(hp, eot)
    prompt = ids[0, :verify_mod.PROMPT_TOKENS]
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).logits.float().numpy()
        got = exported(torch.from_numpy(ids)).logits.float().numpy()
        ref_ids, ref_steps = verify_mod.greedy(lambda x: model(torch.tensor([x])).logits[0, -1].double().numpy(),
                                               prompt, verify_mod.GREEDY_TOKENS)
        out_ids, _ = verify_mod.greedy(lambda x: exported(torch.tensor([x])).logits[0, -1].double().numpy(),
                                       prompt, verify_mod.GREEDY_TOKENS)
    diff = float(np.max(np.abs(want - got)))
    tol = verify_mod.LOGIT_TOLERANCE[dtype]
    if diff > tol:
        raise UserError(f"{hf_dir}: verify failed: max |logit diff| run checkpoint vs export = {diff:.3g} > {tol:g}")
    divergence = verify_mod.greedy_divergence(ref_ids, out_ids, ref_steps, tol)
    if dtype == "float32" and divergence is not None:
        raise UserError(f"{hf_dir}: verify failed: greedy continuation differs at token {divergence['step']}")
    return {"logits_max_abs_diff": diff, "logit_tolerance": tol, "greedy_match": ref_ids == out_ids,
            "greedy_divergence": divergence}


def convert(src: Source, dst: Path, *, dtype: str = "float32", verify: bool = False,
            tokens_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the export folder `dst` (must not exist) from a torch run; returns the provenance in textmill.json."""
    from safetensors.torch import save_file

    if dst.exists():
        raise UserError(f"{dst}: already exists; remove it or choose another destination (nothing was written)")
    hp = src.hparams()
    tok = tf_to_hf.load_tokenizer(src, hp)
    eot = textmill_tok.eot_id(tok)
    weights = checkpoint_weights(src, hp, eot)
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        tf_to_hf.write_configs(hp, eot, tmp, dtype)
        textmill_tok.save_hf(tok, tmp, model_max_length=hp.n_ctx)
        stored = {k: v.to(tf_to_hf.DTYPES[dtype]).contiguous() for k, v in sorted(weights.items())}
        save_file(stored, str(tmp / tf_to_hf.WEIGHTS_FILE), metadata={"format": "pt"})
        written = tf_to_hf.hash_files(list(tmp.iterdir()))
        source = tf_to_hf.hash_files([Path(f"{src.prefix}{WEIGHTS_SUFFIX}"), src.encoder_path, src.vocab_path])
        record = tf_to_hf.provenance(src, hp, textmill_tok.checksum(tok), dtype, [], source, written)
        record["source"]["backend"] = "pt"
        if verify:
            model = reference_model(src, hp, weights, eot)
            record["verify"] = {"dtype": dtype, "models": compare_models(model, tmp, hp, eot, dtype),
                                "tokenizer": verify_mod.compare_tokenizers(tmp, tok, tokens_dir)}
        (tmp / tf_to_hf.PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                                    encoding="utf-8")
    return record


def convert_cli(src_path: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`textmill convert` for a torch run (the CLI's dispatch entry)."""
    return convert(resolve(src_path, args.step), dst, dtype=args.dtype, verify=args.verify, tokens_dir=args.tokens)
