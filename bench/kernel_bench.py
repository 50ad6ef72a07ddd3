"""Int8 projection and decode-attention kernels on GPT-2-medium shapes, side by side in one run: textmill's native
kernels (serving/kernels, AVX-512 VNNI) against fbgemm's dynamic quantized linear with textmill's per-row mapping
(the previous `Int8Linear`) and against torch's three-op decode attention. Prints one JSON object.

    .venv/bin/python bench/kernel_bench.py            # ~1 min on 2 cores

Projections: the 97 of one decode step (24 x QKV 1024->3072, attention out 1024->1024, MLP 1024->4096 and 4096->1024,
lm_head 1024->50257), each with its own random weights so nothing stays in cache; fastest of 5 passes, for 1, 8 and
64 rows (a batch-1 step, a batch-8 step, a 64-token prefill). Attention: one query per row, 16 heads of 64, over
L cached positions of each of 24 layers (so the KV cache is read from memory as in a step), batch 1 and 8.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from textmill.serving import kernels
from textmill.serving.precision import Int8Linear

SHAPES = [(1024, 3072)] * 24 + [(1024, 1024)] * 24 + [(1024, 4096)] * 24 + [(4096, 1024)] * 24 + [(1024, 50257)]


def fastest(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def projections() -> dict:
    arena = kernels.HugePageArena()
    layers = {"native": [], "fbgemm": []}
    for k, n in SHAPES:
        linear = torch.nn.Linear(k, n)
        layers["native"].append(Int8Linear(linear, kernel="native", arena=arena).fused())
        layers["fbgemm"].append(Int8Linear(linear, kernel="fbgemm"))
        del linear
    weight_mb = sum(k * n for k, n in SHAPES) / 1e6
    out = {"weights_mb": round(weight_mb, 1)}
    for rows in (1, 8, 64):
        x = {1024: torch.randn(rows, 1024), 4096: torch.randn(rows, 4096)}
        row = {}
        for name, fns in layers.items():
            seconds = fastest(lambda: [f(x[k]) for f, (k, _) in zip(fns, SHAPES)])
            row[name] = {"ms": round(seconds * 1e3, 2), "weights_gb_per_s": round(weight_mb / 1e3 / seconds, 1)}
        row["speedup"] = round(row["fbgemm"]["ms"] / row["native"]["ms"], 2)
        out[f"rows={rows}"] = row
    return out


def torch_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1), values)


@torch.inference_mode()
def attention(kernel: kernels.Int8Kernel) -> dict:
    out = {}
    for batch in (1, 8):
        for length in (64, 256, 1000):
            caches = [(torch.randn(batch, 16, length + 24, 64), torch.randn(batch, 16, length + 24, 64))
                      for _ in range(24)]
            q = torch.randn(batch, 16, 1, 64)
            native = fastest(lambda: [kernel.attention(q, k[:, :, :length], v[:, :, :length], None)
                                      for k, v in caches])
            reference = fastest(lambda: [torch_attention(q, k[:, :, :length], v[:, :, :length]) for k, v in caches])
            out[f"batch={batch},L={length}"] = {"native_ms_24_layers": round(native * 1e3, 3),
                                                "torch_ms_24_layers": round(reference * 1e3, 3),
                                                "speedup": round(reference / native, 2)}
    return out


def main() -> None:
    kernel = kernels.fast_int8_kernel()
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "loadavg_start": os.getloadavg(),
              "torch_threads": torch.get_num_threads(), "kernel": kernel.isa if kernel else None}
    if kernel is None:
        report["error"] = "no VNNI CPU or no C compiler: the native kernels are not used here"
    else:
        report["projections_97"] = projections()
        report["decode_attention"] = attention(kernel)
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
