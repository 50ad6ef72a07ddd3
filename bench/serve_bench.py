"""Serving benchmark: `textmill serve` per precision, side by side with writeup.ai's design, through HTTP.

The baseline is the design textmill replaces: a minimal server that runs one request at a time through
`model.generate` in fp32 (a global lock, no batching, no streaming), on the same model, same device, same request mix.
Both run as uvicorn subprocesses on 127.0.0.1; every request has its own seed so textmill's dedup/cache never answers one.
textmill is measured with streaming (time to first token = first SSE chunk); the baseline can only answer whole, so its
TTFT is its full latency. Two loads: one stream (sequential requests, one at a time) and N concurrent clients.

The default model is GPT-2-medium-shaped (24 layers, 1024 wide, random weights) with a byte-level BPE of GPT-2's 50,257
entries trained in the bench on synthetic text; `--size tiny` uses the test model. Each precision's quality delta
(relative validation-loss change versus fp32 on the shipped text sample, see serving/precision.py) is printed too; on
random weights it only shows that the check runs, not what a trained model loses. Prints one JSON object.

    .venv/bin/python bench/serve_bench.py --quick          # medium, int8 + float32, default threads: ~4 min on 2 cores
    .venv/bin/python bench/serve_bench.py [--size medium|tiny] [--export DIR] [--precisions int8,bfloat16,float32]
        [--threads 1,2] [--clients 8] [--requests 1] [--max-tokens 64] [--single-requests 2] [--single-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
MODEL = "bench"
# ~32 GPT-2 tokens of plain English; the actual count for the bench tokenizer is reported as prompt_tokens.
PROMPT = "The river town woke slowly on market days, and before sunrise the bakers had already lit their ovens while"


def baseline_app(export: str, threads: int):
    """writeup.ai-style server: one model, one lock, `model.generate` per request (fp32), JSON answer when done."""
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
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
                "usage": {"completion_tokens": len(new), "prompt_tokens": ids.shape[1]}}

    return app


def wait_ready(url: str, path: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code in (200, 405):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, stream: bool, i: int, max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "seed": 1000 + i, "temperature": 1.0}
    started = time.perf_counter()
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=1800)
        r.raise_for_status()
        t = time.perf_counter() - started
        return {"ttft": t, "latency": t, "tokens": r.json()["usage"]["completion_tokens"],
                "prompt_tokens": r.json()["usage"].get("prompt_tokens")}
    ttft, tokens, prompt_tokens = None, 0, None
    with httpx.stream("POST", url + "/v1/completions", timeout=1800,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"]:
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
    return {"ttft": ttft, "latency": time.perf_counter() - started, "tokens": tokens, "prompt_tokens": prompt_tokens}


def load(url: str, stream: bool, clients: int, requests: int, max_tokens: int, first_seed: int) -> dict:
    """`clients` threads, each sending `requests` requests one after another; aggregate tokens/s over the wall time."""
    results, errors = [], []

    def client(c: int) -> None:
        for k in range(requests):
            try:
                results.append(one_request(url, stream, first_seed + c * requests + k, max_tokens))
            except Exception as e:  # counted and reported, the run goes on
                errors.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    q = lambda xs, p: round(statistics.quantiles(xs, n=100, method="inclusive")[p - 1], 3) if len(xs) > 1 else \
        (round(xs[0], 3) if xs else None)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    lat = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "tokens": tokens,
            "prompt_tokens": results[0]["prompt_tokens"] if results else None, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": q(ttft, 50), "ttft_p95_s": q(ttft, 95),
            "latency_p50_s": q(lat, 50), "latency_p95_s": q(lat, 95), "error_samples": errors[:3]}


def measure(url: str, stream: bool, args: argparse.Namespace) -> dict:
    one_request(url, stream, -1, 4)  # warm the server's first request path
    return {"one_stream": load(url, stream, 1, args.single_requests, args.single_tokens, 0),
            f"{args.clients}_clients": load(url, stream, args.clients, args.requests, args.max_tokens, 10_000)}


def start_textmill(root: str, work: Path, dtype: str, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TEXTMILL_MAX_BATCH_SIZE": str(max_batch), "TEXTMILL_MAX_QUEUE": "1024",
           "TEXTMILL_CPU_THREADS": str(threads), "TEXTMILL_LOG_LEVEL": "WARNING"}
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "textmill.cli", "serve", "--root", root, "--cache",
                             str(work / "cache"), "--port", str(port), "--device", "cpu", "--dtype", dtype],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, "/ready", proc)
    return proc, url


def start_baseline(export: Path, work: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-baseline", str(export), "--port", str(port),
                             "--threads", str(threads)], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, "/v1/completions", proc)
    return proc, url


def synthetic_tokenizer(vocab_size: int = 50257):
    """A byte-level BPE with GPT-2's entry count (50,256 + `<|endoftext|>` = 50,257), trained on synthetic words."""
    from textmill import tokenizer

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + [v + c for v in "aeiou" for c in "nrst"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60_000)]
    texts = [" ".join(words[rng.randrange(len(words))] for _ in range(200)) for _ in range(3000)] + [" ".join(words)] * 2
    texts.append((REPO / "serving" / "quality_sample.txt").read_text(encoding="utf-8"))
    tok = tokenizer.train_bpe(texts, vocab_size)
    assert tokenizer.vocab_size(tok) == vocab_size, tokenizer.vocab_size(tok)
    return tok


