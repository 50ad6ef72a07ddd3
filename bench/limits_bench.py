"""Limits benchmark: 64 SSE clients for 60 s against `textmill serve` with its limits on (defaults of docs/serving.md
"Security and limits"), side by side with the same server with the limits off (set so high they never act).

Each client thread streams completions back to back (`stream: true`, its own seed per request, so dedup/cache never
answers one). Reported per run: requests completed, errors by HTTP status (or transport error), latency (whole stream)
and time to first chunk p50/p95, `/live` probe latency during the load (one probe a second), and the server's RSS before
the load, its peak during it (sampled every 0.2 s) and after it. Prints one JSON object.

    .venv/bin/python bench/limits_bench.py [--clients 64] [--seconds 60] [--max-tokens 32] [--no-baseline]
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
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = "tiny"
LIMITS_OFF = {"max_body_bytes": 2**40, "body_timeout": 1e6, "header_timeout": 1e6, "keep_alive_timeout": 1e6,
              "max_connections": 10**6, "max_websockets": 10**5, "ws_idle_timeout": 1e6}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def start_server(export: Path, work: Path, overrides: dict) -> tuple[subprocess.Popen, str]:
    from bench.serve_bench import free_port, wait_ready
    from textmill.registry import Registry

    work.mkdir(parents=True, exist_ok=True)
    root = str(work / "bucket")
    Registry(root).publish(MODEL, export, metrics={"val_loss": 0.0}, provenance={}, progress=False, force=True)
    port = free_port()
    sets = [a for k, v in overrides.items() for a in ("--set", f"serving.{k}={v}")]
    proc = subprocess.Popen([sys.executable, "-m", "textmill.cli", "serve", "--root", root, "--cache", str(work / "cache"),
                             "--port", str(port), "--device", "cpu", *sets], cwd=work,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, "/ready", proc)
    return proc, url


def stream_once(client: httpx.Client, url: str, seed: int, max_tokens: int) -> tuple[str, float, float | None]:
    """(status, latency s, time to first chunk s) of one streamed completion."""
    body = {"model": MODEL, "prompt": f"Request {seed} says", "max_tokens": max_tokens, "seed": seed, "stream": True}
    started, first = time.perf_counter(), None
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                return str(r.status_code), time.perf_counter() - started, None
            for line in r.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - started
        return "200", time.perf_counter() - started, first
    except httpx.HTTPError as e:
        return type(e).__name__, time.perf_counter() - started, None


def load(url: str, pid: int, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[tuple[str, float, float | None]] = []
    stop = threading.Event()
    peak, live = [rss(pid)], []
    before = peak[0]

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            k = 0
            while not stop.is_set():
                results.append(stream_once(http, url, 1_000_000 * (c + 1) + k, max_tokens))
                k += 1

    def sample() -> None:
        next_live = time.monotonic()
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            if time.monotonic() >= next_live:
                started = time.perf_counter()
                try:
                    ok = httpx.get(url + "/live", timeout=10).status_code == 200
                except httpx.HTTPError:
                    ok = False
                live.append(time.perf_counter() - started if ok else float("inf"))
                next_live += 1.0
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)] + [threading.Thread(target=sample)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    time.sleep(5)
    ok = [r for r in results if r[0] == "200"]
    q = lambda xs, p: round(statistics.quantiles(xs, n=100)[p - 1], 3) if len(xs) > 1 else None
    return {"requests": len(results), "ok": len(ok), "errors_by_status": dict(Counter(r[0] for r in results if r[0] != "200")),
            "wall_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 2),
            "latency_p50_s": q([r[1] for r in ok], 50), "latency_p95_s": q([r[1] for r in ok], 95),
            "ttft_p50_s": q([r[2] for r in ok if r[2] is not None], 50),
            "ttft_p95_s": q([r[2] for r in ok if r[2] is not None], 95),
            "live_probes": len(live), "live_max_s": round(max(live), 3) if live else None,
            "rss_mb": {"before": round(before / 2**20, 1), "peak": round(peak[0] / 2**20, 1),
                       "after": round(rss(pid) / 2**20, 1)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="HF export folder (default: models/export/*, else a built tiny model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-baseline", action="store_true", help="skip the limits-off run")
    args = p.parse_args()
    from bench.serve_bench import default_export

    with open("/proc/loadavg") as f:
        report = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "loadavg_at_start": f.read().strip(),
                  "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = args.export or default_export(work)
        runs = [("limits_on", {})] + ([] if args.no_baseline else [("limits_off", LIMITS_OFF)])
        for name, overrides in runs:
            proc, url = start_server(export, work / name, overrides)
            try:
                stream_once(httpx.Client(timeout=60), url, 1, 4)  # warm the first-request path
                report[name] = load(url, proc.pid, args.clients, args.seconds, args.max_tokens)
                report[name]["limits"] = httpx.get(url + "/info", timeout=10).json()["limits"]
            finally:
                proc.terminate()
                proc.wait(30)
    with open("/proc/loadavg") as f:
        report["loadavg_at_end"] = f.read().strip()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
