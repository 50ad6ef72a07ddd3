"""TF trainer throughput (tokens/s per optimizer step) on CPU, with and without gradient checkpointing, side by side.

    .venv/bin/python bench/train_bench.py [--steps 3] [--tiny-steps 20] [--sizes tiny,124M]

Random weights, random tokens; the first step (tracing + compilation) is not timed. A second part measures what
checkpointing is for: peak process memory (CPU RSS) of a 12-layer model with and without it, each in its own process.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from textmill import sizes, weights  # noqa: E402
from textmill.config import TrainingConfig  # noqa: E402
from training.tf.trainer import Trainer  # noqa: E402

# size -> (n_ctx, batch_size): 124M at a short context so a CPU step takes seconds, not minutes.
CASES = {"tiny": (128, 8), "124M": (128, 2)}


def measure(size: str, grad_checkpointing: bool, steps: int) -> dict:
    n_ctx, batch = CASES[size]
    hp = sizes.from_name(size)
    tc = TrainingConfig(steps=steps + 1, batch_size=batch, grad_checkpointing=grad_checkpointing, warmup_steps=0)
    trainer = Trainer(hp, tc, n_ctx, tf.distribute.get_strategy())
    trainer.model.assign(dict(weights.init_numpy(hp, 0)))
    rng = np.random.default_rng(0)
    x = rng.integers(0, hp.n_vocab, (1, batch, n_ctx)).astype(np.int32)
    trainer.train_step(x, x)  # trace + compile
    t0 = time.perf_counter()
    for _ in range(steps):
        out = trainer.train_step(x, x)
    dt = time.perf_counter() - t0
    return {"size": size, "n_ctx": n_ctx, "batch_size": batch, "grad_checkpointing": grad_checkpointing,
            "params": hp.n_params, "steps": steps, "s_per_step": dt / steps,
            "tokens_per_s": batch * n_ctx * steps / dt, "loss": out["loss"]}


def high_water_mark() -> int:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across fork + exec)."""
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_rss(grad_checkpointing: bool) -> dict:
    """Peak process memory of two train steps of a 12-layer, 256-wide model at n_ctx 512, batch 8 (own process each)."""
    hp = sizes.Hparams(n_vocab=512, n_ctx=512, n_embd=256, n_head=4, n_layer=12)
    tc = TrainingConfig(batch_size=8, grad_checkpointing=grad_checkpointing)
    trainer = Trainer(hp, tc, 512, tf.distribute.get_strategy())
    x = np.random.default_rng(0).integers(0, hp.n_vocab, (1, 8, 512)).astype(np.int32)
    before = high_water_mark()
    trainer.train_step(x, x)
    trainer.train_step(x, x)
    peak = high_water_mark()
    return {"grad_checkpointing": grad_checkpointing, "peak_rss_bytes": peak, "training_rss_bytes": peak - before}


def memory_cases() -> dict:
    out = {}
    for flag in (False, True):
        done = subprocess.run([sys.executable, __file__, "--child-memory", str(int(flag))], capture_output=True,
                              text=True, check=True)
        out["grad_checkpointing" if flag else "baseline"] = json.loads(done.stdout.strip().splitlines()[-1])
    out["memory_ratio"] = out["grad_checkpointing"]["training_rss_bytes"] / out["baseline"]["training_rss_bytes"]
    out["shape"] = "n_layer 12, n_embd 256, n_ctx 512, batch 8"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--sizes", default="tiny,124M")
    p.add_argument("--child-memory", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory is not None:
        print(json.dumps(peak_rss(bool(args.child_memory))))
        return
    results = []
    for size in args.sizes.split(","):
        steps = args.tiny_steps if size == "tiny" else args.steps
        base, ckpt = measure(size, False, steps), measure(size, True, steps)
        results.append({"size": size, "baseline": base, "grad_checkpointing": ckpt,
                        "checkpointing_speed_ratio": ckpt["tokens_per_s"] / base["tokens_per_s"]})
    print(json.dumps({"bench": "train_tf", "machine": platform.machine(), "cpus": os.cpu_count(),
                      "tensorflow": tf.__version__, "results": results, "memory": memory_cases()}, indent=2))


if __name__ == "__main__":
    main()
