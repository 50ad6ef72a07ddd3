"""Parity check of a converted folder: TF model vs transformers on the same ids (logits + greedy text), and tokenizers.

The TF side is textmill's own TF GPT-2 (`training.tf.model`) loaded from the source checkpoint; the torch side is the
converted folder loaded exactly as users load it (`from_pretrained`). Any failure is a UserError, which makes the
conversion leave nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tokenizers import Tokenizer

from textmill.convert.sources import Source
from textmill import tokenizer as textmill_tok
from textmill.errors import UserError
from textmill.sizes import Hparams

# Max |logit diff| allowed per stored dtype. float32 is exact up to summation order; half precision rounds every weight
# (relative error ~5e-4 for float16, ~4e-3 for bfloat16), which moves logits of a trained model by up to ~0.1.
LOGIT_TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2.5e-1}
GREEDY_TOKENS = 20
PROMPT_TOKENS = 8
SAMPLE_TOKENS = 2000  # how much of val.bin the tokenizer check decodes and re-encodes
BUILTIN_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. 1234567890 — “quotes”, naïve café, Straße.\n"
    "Le système d'exploitation est libre. Das Paket enthält Werkzeuge für die Übersetzung.\n"
    "Пакет содержит утилиты.  日本語のテキストです。 中文文本。 😀 emoji\tand tabs,   runs of spaces\n\n"
    "<|endoftext|>A new document starts after the separator."
)


def fixed_ids(hp: Hparams, eot: int) -> np.ndarray:
    """Two rows of deterministic ids spanning the vocabulary (with EOT), short enough to leave room for greedy decoding."""
    length = max(2, min(64, hp.n_ctx - GREEDY_TOKENS))
    ids = np.random.default_rng(1234).integers(0, hp.n_vocab, size=(2, length), dtype=np.int64)
    ids[1, length // 2] = eot
    return ids


def greedy(next_logits: Callable[[list[int]], np.ndarray], prompt: np.ndarray, steps: int) -> tuple[list[int], list]:
    """Plain argmax continuation (no logits processors: `generate(min_new_tokens=...)` would forbid EOT) and the logits
    seen at each step, so a divergence can be told apart from an exact tie."""
    ids, seen = [int(i) for i in prompt], []
    for _ in range(steps):
        logits = next_logits(ids)
        seen.append(logits)
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt):], seen


def greedy_divergence(tf_ids: list[int], pt_ids: list[int], tf_steps: list, tol: float) -> dict[str, Any] | None:
    """None if both continuations agree, or first differ where TF's two candidates tie within `tol` (both are argmax
    up to summation order); else where and by how much they differ."""
    for k, (a, b) in enumerate(zip(tf_ids, pt_ids)):
        if a != b:
            gap = float(tf_steps[k][a] - tf_steps[k][b])
            return None if gap <= tol else {"step": k, "tf": a, "hf": b, "tf_logit_gap": gap}
    return None


def compare_models(src: Source, hf_dir: Path, hp: Hparams, eot: int, dtype: str) -> dict[str, Any]:
    import tensorflow as tf
    from transformers import AutoModelForCausalLM

    from textmill.training.tf.model import load as load_tf

    tf_model = load_tf(src.prefix, hp)
    pt_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = fixed_ids(hp, eot)
    tf_logits = tf_model(tf.constant(ids, tf.int32)).numpy()
    with torch.inference_mode():
        pt_logits = pt_model(torch.from_numpy(ids)).logits.float().numpy()
        pt_ids, _ = greedy(lambda x: pt_model(torch.tensor([x])).logits[0, -1].float().numpy(),
                           ids[0, :PROMPT_TOKENS], GREEDY_TOKENS)
    tf_ids, tf_steps = greedy(lambda x: tf_model(tf.constant([x], tf.int32))[0, -1].numpy(),
                              ids[0, :PROMPT_TOKENS], GREEDY_TOKENS)
    diff = float(np.max(np.abs(tf_logits - pt_logits)))
    divergence = greedy_divergence(tf_ids, pt_ids, tf_steps, LOGIT_TOLERANCE[dtype])
    result = {"logits_max_abs_diff": diff, "logit_tolerance": LOGIT_TOLERANCE[dtype], "ids_shape": list(ids.shape),
              "greedy_tokens": GREEDY_TOKENS, "greedy_tf": tf_ids, "greedy_hf": pt_ids,
              "greedy_match": tf_ids == pt_ids, "greedy_divergence": divergence}
    if diff > LOGIT_TOLERANCE[dtype]:
        raise UserError(f"{hf_dir}: verify failed: max |logit diff| TF vs transformers = {diff:.3g} > "
                        f"{LOGIT_TOLERANCE[dtype]:g} ({dtype}); the conversion is wrong, please report it")
    if dtype == "float32" and divergence is not None:
        raise UserError(f"{hf_dir}: verify failed: greedy continuation differs at token {divergence['step']} "
                        f"(TF {tf_ids[:divergence['step'] + 1]} vs transformers {pt_ids[:divergence['step'] + 1]})")
    return result


def sample_text(tok: Tokenizer, tokens_dir: str | Path | None) -> tuple[str, str]:
    """(text, where it came from): decoded val.bin head with --tokens, else the built-in multilingual sample."""
    if tokens_dir is None:
        return BUILTIN_SAMPLE, "builtin"
    from textmill.convert.val_sample import checked_val_ids

    ids = checked_val_ids(tok, tokens_dir, SAMPLE_TOKENS)
    return tok.decode(ids, skip_special_tokens=False), f"{tokens_dir}/val.bin[:{len(ids)}]"


def compare_tokenizers(hf_dir: Path, tok: Tokenizer, tokens_dir: str | Path | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text, origin = sample_text(tok, tokens_dir)
    want = tok.encode(text).ids
    got = hf_tok(text, verbose=False)["input_ids"]
    eot = textmill_tok.eot_id(tok)
    eot_ids = hf_tok(textmill_tok.EOT)["input_ids"]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise UserError(f"{hf_dir}: verify failed: the exported tokenizer encodes the sample ({origin}) differently "
                        f"from encoder.json/vocab.bpe, first at token {first}")
    if eot_ids != [eot] or hf_tok.eos_token_id != eot:
        raise UserError(f"{hf_dir}: verify failed: {textmill_tok.EOT} encodes to {eot_ids} (eos id {hf_tok.eos_token_id}), "
                        f"expected one id {eot}")
    if hf_tok.decode(got) != text:
        raise UserError(f"{hf_dir}: verify failed: the exported tokenizer does not decode the sample back to itself")
    return {"sample": origin, "sample_tokens": len(got), "eot_id": eot, "match": True}


def verify(src: Source, hf_dir: Path, hp: Hparams, tok: Tokenizer, *, dtype: str,
           tokens_dir: str | Path | None = None) -> dict[str, Any]:
    """Numbers recorded in textmill.json under `verify`; raises UserError when any check fails."""
    tokenizer = compare_tokenizers(hf_dir, tok, tokens_dir)  # first: cheap, and a wrong --tokens fails fast
    return {"dtype": dtype, "models": compare_models(src, hf_dir, hp, textmill_tok.eot_id(tok), dtype),
            "tokenizer": tokenizer}
