"""The generation engine in-process on a tiny model: sampling rules, stop strings, batching invariance, hot swap."""

from __future__ import annotations

import time

import pytest
import torch

from textmill.serving.engine import Engine, EngineOptions, Retired
from textmill.serving.engines import ENGINES
from textmill.serving.generation import Generation
from textmill.serving.sampling import SamplingParams, TextTracker, sample
from tests.fixtures.engines import HookedBatchingEngine, assert_same_text_as_alone

MODEL = "tiny"


def slow_engines(monkeypatch, step_delay: float = 0.01) -> dict:
    """Register the real batching engine with a per-step delay as `slow` (timing-sensitive tests are not races)."""
    monkeypatch.setitem(ENGINES, "slow", HookedBatchingEngine.configure(step_delay=step_delay))
    return {"engine": "slow"}


def engine_with(export, version="v1", **opts) -> Engine:
    engine = Engine(EngineOptions(device="cpu", **opts))
    assert engine.swap(MODEL, version, export, {"files": []})
    return engine


def run(engine: Engine, prompt: str, **params):
    worker = engine.worker(MODEL)
    gen = engine.submit(worker, prompt, worker.encode(prompt), SamplingParams(**params))
    assert gen.wait(30)
    return gen


def test_sampling_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, SamplingParams(temperature=0.0), None) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(top_k=1), g) for _ in range(20)} == {1}
    assert {sample(logits, SamplingParams(top_p=0.5), g) for _ in range(20)} == {1}  # p(1) > 0.5 alone
    picks = {sample(logits, SamplingParams(top_k=2), g) for _ in range(200)}
    assert picks == {1, 2}


