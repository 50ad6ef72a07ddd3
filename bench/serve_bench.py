"""Serving benchmark: N concurrent HTTP clients against `textmill serve` and, side by side, writeup.ai's design.

The baseline is the design textmill replaces: a minimal server that runs one request at a time through
`model.generate` (a global lock, no batching, no streaming), on the same model, same device, same request mix. Both run
as uvicorn subprocesses on 127.0.0.1; every request has its own seed so textmill's dedup/cache never answers one.
textmill is measured with streaming (time to first token = first SSE chunk); the baseline can only answer whole, so its
TTFT is its full latency. textmill is also measured without streaming (same protocol as the baseline). The no-stream
run uses seeds offset from the streaming run's so neither is answered from the cache. Prints one JSON object.

    .venv/bin/python bench/serve_bench.py [--export DIR] [--clients 8] [--requests 6] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = "tiny"


def baseline_app(export: str):
    """writeup.ai-style server: one model, one lock, `model.generate` per request, JSON answer when done."""
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(body: dict):
        ids = tok(body["prompt"], return_tensors="pt").input_ids
        with lock, torch.inference_mode():
            torch.manual_seed(int(body.get("seed", 42)))
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=float(body.get("temperature", 1.0)), top_k=0,
                                 max_new_tokens=int(body["max_tokens"]), pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        return {"choices": [{"text": tok.decode(new, skip_special_tokens=True)}],
                "usage": {"completion_tokens": len(new)}}

    return app


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code in (200, 405):
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, stream: bool, i: int, max_tokens: int, seed_offset: int = 0) -> dict:
    body = {"model": MODEL, "prompt": f"Request number {i} says", "max_tokens": max_tokens, "seed": 1000 + i + seed_offset,
            "temperature": 1.0}
    started = time.perf_counter()
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        t = time.perf_counter() - started
        return {"ttft": t, "latency": t, "tokens": r.json()["usage"]["completion_tokens"]}
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/completions", timeout=600,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"]:
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft, "latency": time.perf_counter() - started, "tokens": tokens}


def load(url: str, stream: bool, clients: int, requests: int, max_tokens: int, seed_offset: int = 0) -> dict:
    results, errors = [], []

    def client(c: int) -> None:
        for k in range(requests):
            try:
                results.append(one_request(url, stream, c * requests + k, max_tokens, seed_offset))
            except Exception as e:  # counted and reported, the run goes on
                errors.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    q = lambda xs, p: round(statistics.quantiles(xs, n=100)[p - 1], 4) if len(xs) > 1 else (xs[0] if xs else None)
    ttft = [r["ttft"] for r in results]
    lat = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "errors": len(errors), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": q(ttft, 50), "ttft_p95_s": q(ttft, 95),
            "latency_p50_s": q(lat, 50), "latency_p95_s": q(lat, 95), "error_samples": errors[:3]}


def start_textmill(export: Path, work: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    from textmill.registry import Registry

    work.mkdir(parents=True, exist_ok=True)
    root = str(work / "bucket")
    Registry(root).publish(MODEL, export, metrics={"val_loss": 0.0}, provenance={}, progress=False, force=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TEXTMILL_MAX_BATCH_SIZE": str(max_batch), "TEXTMILL_MAX_QUEUE": "1024",
           "TEXTMILL_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "textmill.cli", "serve", "--root", root, "--cache",
                             str(work / "cache"), "--port", str(port), "--device", "cpu"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, "/ready", proc)
    return proc, url


def start_baseline(export: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-baseline", str(export), "--port", str(port)], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, "/v1/completions", proc)
    return proc, url


def default_export(work: Path) -> Path:
    """The pipeline's tiny export when there is one, else a tiny model built in place (same folder format)."""
    for candidate in sorted((REPO / "models" / "export").glob("*/model.safetensors")):
        return candidate.parent
    from tests.fixtures.models import make_tiny_export

    return make_tiny_export(work / "export", n_ctx=128, vocab_size=4096)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="HF export folder (default: models/export/*, else a built tiny model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=6, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--serve-baseline", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_baseline:
        import uvicorn

        uvicorn.run(baseline_app(args.serve_baseline), host="127.0.0.1", port=args.port, log_level="warning")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = args.export or default_export(work)
        report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "export": str(export),
                  "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens}
        runs = (("textmill", lambda: start_textmill(export, work / "a", args.max_batch), (True, False)),
                ("baseline_generate_one_at_a_time", lambda: start_baseline(export, work), (False,)))
        for name, start, modes in runs:
            proc, url = start()
            try:
                one_request(url, modes[0], -1, 4)  # warm the server's first request path
                for stream in modes:
                    key = name if stream == modes[0] else f"{name}_no_stream"
                    offset = 0 if stream == modes[0] else 100_000  # fresh seeds: no cache hits from the first run
                    report[key] = load(url, stream, args.clients, args.requests, args.max_tokens, offset)
            finally:
                proc.terminate()
                proc.wait(30)
        report["speedup_tokens_per_s"] = round(report["textmill"]["tokens_per_s"] /
                                               report["baseline_generate_one_at_a_time"]["tokens_per_s"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
