"""Trainer throughput (tokens/s per optimizer step) of the TF and PyTorch backends side by side, with and without
gradient checkpointing, and their peak memory.

    .venv/bin/python bench/train_bench.py [--backend tf|pt|both] [--steps 3] [--tiny-steps 20] [--sizes tiny,124M]

Random weights, random tokens, float32, one AdamW step including clipping; the first step (tracing / compilation,
allocator warm-up) is not timed. A second part measures what checkpointing is for: peak process memory (CPU RSS; CUDA
peak allocated on a GPU) of a 12-layer model with and without it, each backend and case in its own process.
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

from textmill import sizes, weights  # noqa: E402
from textmill.config import TrainingConfig  # noqa: E402

# size -> (n_ctx, batch_size): 124M at a short context so a CPU step takes seconds, not minutes.
CASES = {"tiny": (128, 8), "124M": (128, 2)}


def make_trainer(backend: str, hp: sizes.Hparams, tc: TrainingConfig, n_ctx: int):
    """A backend's trainer with fresh weights (TF: OpenAI init; PyTorch: transformers' init), ready to step."""
    if backend == "tf":
        import tensorflow as tf

        from textmill.training.tf.trainer import Trainer

        trainer = Trainer(hp, tc, n_ctx, tf.distribute.get_strategy())
        trainer.model.assign(dict(weights.init_numpy(hp, 0)))
        return trainer
    from textmill.training.pt.trainer import Trainer

    trainer = Trainer(hp, tc, n_ctx, eot=hp.n_vocab - 1)
    trainer._finish_setup()  # optimizer (+ DDP / compile) over the freshly initialised weights
    return trainer


def measure(backend: str, size: str, grad_checkpointing: bool, steps: int) -> dict:
    n_ctx, batch = CASES[size]
    hp = sizes.from_name(size)
    tc = TrainingConfig(steps=steps + 1, batch_size=batch, grad_checkpointing=grad_checkpointing, warmup_steps=0,
                        backend=backend)
    trainer = make_trainer(backend, hp, tc, n_ctx)
    rng = np.random.default_rng(0)
    x = rng.integers(0, hp.n_vocab, (1, batch, n_ctx)).astype(np.int32)
    trainer.train_step(x, x)  # trace + compile
    t0 = time.perf_counter()
    for _ in range(steps):
        out = trainer.train_step(x, x)
    dt = time.perf_counter() - t0
    return {"backend": backend, "size": size, "n_ctx": n_ctx, "batch_size": batch, "grad_checkpointing": grad_checkpointing,
            "params": hp.n_params, "steps": steps, "s_per_step": dt / steps,
            "tokens_per_s": batch * n_ctx * steps / dt, "loss": out["loss"]}


def high_water_mark() -> int:
    """Peak resident memory of this process (VmHWM; unlike ru_maxrss it is not inherited across fork + exec)."""
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_rss(backend: str, grad_checkpointing: bool) -> dict:
    """Peak process memory of two train steps of a 12-layer, 256-wide model at n_ctx 512, batch 8 (own process each)."""
    hp = sizes.Hparams(n_vocab=512, n_ctx=512, n_embd=256, n_head=4, n_layer=12)
    tc = TrainingConfig(batch_size=8, grad_checkpointing=grad_checkpointing, backend=backend)
    trainer = make_trainer(backend, hp, tc, 512)
    x = np.random.default_rng(0).integers(0, hp.n_vocab, (1, 8, 512)).astype(np.int32)
    before = high_water_mark()
    trainer.train_step(x, x)
    trainer.train_step(x, x)
    peak = high_water_mark()
    return {"backend": backend, "grad_checkpointing": grad_checkpointing, "peak_rss_bytes": peak,
            "training_rss_bytes": peak - before, "peak_device_bytes": trainer.peak_memory_bytes()}


def memory_cases(backend: str) -> dict:
    out = {}
    for flag in (False, True):
        done = subprocess.run([sys.executable, __file__, "--child-memory", f"{backend}:{int(flag)}"],
                              capture_output=True, text=True, check=True)
        out["grad_checkpointing" if flag else "baseline"] = json.loads(done.stdout.strip().splitlines()[-1])
    out["memory_ratio"] = out["grad_checkpointing"]["training_rss_bytes"] / out["baseline"]["training_rss_bytes"]
    out["shape"] = "n_layer 12, n_embd 256, n_ctx 512, batch 8"
    return out


def set_threads(n: int, backends: tuple[str, ...]) -> None:
    """The same intra-op thread count for every framework measured (before either runs an op)."""
    if "pt" in backends:
        import torch

        torch.set_num_threads(n)
    if "tf" in backends:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--sizes", default="tiny,124M")
    p.add_argument("--backend", choices=("tf", "pt", "both"), default="both")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory part")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for both frameworks (0 = their defaults); 1 avoids OpenMP spin on a busy VM")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory is not None:
        backend, flag = args.child_memory.split(":")
        print(json.dumps(peak_rss(backend, bool(int(flag)))))
        return
    backends = ("tf", "pt") if args.backend == "both" else (args.backend,)
    if args.threads:
        set_threads(args.threads, backends)
    results = []
    for size in args.sizes.split(","):
        steps = args.tiny_steps if size == "tiny" else args.steps
        for backend in backends:  # each size: both backends back to back, so they share the machine's load
            base, ckpt = measure(backend, size, False, steps), measure(backend, size, True, steps)
            results.append({"backend": backend, "size": size, "baseline": base, "grad_checkpointing": ckpt,
                            "checkpointing_speed_ratio": ckpt["tokens_per_s"] / base["tokens_per_s"]})
    memory = {} if args.no_memory else {b: memory_cases(b) for b in backends}
    print(json.dumps({"bench": "train", "machine": platform.machine(), "cpus": os.cpu_count(),
                      "threads": args.threads or "default", "loadavg_start": os.getloadavg(), "results": results, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
