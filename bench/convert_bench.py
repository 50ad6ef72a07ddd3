"""Convert benchmark: a 355M-shaped TF checkpoint, read-only pass (baseline) vs `textmill convert`, time and peak RSS.

Each measurement runs in a fresh subprocess so `ru_maxrss` is that job's own peak. Both jobs import the same libraries
(TF for reading, torch + transformers for writing) before the clock starts, and report the RSS after imports so the
memory the conversion itself adds can be compared with the model's size. A third job times one sha256 pass over the data
file, the floor of each provenance checksum. Each job runs --repeat times; the median run is reported, with every run's
wall and CPU seconds. Prints one JSON object.

    .venv/bin/python bench/convert_bench.py [--size 355M] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Child jobs: print {"seconds", "cpu_s", "rss_imports", "rss_peak"} (bytes; ru_maxrss is KiB on Linux). cpu_s is the
# job's user+sys time over all its threads: unlike wall time it does not grow when other work shares the two cores.
CHILD = r"""
import hashlib, json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import tensorflow, torch, transformers  # same imports in both jobs
from textmill.training.tf import checkpoint
rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
job, src, dst = sys.argv[2], sys.argv[3], sys.argv[4]
t0, c0 = time.perf_counter(), os.times()
if job == "read":
    n = sum(v.nbytes for _, v in checkpoint.iter_tensors(src + "/model.ckpt"))
elif job == "sha256":  # one sha256 pass over the data file: what each provenance checksum costs at least
    with open(src + "/model.ckpt.data-00000-of-00001", "rb") as f:
        hashlib.file_digest(f, "sha256")
else:
    from textmill.convert.sources import resolve
    from textmill.convert.tf_to_hf import convert
    convert(resolve(src), dst, dtype=job.split(":")[1])
seconds, c1 = time.perf_counter() - t0, os.times()
cpu_s = c1.user - c0.user + c1.system - c0.system
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s, "rss_imports": rss_imports,
                  "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_gpt2_sized_tokenizer(folder: Path, n_vocab: int) -> None:
    """encoder.json + vocab.bpe with exactly n_vocab entries (256 bytes, pair merges, EOT last), as in GPT-2's release."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [(a, b) for a in alphabet for b in alphabet][: n_vocab - len(alphabet) - 1]
    vocab = {t: i for i, t in enumerate(alphabet + [a + b for a, b in merges] + ["<|endoftext|>"])}
    (folder / "encoder.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def make_checkpoint(folder: Path, size: str) -> tuple[int, float]:
    """A random OpenAI-release-layout checkpoint of the given size, written by TF; (weight bytes, seconds)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from textmill import sizes
    from textmill.weights import openai_shapes
    from textmill.training.tf import checkpoint

    t0 = time.perf_counter()
    hp = sizes.from_name(size)
    folder.mkdir(parents=True)
    (folder / "hparams.json").write_text(json.dumps(hp.to_json()), encoding="utf-8")
    write_gpt2_sized_tokenizer(folder, hp.n_vocab)
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in openai_shapes(hp).items()}
    checkpoint.save(weights, folder / "model.ckpt")
    checkpoint.write_checkpoint_file(folder, "model.ckpt", ["model.ckpt"])
    return sum(w.nbytes for w in weights.values()), time.perf_counter() - t0


def child(job: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), job, str(src), str(dst)], env=env,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def median_of(repeat: int, job: str, src: Path, dst: Path) -> dict:
    """The median run of `repeat` (by wall time), with every run's wall and CPU seconds (the VM's 2 cores are shared)."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(dst, ignore_errors=True)
        runs.append(child(job, src, dst))
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return {**median, "runs_s": [round(r["seconds"], 3) for r in runs], "runs_cpu_s": [round(r["cpu_s"], 3) for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="355M")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder, removed)")
    p.add_argument("--make-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_only:  # runs in its own process: the parent stays small, so children's ru_maxrss is their own
        print(json.dumps(make_checkpoint(args.make_only, args.size)))
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        src = work / "release"
        make_s = None
        if not src.exists():
            out = subprocess.run([sys.executable, __file__, "--size", args.size, "--make-only", str(src)],
                                 capture_output=True, text=True, check=True)
            make_s = json.loads(out.stdout.strip().splitlines()[-1])[1]
        ckpt_bytes = sum(f.stat().st_size for f in src.glob("model.ckpt.*"))
        results = {"read_only": median_of(args.repeat, "read", src, work / "unused"),
                   "sha256_data_file": median_of(args.repeat, "sha256", src, work / "unused")}
        for dtype in ("float32", "float16"):
            dst = work / f"export-{dtype}"
            results[f"convert_{dtype}"] = median_of(args.repeat, f"convert:{dtype}", src, dst)
            results[f"convert_{dtype}"]["output_bytes"] = (dst / "model.safetensors").stat().st_size
        read_s = results["read_only"]["seconds"]
        for r in results.values():
            r["rss_added_over_checkpoint"] = round((r["rss_peak"] - r["rss_imports"]) / ckpt_bytes, 3)
            r["time_over_read"] = round(r["seconds"] / read_s, 2)
            r["cpu_over_read_cpu"] = round(r["cpu_s"] / results["read_only"]["cpu_s"], 2)
        print(json.dumps({"bench": "convert", "size": args.size, "checkpoint_bytes": ckpt_bytes,
                          "make_checkpoint_s": make_s, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                          "load_avg_1m": os.getloadavg()[0], **results}, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
