"""Benchmark `textmill prepare` (split + batched multi-threaded encode + uint16 write) against the usual baseline
(one `tokenizer.encode` call per document, ids collected in a Python list, then written). Prints JSON."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textmill.pipelines import prepare  # noqa: E402
from tests.fixtures.clean_corpora import make_config, make_docs, write_clean  # noqa: E402
from textmill import tokenizer  # noqa: E402

N_DOCS = int(os.environ.get("BENCH_DOCS", 20000))


def baseline(docs: list[dict], tok, out: Path) -> int:
    eot = tokenizer.eot_id(tok)
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d["text"]).ids)
        ids.append(eot)
    np.array(ids, np.uint16).tofile(out)
    return len(ids)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        docs = make_docs(N_DOCS, seed=0, words=300)
        write_clean(tmp / "clean", "a", docs)
        tok = tokenizer.train_bpe((x["text"] for x in docs[:2000]), 4096)
        tokenizer.save_openai(tok, tmp / "base" / "m")
        cfg = make_config(tmp, {"m": ["a"]})
        t0 = time.perf_counter()
        out = prepare.prepare(cfg, "m")
        t_prepare = time.perf_counter() - t0
        meta = json.loads((out / "meta.json").read_text())
        tokens = meta["tokens"]["train"] + meta["tokens"]["val"]
        t0 = time.perf_counter()
        base_tokens = baseline(docs, tok, tmp / "baseline.bin")
        t_base = time.perf_counter() - t0
    print(json.dumps({
        "docs": N_DOCS, "tokens": tokens, "cpus": os.cpu_count(),
        "textmill_prepare": {"seconds": round(t_prepare, 3), "tokens_per_s": round(tokens / t_prepare)},
        "baseline_encode_per_doc": {"seconds": round(t_base, 3), "tokens_per_s": round(base_tokens / t_base)},
        "speedup": round(t_base / t_prepare, 2),
        "note": "prepare also reads the JSONL twice (hash pass + encode pass) and splits/dedups; baseline only encodes",
    }, indent=2))


if __name__ == "__main__":
    main()
