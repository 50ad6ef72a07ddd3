"""The serving API end to end: a real `textmill serve` subprocess (uvicorn on 127.0.0.1) over a local registry, driven by
the official openai SDK, httpx and a WebSocket client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.fixtures.server import API_KEY, REPO, ServeProcess
from textmill.registry import Registry

MODEL = "tiny"
OOM_MARKER = "__inject_oom__"
STREAM_EVERY = 4
MAX_QUEUE = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_export):
    root = str(tmp_path_factory.mktemp("registry") / "bucket")
    result = Registry(root).publish(MODEL, tiny_export, metrics={"val_loss": 5.0}, provenance={"test": True},
                                    progress=False)
    env = {"TEXTMILL_STREAM_EVERY": str(STREAM_EVERY), "TEXTMILL_MAX_QUEUE": str(MAX_QUEUE)}
    proc = ServeProcess(root, tmp_path_factory.mktemp("node"), env=env,
                        hooks={"HOOK_STEP_DELAY": "0.01", "HOOK_OOM_PROMPT": OOM_MARKER})
    try:
        proc.wait_ready()
        proc.published = result.version
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def complete(server, timeout: float = 30.0, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, headers=server.headers(),
                      timeout=timeout)


def test_openai_sdk_non_stream(server, client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The quick brown", max_tokens=8, seed=3)
    resp = raw.parse()
    assert raw.headers["x-textmill-model-version"] == server.published
    assert resp.model == MODEL and resp.model_extra["model_version"] == server.published
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].text
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 0


def test_openai_sdk_stream_matches_non_stream(server, client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=11,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.model_extra["model_version"] == server.published for c in chunks)
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=11)
    assert again.choices[0].text == text


def test_prompt_list_and_n(server, client):
    resp = client.completions.create(model=MODEL, prompt=["The", "This package"], n=2, max_tokens=6, seed=5)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    # n>1 draws differ (seed, seed+1); the same seed on another prompt is a different sequence too
    assert len({c.text for c in resp.choices}) == 4
    assert resp.usage.completion_tokens == 24


def test_models_info_live_ready(server):
    models = httpx.get(server.url + "/v1/models", headers=server.headers()).json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["version"] == server.published
    info = httpx.get(server.url + "/info", headers=server.headers()).json()
    tiny = info["models"][MODEL]
    assert tiny["version"] == server.published and tiny["n_ctx"] == 256 and tiny["device"] == "cpu"
    assert {f["path"] for f in tiny["files"]} >= {"model.safetensors", "config.json"}
    assert all(len(f["sha256"]) == 64 for f in tiny["files"])
    assert info["limits"]["max_queue"] == MAX_QUEUE
    live = httpx.get(server.url + "/live").json()
    assert live["status"] == "ok" and live["models"][MODEL]["worker_alive"] and live["devices"] == {"cpu": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["ready"] and ready["models"][MODEL]["forward_ok"]


def test_seed_determinism_regardless_of_batching(server):
    # Distinct never-matching stop strings make distinct cache keys for the same token sequence.
    probe = {"prompt": "Serving nodes pull", "max_tokens": 20, "temperature": 1.0, "seed": 7}
    alone = complete(server, **probe, stop=["\x00never-a"]).json()["choices"][0]["text"]
    before = server.metric("textmill_batch_size_bucket", le="8.0") - server.metric("textmill_batch_size_bucket", le="4.0")
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(complete, server, prompt="The", max_tokens=40, seed=1)
        time.sleep(0.1)  # the blocker runs; the 8 prompts below queue up behind it and form one batch
        prompts = ["The quick", "This package", "Permission is", probe["prompt"], "Once", "A", "B", "C"]
        batched = complete(server, prompt=prompts, max_tokens=20, temperature=1.0, seed=7, stop=["\x00never-b"]).json()
        assert blocker.result().status_code == 200
    after = server.metric("textmill_batch_size_bucket", le="8.0") - server.metric("textmill_batch_size_bucket", le="4.0")
    assert after > before, "the 8 prompts were not batched together"
    assert batched["choices"][3]["text"] == alone
    other_seed = complete(server, **{**probe, "seed": 8}).json()["choices"][0]["text"]
    assert other_seed != alone


def test_identical_requests_share_one_generation_and_cache(server):
    body = {"prompt": "Dedup me please", "max_tokens": 30, "seed": 99}
    tokens_before = server.metric("textmill_tokens_generated_total")
    hits_before = server.metric("textmill_dedup_hits_total")
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: complete(server, **body).json()["choices"][0]["text"], range(4)))
    assert len(set(texts)) == 1
    assert server.metric("textmill_dedup_hits_total") - hits_before == 3
    assert server.metric("textmill_tokens_generated_total") - tokens_before == 30  # generated once, not four times
    cached = complete(server, **body).json()["choices"][0]["text"]
    assert cached == texts[0]
    assert server.metric("textmill_dedup_hits_total", kind="cache") >= 1
    assert server.metric("textmill_tokens_generated_total") - tokens_before == 30


def test_stop_strings(server):
    free = complete(server, prompt="The", max_tokens=30, temperature=0).json()["choices"][0]["text"]
    stop = free[5:8]
    cut = complete(server, prompt="The", max_tokens=30, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free[:free.index(stop)]


def test_error_codes(server):
    too_long = complete(server, prompt="The " * 50, max_tokens=250)
    assert too_long.status_code == 400
    err = too_long.json()["error"]
    assert "256" in err["message"] and "250" in err["message"] and err["param"] == "max_tokens"
    assert too_long.headers["x-textmill-model-version"] == server.published
    bad_json = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=server.headers())
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    bad_type = complete(server, prompt="x", max_tokens="lots")
    assert bad_type.status_code == 422 and bad_type.json()["error"]["param"] == "max_tokens"
    bad_temp = complete(server, prompt="x", temperature=7)
    assert bad_temp.status_code == 422 and bad_temp.json()["error"]["param"] == "temperature"
    unsupported = complete(server, prompt="x", presence_penalty=0.5)
    assert unsupported.status_code == 422 and "not supported" in unsupported.json()["error"]["message"]
    too_many_logprobs = complete(server, prompt="x", logprobs=21)
    assert too_many_logprobs.status_code == 422 and too_many_logprobs.json()["error"]["param"] == "logprobs"
    unknown = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=server.headers())
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        denied = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"


def test_openai_sdk_maps_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).completions.create(model=MODEL, prompt="x")


def test_out_of_memory_is_503_then_recovers(server):
    before = server.metric("textmill_out_of_memory_total")
    oom = complete(server, prompt=f"please {OOM_MARKER}", max_tokens=5)
    assert oom.status_code == 503 and oom.json()["error"]["code"] == "out_of_memory"
    streamed = complete(server, prompt=f"{OOM_MARKER} again", max_tokens=5, stream=True)
    assert streamed.status_code == 503
    assert server.metric("textmill_out_of_memory_total") - before == 2
    ok = complete(server, prompt="please go on", max_tokens=5)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5


def test_queue_full_is_429_with_retry_after(server):
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(complete, server, prompt="Blocker", max_tokens=80, seed=123)
        time.sleep(0.2)
        # 7 of these join the running batch (max_batch_size 8), the other 9 wait in the queue
        filler = pool.submit(complete, server, prompt=[f"fill {i}" for i in range(MAX_QUEUE)], max_tokens=60, seed=5)
        time.sleep(0.2)
        refused = complete(server, prompt=[f"more {i}" for i in range(MAX_QUEUE)], max_tokens=4)
        assert blocker.result().status_code == 200 and filler.result().status_code == 200
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"


def test_client_disconnect_cancels_generation(server):
    cancelled = server.metric("textmill_cancelled_total")
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers(), timeout=30,
                      json={"model": MODEL, "prompt": "Go on forever", "max_tokens": 240, "stream": True}) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: {") for line in seen)
    deadline = time.monotonic() + 5
    while server.metric("textmill_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("textmill_cancelled_total") == cancelled + 1
    tokens = server.metric("textmill_tokens_generated_total")
    time.sleep(0.3)  # at 10 ms a step, a generation still running would add ~30 tokens here
    assert server.metric("textmill_tokens_generated_total") == tokens


def ws_connect(server, **kw):
    return connect(server.url.replace("http", "ws") + f"/v1/stream/{MODEL}",
                   additional_headers={"Authorization": f"Bearer {API_KEY}"}, **kw)


def test_websocket_updates_errors_and_reuse(server):
    with ws_connect(server) as ws:
        ws.send(json.dumps({"prompt": "The quick", "max_tokens": 18, "seed": 4}))
        updates = []
        while (msg := json.loads(ws.recv(timeout=20)))["type"] == "update":
            updates.append(msg)
        assert msg["type"] == "done" and msg["finish_reason"] == "length"
        assert msg["version"] == server.published and msg["usage"]["completion_tokens"] == 18
        assert "".join(u["text"] for u in updates) == msg["text"]
        marks = [0] + [u["tokens"] for u in updates[:-1]]  # the last update flushes at the end
        assert all(b - a >= STREAM_EVERY for a, b in zip(marks, marks[1:]))
        assert len(updates) >= 3  # every 4 tokens, not one message at the end
        ws.send("{broken")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"prompt": "x", "top_p": 3}))
        err = json.loads(ws.recv(timeout=10))["error"]
        assert err["param"] == "top_p" and err["status"] == 422
        ws.send(json.dumps({"prompt": "The quick", "max_tokens": 18, "seed": 4}))  # same request: same text
        while (again := json.loads(ws.recv(timeout=20)))["type"] == "update":
            pass
        assert again["text"] == msg["text"]
    with pytest.raises(InvalidStatus):
        connect(server.url.replace("http", "ws") + f"/v1/stream/{MODEL}").recv(timeout=5)


def test_websocket_disconnect_cancels_generation(server):
    cancelled = server.metric("textmill_cancelled_total")
    with ws_connect(server) as ws:
        ws.send(json.dumps({"prompt": "Talk to me for a long time", "max_tokens": 240}))
        assert json.loads(ws.recv(timeout=20))["type"] == "update"
    deadline = time.monotonic() + 5
    while server.metric("textmill_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("textmill_cancelled_total") == cancelled + 1


def test_metrics_exposed(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("textmill_requests_total", "textmill_request_seconds_bucket", "textmill_time_to_first_token_seconds",
                 "textmill_tokens_generated_total", "textmill_queue_depth", "textmill_model_version_info"):
        assert name in text, name
    assert server.metric("textmill_model_version_info", model=MODEL, version=server.published) == 1
    assert server.metric("textmill_requests_total", endpoint="/v1/completions", status="200") > 0
    assert "textmill_gpu" not in text  # no GPU on this host: no NVML gauges


def test_serving_never_imports_tensorflow():
    code = ("import sys; import textmill.serving.daemon, textmill.serving.app, textmill.serving.sync, textmill.serving.engine, textmill.serving.metrics; "
            "from textmill.serving.app import create_app; assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_values_that_would_break_a_shared_batch_are_refused_or_safe(server):
    # Once, seed=2**70 overflowed torch's int64 seed inside the batch and failed every request batched with it.
    big_seed = complete(server, prompt="The", max_tokens=2, seed=2**70)
    assert big_seed.status_code == 422 and big_seed.json()["error"]["param"] == "seed"
    # ... and a tiny temperature overflowed logits / T to inf; it is greedy now.
    tiny_t = complete(server, prompt="The", max_tokens=4, temperature=1e-40)
    greedy = complete(server, prompt="The", max_tokens=4, temperature=0)
    assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.mark.parametrize("field, value", [("logit_bias", {"50": 100}), ("presence_penalty", 1.0),
                                          ("frequency_penalty", 0.5)])
def test_unimplemented_openai_knobs_are_refused_not_ignored(server, field, value):
    r = complete(server, prompt="The", max_tokens=2, **{field: value})
    assert r.status_code == 422 and r.json()["error"]["param"] == field


def test_oversized_prompts_are_refused_before_tokenizing(server):
    start = time.perf_counter()
    r = complete(server, prompt="word " * 20_000, max_tokens=2)  # 100 kB: under the body limit, over 256 x 64 chars
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - start < 5
    many = complete(server, prompt=["a"] * (MAX_QUEUE + 1), max_tokens=1)
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_prompts"
