"""Benchmark the bucket registry against plain fsspec copies (the baseline), on a local folder and the GCS emulator.

Publish (hash + upload + MANIFEST + gated LATEST) vs `fs.put(folder, recursive=True)`; verified download vs
`fs.get(folder, recursive=True)` (no checksums); and a serving node's update to a version that changed only config.json,
with and without `reuse` of the cached previous version. Prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.gcs import REPO, _wait_ready, free_port  # noqa: E402

WEIGHTS_MB = int(os.environ.get("BENCH_WEIGHTS_MB", 64))


def make_export(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(WEIGHTS_MB * 2**20))
    for name in ("config.json", "tokenizer.json", "textmill.json", "generation_config.json"):
        (folder / name).write_text(json.dumps({"name": name, "pad": "x" * 2000}))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return round(time.perf_counter() - t, 3)


def bench_root(root: str, tmp: Path) -> dict:
    from textmill.registry import Registry

    reg = Registry(root)
    export = tmp / "export"
    out = {"publish_s": timed(lambda: reg.publish("m", export, metrics={"val_loss": 2.0}, provenance={}, progress=False))}
    out["baseline_put_s"] = timed(lambda: reg.fs.put(str(export), reg._path("baseline"), recursive=True))
    v1 = reg.latest("m")
    out["download_verified_s"] = timed(lambda: reg.download("m", v1, tmp / "cache" / v1))
    out["baseline_get_s"] = timed(lambda: reg.fs.get(reg._path("baseline"), str(tmp / "plain"), recursive=True))
    (export / "config.json").write_text('{"changed": true}')
    reg.publish("m", export, metrics={"val_loss": 1.9}, provenance={}, progress=False)
    v2 = reg.latest("m")
    out["update_no_reuse_s"] = timed(lambda: reg.download("m", v2, tmp / "cache-a" / v2))
    out["update_with_reuse_s"] = timed(lambda: reg.download("m", v2, tmp / "cache" / v2, reuse=[tmp / "cache" / v1]))
    return out


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    emu = subprocess.Popen([sys.executable, "-m", "tests.fixtures.gcs_emulator", "--port", str(port)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, emu)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        import gcsfs

        gcsfs.GCSFileSystem(token="anon").mkdir("bench")
        results = {"weights_mb": WEIGHTS_MB}
        for kind, root in (("local", None), ("gcs_emulator", "gs://bench/registry")):
            with tempfile.TemporaryDirectory() as d:
                tmp = Path(d)
                make_export(tmp / "export")
                results[kind] = bench_root(root or str(tmp / "bucket"), tmp)
        print(json.dumps(results, indent=2))
    finally:
        emu.terminate()
        emu.wait()


if __name__ == "__main__":
    main()
