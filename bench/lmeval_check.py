"""lm-eval acceptance check: the `local-completions` model against `textmill serve` scores a loglikelihood task exactly
as lm-eval's own `hf` model does on the same export.

Builds (or takes with --export) a GPT-2 export folder, publishes it to a temporary local registry, starts
`textmill serve` on 127.0.0.1 with serving.dtype=float32, writes a small local multiple-choice task (a JSONL file and a
task YAML in a temporary folder: no hub), runs `lm_eval.simple_evaluate` once with
`model="local-completions"` (tokenized requests: lm-eval sends token ids, `echo: true`, `logprobs: 1`, `max_tokens: 1`)
and once with `model="hf"`, and compares every per-choice loglikelihood and the task's acc / acc_norm. Prints one JSON
object; exits 1 when any loglikelihood differs by more than --tolerance (1e-3).

    .venv/bin/python bench/lmeval_check.py [--export DIR] [--docs 40] [--tolerance 1e-3]

Needs the `lm-eval` package (`pip install -e .[eval]`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fixtures.models import CORPUS, make_tiny_export  # noqa: E402

MODEL = "lmeval"
TASK = "textmill_continuations"


def write_task(folder: Path, docs: int, seed: int = 0) -> None:
    """A multiple-choice task: which of four continuations follows a context (one true, three from other sentences)."""
    rng = random.Random(seed)
    sentences = sorted(set(CORPUS))
    rows = []
    for i in range(docs):
        s = sentences[i % len(sentences)].split()
        cut = rng.randint(3, len(s) - 3)
        others = [o.split() for o in sentences if o.split() != s]
        choices = [" " + " ".join(s[cut:])] + [" " + " ".join(o[cut:cut + len(s) - cut]) for o in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        # "<i>." makes every context + continuation unique: lm-eval's hf model shares logits between requests whose
        # whole token sequences coincide (same sentence cut at two places) and then scores one of them wrongly
        rows.append({"context": f"{i}. " + " ".join(s[:cut]), "choices": [choices[k] for k in order], "label": order.index(0)})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")


def start_server(export: Path, work: Path) -> tuple[subprocess.Popen, str]:
    from textmill.registry import Registry
    from tests.fixtures.server import free_port

    root = work / "bucket"
    Registry(str(root)).publish(MODEL, export, metrics={"val_loss": 0.0}, provenance={}, progress=False, force=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TEXTMILL_DTYPE": "float32"}
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "textmill.cli", "serve", "--root", str(root), "--cache",
                             str(work / "cache"), "--host", "127.0.0.1", "--port", str(port)], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"textmill serve exited: {(work / 'serve.log').read_text()}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("textmill serve did not become ready")


def evaluate(model: str, model_args: dict, task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], batch_size=1, log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir)), random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return {"seconds": round(time.perf_counter() - started, 2),
            "metrics": {k: v for k, v in out["results"][TASK].items() if isinstance(v, float)},
            "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            "requests": [[list(a) for a in s["arguments"]] for s in samples]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", type=Path, help="export folder (default: a tiny GPT-2 built here)")
    p.add_argument("--docs", type=int, default=40)
    p.add_argument("--tolerance", type=float, default=1e-3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = args.export or make_tiny_export(work / "export", seed=0)
        task_dir = work / "task"
        task_dir.mkdir()
        write_task(task_dir, args.docs)
        n_ctx = json.loads((export / "config.json").read_text())["n_positions"]
        proc, url = start_server(export, work)
        try:
            served = evaluate("local-completions", {"model": MODEL, "base_url": url + "/v1/completions",
                                                    "tokenizer": str(export), "tokenizer_backend": "huggingface",
                                                    "max_length": n_ctx, "num_concurrent": 1, "max_retries": 1},
                              task_dir)
        finally:
            proc.terminate()
            proc.wait(30)
        direct = evaluate("hf", {"pretrained": str(export), "dtype": "float32", "device": "cpu",
                                 "max_length": n_ctx}, task_dir)
    # pair the two runs by request (context, continuation), not by position
    by_request = [{tuple(req): ll for reqs, lls in zip(run["requests"], run["loglikelihoods"]) for req, ll in zip(reqs, lls)}
                  for run in (served, direct)]
    pairs = [(abs(a - by_request[1][req]), a, by_request[1][req], list(req)) for req, a in by_request[0].items()
             if req in by_request[1]]
    missing = len(set(by_request[0]) ^ set(by_request[1]))
    diffs = [d for d, *_ in pairs]
    worst = [{"served": a, "hf": b, "request": req} for _, a, b, req in sorted(pairs, key=lambda x: -x[0])[:3]]
    metric_diff = max(abs(served["metrics"][k] - direct["metrics"][k]) for k in direct["metrics"])
    ok = (len(served["loglikelihoods"]) == len(direct["loglikelihoods"]) == args.docs and not missing and
          max(diffs) <= args.tolerance and metric_diff <= args.tolerance)
    print(json.dumps({"task": TASK, "docs": args.docs, "choices_scored": len(diffs), "unpaired_requests": missing, "export": str(args.export or "tiny"),
                      "local_completions": {k: v for k, v in served.items() if k not in ("loglikelihoods", "requests")},
                      "hf": {k: v for k, v in direct.items() if k not in ("loglikelihoods", "requests")},
                      "worst": worst,
                      "max_abs_loglikelihood_diff": max(diffs), "max_metric_diff": metric_diff,
                      "tolerance": args.tolerance, "ok": ok, "machine": platform.machine(),
                      "cpus": os.cpu_count()}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
