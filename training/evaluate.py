"""`textmill evaluate <model>`: validation loss/perplexity of the exported HF folder, checked against the TF trainer's.

Only transformers + torch (no TensorFlow): this is what a serving node would run, so agreeing with the trainer's number
within `evaluate.loss_tolerance` proves the exported folder is the model that was trained. The loss follows the one
validation protocol in `training.data` (mean token cross-entropy over non-overlapping windows of the whole val split).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from textmill import config as textmill_config
from textmill.errors import UserError
from textmill.registry import export_identity
from textmill.storage import read_json, write_json_atomic, write_text_atomic
from textmill.training import data

log = logging.getLogger(__name__)


def load_export(export_dir: Path):
    """(model in float32 eval mode, tokenizer, textmill.json) from a `textmill convert` folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (export_dir / "config.json").is_file():
        raise UserError(f"{export_dir}: no exported model here; run `textmill convert` (dvc repro -s convert) first")
    provenance_path = export_dir / "textmill.json"
    provenance = read_json(provenance_path, default={}, fix="re-run `textmill convert`")
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(export_dir), provenance


def token_losses(model, batches: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 total: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per-token cross-entropy [B, T] (float32) for each (x, y, w) batch, paired with its weights."""
    with torch.inference_mode():
        for x, y, w in tqdm(batches, total=total, desc="evaluate", unit="batch", disable=None):
            logits = model(torch.from_numpy(x).long()).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).long().flatten(), reduction="none")
            yield ce.view(x.shape).numpy(), w


def val_loss(model, tokens: np.ndarray, n_ctx: int, batch_size: int) -> float:
    """The protocol's mean token cross-entropy over the whole val split."""
    windows = math.ceil(data.eval_token_count(tokens) / n_ctx)
    return data.mean_loss(token_losses(model, data.eval_batches(tokens, n_ctx, batch_size),
                                       total=math.ceil(windows / batch_size)))


def train_report(path: Path) -> dict[str, Any]:
    """reports/train/<m>.json written by the trainer ({} when absent, e.g. a model converted from an OpenAI release)."""
    return read_json(path, default={}, fix="re-run `textmill train`")


def trainer_val_loss(report: dict[str, Any], provenance: dict[str, Any], step: int | None) -> tuple[float | None, str]:
    """The TF trainer's val loss at the exported step: the train report first, else the copy in textmill.json."""
    by_step = report.get("val_loss_by_step") or {}
    if step is not None and str(step) in by_step:
        return float(by_step[str(step)]), f"reports/train val_loss_by_step[{step}]"
    if provenance.get("val_loss") is not None:
        return float(provenance["val_loss"]), "textmill.json val_loss"
    return None, ""


def eval_n_ctx(cfg: textmill_config.Config, report: dict[str, Any], model) -> int:
    """The trainer's validation window (its report says which), else training.n_ctx, else the model's context."""
    return int(report.get("n_ctx") or cfg.training.n_ctx or model.config.n_positions)


def write_samples(model, tok, cfg: textmill_config.EvaluateConfig, path: Path, header: str) -> list[dict[str, Any]]:
    """A few fixed-seed samples per prompt, so a reviewer can read what the model writes; same seed, same text."""
    from transformers import set_seed

    samples, lines = [], [header, ""]
    for prompt in cfg.prompts:
        lines += [f"## Prompt: {prompt!r}", ""]
        ids = torch.tensor([tok(prompt)["input_ids"]])
        # A sample never runs past the position table (a tiny model's n_ctx can be smaller than sample_tokens).
        room = int(model.config.n_positions) - ids.shape[1]
        if room <= 0:
            raise UserError(f"config key evaluate.prompts: {prompt!r} is {ids.shape[1]} tokens, the model's context is "
                            f"{model.config.n_positions}; shorten the prompt")
        for i in range(cfg.samples):
            set_seed(cfg.seed + i)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=cfg.top_k,
                                     max_new_tokens=min(cfg.sample_tokens, room), pad_token_id=tok.eos_token_id)
            text = tok.decode(out[0], skip_special_tokens=False)
            samples.append({"prompt": prompt, "seed": cfg.seed + i, "text": text})
            lines += [f"Sample {i + 1} (seed {cfg.seed + i}):", "", "````text", text, "````", ""]
    write_text_atomic(path, "\n".join(lines))
    return samples


def evaluate(cfg: textmill_config.Config, name: str, *, compare: bool = True) -> dict[str, Any]:
    """Compute, check and write reports/eval/<name>.json and -samples.md; returns the report.

    The report's `export` field is the scored folder's `registry.export_identity` ({content_hash, files: {path:
    sha256}}), hashed before the model is scored; `textmill publish` refuses the report for any other content."""
    cfg.model_spec(name)
    export_dir, tokens_dir = Path(cfg.paths.export) / name, Path(cfg.paths.tokens) / name
    reports = Path(cfg.paths.reports)
    model, tok, provenance = load_export(export_dir)
    # Hashed before scoring: the report names the exact bytes it judged, and `publish` refuses any other folder.
    identity = export_identity(export_dir)
    tokens = data.open_tokens(tokens_dir, "val")
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        raise UserError(f"{tokens_dir}/val.bin: id {int(tokens.max())} is outside the model's vocabulary "
                        f"({model.config.vocab_size}); re-run `textmill prepare {name}` with this model's tokenizer")
    report_path = reports / "train" / f"{name}.json"
    train = train_report(report_path)
    n_ctx = eval_n_ctx(cfg, train, model)
    loss = val_loss(model, tokens, n_ctx, cfg.evaluate.batch_size)
    step = provenance.get("step", (provenance.get("source") or {}).get("step"))
    reference, origin = trainer_val_loss(train, provenance, step)
    diff = None if reference is None else abs(loss - reference)
    report = {"model": name, "step": step, "val_loss": loss, "perplexity": math.exp(loss),
              "tokens": data.eval_token_count(tokens), "n_ctx": n_ctx, "train_val_loss": reference,
              "train_val_loss_from": origin or None, "abs_diff": diff, "loss_tolerance": cfg.evaluate.loss_tolerance,
              "export": identity}
    if compare and reference is None:
        raise UserError(f"{report_path}: no trainer val loss for step {step} (nor in "
                        f"{export_dir}/textmill.json) to compare with; pass --no-compare to evaluate anyway")
    if compare and diff > cfg.evaluate.loss_tolerance:
        raise UserError(f"{export_dir}: val loss {loss:.6f} differs from the trainer's {reference:.6f} ({origin}) by "
                        f"{diff:.2e} > evaluate.loss_tolerance={cfg.evaluate.loss_tolerance}; the export does not "
                        f"match the trained checkpoint (re-run `textmill convert ... --verify`)")
    header = f"# Samples: {name} (step {step}, val loss {loss:.4f}, perplexity {math.exp(loss):.2f})"
    report["samples"] = len(write_samples(model, tok, cfg.evaluate, reports / "eval" / f"{name}-samples.md", header))
    write_json_atomic(reports / "eval" / f"{name}.json", report)
    return report


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="textmill evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="model name (a key of `models:` in the config)")
    textmill_config.add_cli_arguments(p, "evaluate.batch_size=16")
    p.add_argument("--no-compare", action="store_true", help="do not require the trainer's val loss to match")
    args = p.parse_args(argv)
    report = evaluate(textmill_config.from_args(args), args.model, compare=not args.no_compare)
    print(json.dumps({k: report[k] for k in ("model", "step", "val_loss", "perplexity", "abs_diff", "tokens")}))
    return 0
