"""Publishing under faults, with real processes: a publisher SIGKILLed after each file in turn, and racing publishers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_registry import make_export
from textmill.registry import MANIFEST, Registry

REPO = Path(__file__).resolve().parent.parent
EXPORT_FILES = 4  # make_export writes 4 files; MANIFEST.json is upload number 5


def worker(root: str, model: str, export: Path, loss: float, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.fixtures.registry_worker", root, model, str(export), str(loss),
                             *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, line: str, timeout: float = 30) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if not got:
            raise AssertionError(f"worker ended before {line!r}: {seen} {proc.stderr.read()}")
        seen.append(got.strip())
        if got.strip() == line:
            return seen
    raise AssertionError(f"no {line!r} within {timeout}s: {seen}")


def result_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("die_after", range(1, EXPORT_FILES + 2))
def test_killed_publisher_never_exposes_a_partial_version(registry_root, tmp_path, die_after):
    reg = Registry(registry_root)
    live = reg.publish("m", make_export(tmp_path / "v1", seed=1), metrics={"val_loss": 2.0}, provenance={},
                       progress=False).version
    export = make_export(tmp_path / "v2", seed=2, weights_size=256 * 1024)
    proc = worker(registry_root, "m", export, 1.0, "--hang-after", str(die_after))
    lines = [proc.stdout.readline().strip() for _ in range(die_after)]  # the worker hangs right after the last one
    assert all(ln.startswith("uploaded ") for ln in lines), (lines, proc.stderr.read() if proc.poll() is not None else "")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    # LATEST still names the old, complete, checksum-valid version; the half-published one is invisible.
    assert reg.latest("m") == live
    others = [v for v in reg.versions("m") if v != live]
    assert len(others) == (0 if die_after <= EXPORT_FILES else 1)  # complete only once MANIFEST.json is written
    for v in [live, *others]:
        reg.download("m", v, tmp_path / "check" / v)
    reg.download("m", live, tmp_path / "cache" / live)
    # A new publish of the same export after the crash completes and goes live.
    again = reg.publish("m", export, metrics={"val_loss": 1.0}, provenance={}, progress=False)
    assert again.moved_latest and reg.latest("m") == again.version
    if die_after > EXPORT_FILES:  # MANIFEST was written: the version is complete; only LATEST was left to move
        assert again.version == others[0] and reg.versions("m") == [live, others[0]]
    reg.download("m", again.version, tmp_path / "cache" / again.version)


def test_latest_compare_and_set_against_a_real_second_publisher(registry_root, tmp_path):
    """Hold LATEST's compare-and-set open while another process publishes: on GCS our swap must then fail (generation
    precondition), on a local folder the other process must wait for our lock and then gate against our version."""
    reg = Registry(registry_root)
    v0 = reg.publish("m", make_export(tmp_path / "v0", seed=0), metrics={"val_loss": 2.0}, provenance={},
                     progress=False).version
    mine = reg.publish("m", make_export(tmp_path / "mine", seed=1), metrics={"val_loss": 3.0}, provenance={},
                       progress=False).version  # gate-refused: uploaded, not live
    assert reg.latest("m") == v0
    with reg._latest_cas("m") as (live, swap):
        assert live == v0
        other = worker(registry_root, "m", make_export(tmp_path / "other", seed=2), 1.9)
        if registry_root.startswith("gs://"):
            theirs = result_of(other)
            assert theirs["moved_latest"] and reg.latest("m") == theirs["version"]
            assert swap(mine) is False  # someone moved LATEST since we read it: our write is refused
            assert reg.latest("m") == theirs["version"]
        else:
            read_until(other, f"uploaded {MANIFEST}")
            time.sleep(1.0)
            assert other.poll() is None and reg.latest("m") == v0  # blocked on our lock
            assert swap(mine) is True
    if not registry_root.startswith("gs://"):
        theirs = result_of(other)
        assert theirs["live_version"] == mine and theirs["moved_latest"]  # it decided against OUR version
        assert reg.latest("m") == theirs["version"]


@pytest.mark.parametrize("round_", range(2))
def test_racing_publishers_keep_the_better_model_live(registry_root, tmp_path, round_):
    """Two publishers start from the same live version; whichever order they land in, the better one ends up live:
    the worse one is re-gated against the better one (a lost update would leave the worse one live)."""
    reg = Registry(registry_root)
    reg.publish("m", make_export(tmp_path / "v0", seed=0), metrics={"val_loss": 2.0}, provenance={}, progress=False)
    go = tmp_path / "go"
    good = worker(registry_root, "m", make_export(tmp_path / "good", seed=10 + round_), 1.0, "--wait-for", str(go))
    meh = worker(registry_root, "m", make_export(tmp_path / "meh", seed=20 + round_), 1.9, "--wait-for", str(go))
    for proc in (good, meh):
        read_until(proc, f"uploaded {MANIFEST}")
    go.touch()
    good_res, meh_res = result_of(good), result_of(meh)
    assert good_res["moved_latest"]
    assert reg.latest("m") == good_res["version"]
    if not meh_res["moved_latest"]:
        assert meh_res["live_version"] == good_res["version"] and "gate refused" in meh_res["message"]
    assert set(reg.versions("m")) >= {good_res["version"], meh_res["version"]}
    reg.download("m", reg.latest("m"), tmp_path / "cache")
