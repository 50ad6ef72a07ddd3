"""`textmill convert SRC DST`: detect the source's kind and dispatch to its converter; print a one-screen summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from textmill.errors import UserError

# Source kind -> converter(src_path, dst, args) -> provenance dict. A PyTorch training run (training/pt: safetensors +
# optimizer state, textmill_state.json says backend pt) has its own converter; every TF layout shares one.
Converter = Callable[[Path, Path, argparse.Namespace], dict[str, Any]]


def _convert_tf(src_path: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from textmill.convert.sources import resolve
    from textmill.convert.tf_to_hf import convert

    src = resolve(src_path, args.step)
    return convert(src, dst, dtype=args.dtype, verify=args.verify, tokens_dir=args.tokens,
                   hash_source=args.hash_source)


def _convert_torch_run(src_path: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from textmill.convert.pt_to_hf import convert_cli

    return convert_cli(src_path, dst, args)


CONVERTERS: dict[str, Converter] = {"tf": _convert_tf, "torch": _convert_torch_run}


def source_kind(path: Path) -> str:
    """`torch` for a PyTorch run (its textmill_state.json says backend pt), else `tf` (its layout is resolved later)."""
    from textmill.convert.pt_to_hf import is_torch_run

    return "torch" if is_torch_run(path) else "tf"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="textmill convert", description="Convert a TF GPT-2 checkpoint (OpenAI release, "
                                "gpt-2-simple run, textmill run or checkpoint prefix) or a textmill PyTorch run "
                                "(training.backend=pt) into a Hugging Face folder.")
    p.add_argument("src", type=Path, help="OpenAI release folder, gpt-2-simple run folder (checkpoint/run1), "
                   "textmill run (models/runs/<model>, TF or PyTorch) or a checkpoint prefix (.../model-1200)")
    p.add_argument("dst", type=Path, help="output folder (must not exist)")
    p.add_argument("--step", default=None, help="N, best (textmill runs: best validation loss) or latest (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the stored weights (default float32)")
    p.add_argument("--verify", action="store_true",
                   help="compare TF and transformers logits/greedy text and both tokenizers; fail on any difference")
    p.add_argument("--tokens", type=Path, default=None,
                   help="token dataset folder (data/tokens/<model>): the head of val.bin is written to the export as "
                        "val_sample.json (serving checks int8/bf16 quality on it); --verify also checks the tokenizer "
                        "on it")
    p.add_argument("--hash-source", action="store_true",
                   help="also sha256 the checkpoint's .data files for provenance (default: the .index, whose per-tensor "
                        "CRC32C TF verifies on every read)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    record = CONVERTERS[source_kind(args.src)](args.src, args.dst, args)
    summary = {"dst": str(args.dst), "layout": record["source"]["layout"], "step": record["source"]["step"],
               "dtype": record["dtype"], "skipped_variables": len(record["skipped_variables"]),
               "skipped_examples": record["skipped_variables"][:5]}
    if "verify" in record:
        models = record["verify"]["models"]
        summary["verify"] = {"logits_max_abs_diff": models["logits_max_abs_diff"],
                             "greedy_match": models["greedy_match"],
                             "tokenizer_sample_tokens": record["verify"]["tokenizer"]["sample_tokens"]}
    print(json.dumps(summary, indent=2))
    return 0