class CharTokenizer:
    """One token per character: enough to drive TextTracker's hold-back logic exactly."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_string_split_across_tokens_is_held_back():
    tracker = TextTracker(CharTokenizer(), ("END",))
    out = [tracker.push(ord(c)) for c in "abcEN"]
    assert "".join(d for d, _ in out) == "abc"  # "EN" may start the stop string: held back
    delta, stopped = tracker.push(ord("D"))
    assert stopped and delta == "" and tracker.text == "abc"
    tracker = TextTracker(CharTokenizer(), ("END",))
    for c in "xEN":
        tracker.push(ord(c))
    delta, stopped = tracker.push(ord("o"))
    assert not stopped and delta == "ENo"  # it was not the stop string after all


@pytest.mark.parametrize("dtype", ["float32", "int8"])   # transformers' forward / serving.gpt2_runtime
def test_same_text_alone_or_batched_and_greedy_is_top_k_1(tiny_export, dtype):
    engine = engine_with(tiny_export, max_batch_size=8, dtype=dtype)
    try:
        worker = engine.worker(MODEL)

        def gen(prompt: str, **params) -> Generation:
            return Generation(prompt, MODEL, "v1", prompt, worker.encode(prompt), SamplingParams(**params),
                              worker.tokenizer)

        alone = gen("The quick", max_tokens=24, seed=3)
        worker.run_batch([alone])
        # one batch of four: different prompt lengths (left padding), lengths, and sampling settings
        batch = [gen("Once upon a time there was", max_tokens=30, seed=1, top_p=0.9),
                 gen("The quick", max_tokens=24, seed=3),
                 gen("A", max_tokens=5, temperature=0.0),
                 gen("This package provides a small library", max_tokens=28, seed=3, top_k=20)]
        worker.run_batch(batch)
        assert batch[1].text == alone.text and batch[1].tokens == alone.tokens == 24
        assert [g.tokens for g in batch] == [30, 24, 5, 28] or any(g.finish_reason == "stop" for g in batch)
        greedy = run(engine, "Serving", max_tokens=12, temperature=0.0).text
        assert run(engine, "Serving", max_tokens=12, top_k=1, seed=9).text == greedy
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", ["float32", "int8"])   # transformers' forward / serving.gpt2_runtime
def test_late_arrivals_join_a_running_batch_with_unchanged_text(tiny_export, monkeypatch, dtype):
    engine = engine_with(tiny_export, max_batch_size=8, dtype=dtype, **slow_engines(monkeypatch))
    try:
        worker = engine.worker(MODEL)
        long = run_async(engine, "A long one", max_tokens=80, seed=1)
        time.sleep(0.15)  # the long generation is decoding now
        prompts = ["The quick", "Once upon a time there was a little", "B"]
        joined = [run_async(engine, p, max_tokens=6, seed=2, stop=("\x00join",)) for p in prompts]
        for g in joined:
            assert g.wait(30) and g.tokens == 6
        assert not long.finished  # the short ones did not wait for the long one to end
        assert long.wait(30) and long.finish_reason in ("length", "stop")
        assert_same_text_as_alone(worker, MODEL, [(p, SamplingParams(max_tokens=6, seed=2), g)
                                                  for p, g in zip(prompts, joined)])
    finally:
        engine.close()


def run_async(engine: Engine, prompt: str, **params) -> Generation:
    worker = engine.worker(MODEL)
    return engine.submit(worker, prompt, worker.encode(prompt), SamplingParams(**params))


def test_hot_swap_finishes_in_flight_on_the_old_version(tiny_export, tiny_export_factory, monkeypatch):
    engine = engine_with(tiny_export, "v1", **slow_engines(monkeypatch))
    try:
        old = engine.worker(MODEL)
        long = run_async(engine, "long", max_tokens=60)
        assert engine.swap(MODEL, "v2", tiny_export_factory(1), {"files": []})
        assert long.version == "v1" and not long.finished  # still running on v1
        new = run(engine, "after", max_tokens=4)
        assert new.version == "v2"
        assert long.wait(30) and long.finish_reason == "length" and long.tokens == 60
        old.join(10)
        assert old.model is None  # the old version's weights were released after its last request
        assert engine.worker(MODEL).version == "v2"
        with pytest.raises(Retired):  # nothing can queue behind the retired worker's stop marker
            old.submit(Generation("late", MODEL, "v1", "late", [1], SamplingParams(), old.tokenizer))
    finally:
        engine.close()


def test_node_falls_back_to_a_cached_version_when_latest_will_not_load(tiny_export, tmp_path):
    from textmill.serving.daemon import Node
    from textmill.serving.metrics import Metrics
    from textmill.serving.sync import Syncer
    from textmill.config import ServingConfig
    from textmill.registry import Registry

    root, settings = str(tmp_path / "bucket"), ServingConfig(root=str(tmp_path / "bucket"), cache_dir=str(tmp_path / "c"))
    publish = lambda folder: Registry(root).publish(MODEL, folder, metrics={"val_loss": 1.0}, provenance={},  # noqa: E731
                                                    progress=False, force=True).version
    good = publish(tiny_export)
    first = Node(settings, Engine(EngineOptions(device="cpu")), Syncer(settings), Metrics())
    first.initial()
    assert first.engine.worker(MODEL).version == good
    first.engine.close()

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    bad = publish(broken)
    metrics = Metrics()
    restarted = Node(settings, Engine(EngineOptions(device="cpu"), metrics), Syncer(settings), metrics)
    restarted.initial()  # LATEST (bad) is downloaded and verified, fails to load: the cached good one serves
    try:
        assert restarted.engine.worker(MODEL).version == good
        assert bad in restarted.engine.failed[MODEL]
        assert restarted.expected == [MODEL] and restarted.engine.probe(MODEL)
    finally:
        restarted.engine.close()


def test_inverse_transform_draw_follows_the_distribution_and_never_picks_a_zero():
    from collections import Counter

    from textmill.serving.sampling import draw

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    counts = Counter(draw(probs, torch.Generator().manual_seed(s)) for s in range(4000))
    assert set(counts) == {0, 2, 3}
    assert all(abs(counts[i] / 4000 - p) < 0.03 for i, p in ((0, 0.1), (2, 0.6), (3, 0.3)))
    # the same seed draws the same token; one certain token is always drawn, also at the end of the vocabulary
    assert draw(probs, torch.Generator().manual_seed(7)) == draw(probs, torch.Generator().manual_seed(7))
    assert all(draw(torch.tensor([0.0, 0.0, 1.0]), torch.Generator().manual_seed(s)) == 2 for s in range(50))


def test_available_cpus_honours_a_container_cpu_quota(tmp_path):
    import os

    from textmill.system import available_cpus

    mine = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "none") == mine                 # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")               # cgroup v2, --cpus=0.5
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")                 # no quota
    assert available_cpus(tmp_path) == mine
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()                                        # cgroup v1, quota 1.5 CPUs -> rounds up to 2
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == min(2, mine)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("garbage\n")   # unreadable: ignored
    assert available_cpus(tmp_path) == mine


def test_more_cpu_threads_than_cpus_is_capped_with_a_warning(caplog):
    from textmill.serving.engine import configure_cpu_threads
    from textmill.system import available_cpus

    before = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING"):
            assert configure_cpu_threads(100_000) == available_cpus() == torch.get_num_threads()
        assert "serving.cpu_threads=100000 is more than" in caplog.text
        assert configure_cpu_threads(1) == 1
    finally:
        torch.set_num_threads(before)
