"""Fleet-wide duplicate cache: with serving.cache_url=redis://..., an identical request on another node is answered
from the first node's result (no tokens generated twice), against a real redis-server process; the node-local cache
stays the default, and a redis outage never fails a request."""

from __future__ import annotations

import json
import time

import pytest
import redis

from textmill.serving import result_cache, settings
from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.metrics import Metrics
from textmill.serving.sampling import SamplingParams
from textmill.config import ServingConfig
from textmill.errors import UserError
from tests.fixtures.redis_server import redis_server  # noqa: F401  (fixture)

MODEL, VERSION = "tiny", "20260101T000000Z-0123456789ab"


def make_node(export, cache_url: str, ttl: float = 300.0) -> tuple[Engine, Metrics]:
    metrics = Metrics()
    engine = Engine(EngineOptions(device="cpu", dtype="float32", cpu_threads=1, cache_url=cache_url, cache_ttl=ttl),
                    metrics)
    assert engine.swap(MODEL, VERSION, export, {"files": []})
    return engine, metrics


def generate(engine: Engine, prompt: str, **params):
    worker = engine.worker(MODEL)
    gen = engine.submit(worker, prompt, worker.encode(prompt), SamplingParams(**{"max_tokens": 12, **params}))
    assert gen.wait(60) and gen.error is None
    return gen


def wait_shared(url: str, gen, timeout: float = 10.0) -> None:
    """The result is written to redis just after its clients are told it is done: wait for it to land."""
    client, deadline = redis.Redis.from_url(url), time.monotonic() + timeout
    while not client.exists(result_cache.redis_key(gen.key)):
        assert time.monotonic() < deadline, "result never reached redis"
        time.sleep(0.01)


def counter(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def fleet(tiny_export, redis_server):  # noqa: F811
    a, ma = make_node(tiny_export, redis_server.url)
    b, mb = make_node(tiny_export, redis_server.url)
    try:
        yield (a, ma), (b, mb), redis_server
    finally:
        a.close()
        b.close()


def test_identical_request_on_another_node_is_answered_once(fleet):
    (a, ma), (b, mb), server = fleet
    warm_a, warm_b = (counter(m, "textmill_tokens_generated_total", model=MODEL) for m in (ma, mb))  # warm-up tokens
    first = generate(a, "This package", seed=7)
    assert counter(ma, "textmill_tokens_generated_total", model=MODEL) > warm_a
    wait_shared(server.url, first)
    again = generate(b, "This package", seed=7)
    assert (again.text, again.tokens, again.finish_reason) == (first.text, first.tokens, first.finish_reason)
    assert counter(mb, "textmill_tokens_generated_total", model=MODEL) == warm_b   # node b generated nothing
    assert counter(mb, "textmill_dedup_hits_total", model=MODEL, kind="shared") == 1
    generate(b, "This package", seed=7)                                         # now in b's own LRU: no redis trip
    assert counter(mb, "textmill_dedup_hits_total", model=MODEL, kind="cache") == 1


def test_different_seed_or_prompt_is_not_shared(fleet):
    (a, _), (b, mb), server = fleet
    warm_b = counter(mb, "textmill_tokens_generated_total", model=MODEL)
    wait_shared(server.url, generate(a, "The licence", seed=1))
    generate(b, "The licence", seed=2)
    generate(b, "The license", seed=1)
    assert counter(mb, "textmill_dedup_hits_total", model=MODEL, kind="shared") == 0
    assert counter(mb, "textmill_tokens_generated_total", model=MODEL) > warm_b


def test_results_expire_with_cache_ttl(tiny_export, redis_server):  # noqa: F811
    node, _ = make_node(tiny_export, redis_server.url, ttl=42.0)
    try:
        gen = generate(node, "Once upon a time", seed=3)
        wait_shared(redis_server.url, gen)
        client = redis.Redis.from_url(redis_server.url)
        key = result_cache.redis_key(gen.key)
        assert 0 < client.pttl(key) <= 42_000
        assert [s[0] for s in json.loads(client.get(key))["steps"]] == [s.token for s in gen.steps]
    finally:
        node.close()


def test_redis_outage_falls_back_to_generating(fleet, caplog):
    (a, _), (b, mb), server = fleet
    warm_b = counter(mb, "textmill_tokens_generated_total", model=MODEL)
    server.stop()
    gen = generate(a, "Serving nodes pull", seed=5)     # write fails: logged, request still answered
    assert gen.finish_reason in ("stop", "length")
    generate(b, "Serving nodes pull", seed=5)           # read fails: a miss, b generates itself
    assert counter(mb, "textmill_tokens_generated_total", model=MODEL) > warm_b
    assert "serving from this node alone" in caplog.text


def test_garbage_under_a_key_is_a_miss(fleet):
    (a, _), (b, mb), server = fleet
    worker = b.worker(MODEL)
    params = SamplingParams(max_tokens=12, seed=9)
    key = (MODEL, VERSION, tuple(worker.encode("The quick")), params)
    redis.Redis.from_url(server.url).set(result_cache.redis_key(key), b"{not json")
    generate(b, "The quick", seed=9)
    assert counter(mb, "textmill_dedup_hits_total", model=MODEL, kind="shared") == 0


def test_cache_url_default_is_node_local_and_bad_schemes_are_refused():
    assert ServingConfig().cache_url == ""
    assert isinstance(result_cache.from_url("", 4, 1.0), result_cache.LocalCache)
    assert not isinstance(result_cache.from_url("", 4, 1.0), result_cache.RedisCache)
    for bad in ("http://cache:6379", "memcached://x", "localhost:6379"):
        with pytest.raises(UserError, match="serving.cache_url"):
            settings.validate(ServingConfig(cache_url=bad))
    assert settings.validate(ServingConfig(cache_url="rediss://cache.internal:6380/1")).cache_url.startswith("rediss")