def medium_export(dest: Path) -> Path:
    """A GPT-2-medium-shaped export (random weights, fp32 safetensors) in the converter's folder format."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from textmill import sizes, tokenizer

    if (dest / "model.safetensors").is_file():
        return dest
    tok = synthetic_tokenizer()
    eot = tokenizer.eot_id(tok)
    hp = sizes.from_name("gpt2-medium", n_vocab=tokenizer.vocab_size(tok))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**sizes.to_hf_config_kwargs(hp, eot_id=eot))).eval()
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    model.save_pretrained(dest)
    tokenizer.save_hf(tok, dest, model_max_length=hp.n_ctx)
    (dest / "textmill.json").write_text(json.dumps({"source": "bench/serve_bench.py random weights"}) + "\n")
    return dest


def quality_deltas(export: Path, precisions: list[str]) -> dict:
    """Each precision's relative loss change versus fp32 on the check's sample (what the server's check computes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textmill.serving import precision

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(export).backend_tokenizer
    ids, source = precision.load_sample(export, tok, int(model.config.vocab_size))
    ids = torch.tensor(ids)
    ref = precision.sequence_loss(model, ids, 256)
    out = {"sample": source, "sample_tokens": int(ids.numel()), "float32_loss": round(ref, 5)}
    for p in precisions:
        if p not in ("float32", "auto"):   # auto's delta is that of what it chose, reported per run
            loss = precision.sequence_loss(precision.to_precision(model, p), ids, 256)
            out[p] = round((loss - ref) / ref, 6)
    return out


def ratios(report: dict, clients_key: str) -> dict:
    base = report["baseline_generate_one_at_a_time_fp32"]
    out = {}
    for name, run in report["textmill"].items():
        out[name] = {
            "one_stream_x": round(run["one_stream"]["tokens_per_s"] / base["one_stream"]["tokens_per_s"], 2),
            "clients_x": round(run[clients_key]["tokens_per_s"] / base[clients_key]["tokens_per_s"], 2),
            "goals_met": {"one_stream>=6x_and_60tok/s": run["one_stream"]["tokens_per_s"] >= max(
                              60, 6 * base["one_stream"]["tokens_per_s"]),
                          "clients>=12x": run[clients_key]["tokens_per_s"] >= 12 * base[clients_key]["tokens_per_s"],
                          "ttft_p50<0.5s": (run[clients_key]["ttft_p50_s"] or 1e9) < 0.5,
                          "zero_errors": run["one_stream"]["errors"] + run[clients_key]["errors"] == 0}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["medium", "tiny"], default="medium")
    p.add_argument("--export", type=Path, help="HF export folder to serve; a medium one is built there when missing "
                   "(default: built in a temp folder)")
    p.add_argument("--precisions", default="int8,bfloat16,float32", help="textmill serving.dtype values to run")
    p.add_argument("--threads", default="0", help="textmill serving.cpu_threads values to run (comma-separated; "
                   "0 = the serving default, every CPU the process may use)")
    p.add_argument("--baseline-threads", type=int, default=1, help="torch threads of the baseline server")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request of the concurrent load")
    p.add_argument("--single-requests", type=int, default=2, help="sequential requests of the one-stream load")
    p.add_argument("--single-tokens", type=int, default=128, help="new tokens per one-stream request")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="int8 + float32, 1 request per client, 64/32 tokens")
    p.add_argument("--serve-baseline", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_baseline:
        import uvicorn

        uvicorn.run(baseline_app(args.serve_baseline, int(args.threads)), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return
    if args.quick:
        args.precisions, args.requests, args.single_requests = "int8,float32", 1, 1
        args.single_tokens, args.max_tokens = 64, 32
    precisions, threads = args.precisions.split(","), [int(t) for t in args.threads.split(",")]
    clients_key = f"{args.clients}_clients"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.export and (args.export / "model.safetensors").is_file():
            export = args.export
        elif args.size == "tiny":
            from tests.fixtures.models import make_tiny_export

            export = make_tiny_export(work / "export", n_ctx=256, vocab_size=4096)
        else:
            export = medium_export(args.export or work / "export")  # built once into --export when given
        report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "loadavg_start": os.getloadavg(),
                  "export": str(export), "size": args.size, "clients": args.clients,
                  "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                  "one_stream": {"requests": args.single_requests, "max_tokens": args.single_tokens},
                  "baseline_threads": args.baseline_threads,
                  "quality_delta_vs_fp32": quality_deltas(export, precisions), "textmill": {}}
        from textmill.registry import Registry

        root = str(work / "bucket")
        Registry(root).publish(MODEL, export, metrics={"val_loss": 0.0}, provenance={}, progress=False, force=True)
        proc, url = start_baseline(export, work, args.baseline_threads)
        try:
            report["baseline_generate_one_at_a_time_fp32"] = measure(url, False, args)
        finally:
            proc.terminate()
            proc.wait(60)
        for dtype in precisions:
            for n in threads:
                proc, url = start_textmill(root, work / f"tm-{dtype}-{n}", dtype, n, args.max_batch)
                try:
                    info = httpx.get(url + "/info", timeout=30).json()["models"][MODEL]["precision"]
                    run = measure(url, True, args)
                    run["precision"] = {k: info[k] for k in ("chosen", "loss_delta", "rejected", "decode_tokens_per_s")}
                    report["textmill"][f"{dtype}/threads={n}"] = run
                finally:
                    proc.terminate()
                    proc.wait(60)
        report["vs_baseline"] = ratios(report, clients_key)
        report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
