"""Issue 9, serving HTTP layer: bounded memory and connections, no input becomes a 500/traceback/dropped socket, auth.

One real `textmill serve` subprocess under an open-files limit of 256 (so the fd-derived connection cap is 128) with
short timeouts, driven by raw sockets, httpx, the openai SDK and a WebSocket client; plus the same app and uvicorn
config in-process over an engine that fails, for the 500 path."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from textmill.serving import settings as node_settings
from textmill.serving.app import ServingState
from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.metrics import Metrics
from tests.fixtures.server import API_KEY, AppServer, ServeProcess
from textmill.config import ServingConfig
from textmill.errors import UserError
from textmill.registry import Registry

MODEL = "tiny"
OPEN_FILES = 256                 # the server's RLIMIT_NOFILE: 256 - FD_RESERVE (128) = 128 sockets
MAX_BODY = 65536
HEADER_TIMEOUT = KEEP_ALIVE = BODY_TIMEOUT = WS_IDLE = 1.5
MAX_WEBSOCKETS = 8
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_export):
    root = str(tmp_path_factory.mktemp("registry") / "bucket")
    Registry(root).publish(MODEL, tiny_export, metrics={"val_loss": 5.0}, provenance={"test": True}, progress=False)
    env = {"TEXTMILL_MAX_BODY_BYTES": str(MAX_BODY), "TEXTMILL_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
           "TEXTMILL_KEEP_ALIVE_TIMEOUT": str(KEEP_ALIVE), "TEXTMILL_BODY_TIMEOUT": str(BODY_TIMEOUT),
           "TEXTMILL_WS_IDLE_TIMEOUT": str(WS_IDLE), "TEXTMILL_MAX_WEBSOCKETS": str(MAX_WEBSOCKETS),
           "TEXTMILL_POLL_INTERVAL": "0.5"}  # the sync loop keeps polling through the floods below
    proc = ServeProcess(root, tmp_path_factory.mktemp("node"), env=env, models=MODEL, open_files=OPEN_FILES)
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()   # nothing below may become a traceback in the node's log


def ws_url(server, model: str = MODEL) -> str:
    return server.url.replace("http", "ws") + f"/v1/stream/{model}"


def ws_connect(server, **kw):
    return connect(ws_url(server), additional_headers={"Authorization": f"Bearer {API_KEY}"}, **kw)


def raw_request(server, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh socket, then read until the server closes it (or read_timeout passes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def status_and_json(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def assert_openai_error(body: dict, code: str | None = None) -> dict:
    assert set(body) == {"error"} and OPENAI_ERROR_KEYS <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def complete(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json={"model": MODEL, "max_tokens": 2, **body},
                      headers=server.headers(), timeout=30)


# --- 2. bounded memory: request bodies ------------------------------------------------------------------------------

def test_content_length_over_limit_is_413_before_the_body_is_read(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {200 * 2**20}\r\n\r\n").encode()
    started = time.monotonic()
    status, body = status_and_json(raw_request(server, head + b'{"model": "tiny", "prompt": "'))
    assert status == 413 and time.monotonic() - started < 5  # answered without waiting for 200 MB
    assert str(MAX_BODY) in assert_openai_error(body, "request_too_large")["message"]


def test_chunked_body_over_limit_is_413_as_soon_as_it_passes(server):
    chunk = b'{"model": "tiny", "prompt": "' + b"a" * (MAX_BODY + 1024)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    # the body is never finished (no last chunk): the answer cannot have waited for it
    status, body = status_and_json(raw_request(server, head + b"%x\r\n" % len(chunk) + chunk + b"\r\n"))
    assert status == 413 and assert_openai_error(body, "request_too_large")


def test_prompt_over_the_body_limit_via_openai_sdk_is_413(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="x" * (2 * MAX_BODY), max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_big_bodies_do_not_grow_memory_or_stall_live(server):
    """Four clients each stream 48 MB; before the limit the node buffered and parsed all of it."""
    before = rss_bytes(server.proc.pid)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n" % (1 << 20) + b'{"x": "'.ljust(1 << 20, b"a") + b"\r\n"

    def push() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            try:
                s.sendall(head)
                for _ in range(48):
                    s.sendall(chunk)
            except OSError:
                pass  # refused and closed by the node: what this test wants

    live_s = []
    with ThreadPoolExecutor(4) as pool:
        pushes = [pool.submit(push) for _ in range(4)]
        for _ in range(5):
            started = time.monotonic()
            assert httpx.get(server.url + "/live", timeout=10).status_code == 200
            live_s.append(time.monotonic() - started)
        [p.result() for p in pushes]
    assert rss_bytes(server.proc.pid) - before < 40 * 2**20
    assert max(live_s) < 1.0, live_s
    assert server.metric("textmill_limit_hits_total", limit="max_body_bytes") >= 4


def test_client_leaving_mid_body_is_499_not_a_traceback(server):
    before = server.metric("textmill_requests_total", endpoint="/v1/completions", status="499")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                  f"Content-Length: 500\r\n\r\n{{\"model\": \"tiny\", ".encode())
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while server.metric("textmill_requests_total", endpoint="/v1/completions", status="499") == before:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert server.metric("textmill_internal_errors_total") == 0


def test_slow_body_gets_408(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    started = time.monotonic()
    status, body = status_and_json(raw_request(server, head + b'{"model":'))
    assert status == 408 and assert_openai_error(body, "body_timeout")
    assert BODY_TIMEOUT - 0.2 < time.monotonic() - started < BODY_TIMEOUT + 3


# --- 2. bounded connections -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"GET /live HTTP/1.1\r\nHost: x\r\n", b"POST /v1/completions HTTP/1.1\r\nHo"])
def test_incomplete_headers_get_408_after_header_timeout(server, sent):
    started = time.monotonic()
    status, body = status_and_json(raw_request(server, sent))
    assert status == 408 and assert_openai_error(body, "header_timeout")
    assert HEADER_TIMEOUT - 0.2 < time.monotonic() - started < HEADER_TIMEOUT + 3


def test_oversized_request_head_is_refused_without_buffering_it(server):
    """h11 holds at most 16 KiB of a request head still arriving (uvicorn h11_max_incomplete_event_size), so an endless
    header line or URL is a 400 after 16 KiB, not a growing buffer."""
    for head in (b"GET /live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000, b"GET /" + b"a" * 40_000):
        started = time.monotonic()
        assert raw_request(server, head).startswith(b"HTTP/1.1 400")
        assert time.monotonic() - started < HEADER_TIMEOUT  # refused for its size, not timed out


def test_silent_and_kept_alive_sockets_are_closed(server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # connects, never sends a byte
        assert status_and_json(read_all(s))[0] == 408
    assert time.monotonic() - started < HEADER_TIMEOUT + 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # one request, then idle
        s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        data = read_all(s)
        assert data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1  # closed silently, no 408
    assert time.monotonic() - started < KEEP_ALIVE + 3


def test_socket_flood_under_low_open_files_limit_keeps_live_completion_and_sync(server):
    """More slow-header, silent and idle WebSocket sockets than the node has file descriptors (256): before the cap the
    node hit EMFILE, `/live` was reset and the sync loop failed."""
    sync_failures = server.metric("textmill_sync_failures_total")
    socks, sockets_ws = [], []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if i % 3 == 1:
                s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
            elif i % 3 == 2:  # never finishes its body
                s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                          f"Content-Length: 1000\r\n\r\n{{\"model\":".encode())
            socks.append(s)
        refused = 0
        for _ in range(MAX_WEBSOCKETS + 4):
            ws = ws_connect(server)
            sockets_ws.append(ws)
        for ws in sockets_ws[MAX_WEBSOCKETS:]:
            msg = json.loads(ws.recv(timeout=10))
            refused += msg["error"]["code"] == "too_many_websockets"
        assert refused == 4
        for _ in range(3):
            live = httpx.get(server.url + "/live", timeout=5)
            assert live.status_code == 200 and live.json()["status"] == "ok"
        ok = complete(server, prompt="still serving", max_tokens=3)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert server.open_fds() < OPEN_FILES - 64
        time.sleep(1.2)  # two more sync polls, with the flood still open
        assert server.metric("textmill_sync_failures_total") == sync_failures
        assert server.metric("textmill_limit_hits_total", limit="idle_evicted") > 0
        assert "EMFILE" not in server.log() and "Too many open files" not in server.log()
    finally:
        for s in socks:
            s.close()
        for ws in sockets_ws:
            ws.close()


def test_slow_body_flood_keeps_live(server):
    """Sockets that finished their headers but never their bodies are not idle; over the cap they are closed oldest
    first, so `/live` still gets a socket within body_timeout."""
    socks = []
    try:
        for _ in range(OPEN_FILES - 128 + 40):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                      f"Content-Length: 1000\r\n\r\n{{".encode())
            socks.append(s)
        started = time.monotonic()
        assert httpx.get(server.url + "/live", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0
        assert server.metric("textmill_limit_hits_total", limit="slow_body_evicted") > 0
    finally:
        for s in socks:
            s.close()


def test_connection_cap_follows_the_open_files_limit(server):
    limits = httpx.get(server.url + "/info", headers=server.headers(), timeout=10).json()["limits"]
    assert limits["max_connections"] == OPEN_FILES - 128
    assert limits["max_websockets"] == MAX_WEBSOCKETS and limits["max_body_bytes"] == MAX_BODY


def test_websocket_idle_timeout_and_message_size(server):
    with ws_connect(server) as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=WS_IDLE + 5)
        assert closed.value.rcvd.code == 1000 and "idle" in closed.value.rcvd.reason
        assert WS_IDLE - 0.2 < time.monotonic() - started < WS_IDLE + 3
    with ws_connect(server) as ws:  # a socket in use is not idle
        for _ in range(3):
            time.sleep(WS_IDLE * 0.6)
            ws.send(json.dumps({"prompt": "The", "max_tokens": 2}))
            while json.loads(ws.recv(timeout=20)).get("type") == "update":
                pass
    with ws_connect(server) as ws:
        ws.send(json.dumps({"prompt": "x" * (MAX_BODY + 1)}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009  # message too big, with a close frame


# --- 3. no input becomes a 500, a traceback or a dropped socket -----------------------------------------------------

BAD_BODIES = {
    "lone surrogate": b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}',
    "lone low surrogate in a list": b'{"model": "tiny", "prompt": ["ok", "\\udc00x"], "max_tokens": 2}',
    "invalid UTF-8": b'{"model": "tiny", "prompt": "\xff\xfe", "max_tokens": 2}',
    "30,000-deep nesting": b'{"model": "tiny", "prompt": "x", "extra": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "5,000-digit integer": b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "NaN": b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
    "not an object": b'["tiny", "x"]',
    "empty body": b"",
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_json_bodies_are_openai_400(server, name):
    r = httpx.post(server.url + "/v1/completions", content=BAD_BODIES[name], timeout=30,
                   headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert_openai_error(r.json(), "invalid_json")
    assert r.headers["x-request-id"].startswith("req_")


def test_invalid_utf8_is_named_as_such_not_as_a_surrogate(server):
    r = httpx.post(server.url + "/v1/completions", content=BAD_BODIES["invalid UTF-8"], timeout=30,
                   headers={**server.headers(), "Content-Type": "application/json"})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "not valid UTF-8" in message and "0xff at offset 29" in message, message
    assert "surrogate" not in message, message


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46])
def test_top_p_below_float32_range_is_greedy_not_a_500(server, top_p):
    """top_p under float32's smallest value once dropped every token (NaN probabilities) and failed the whole batch."""
    body = {"prompt": "The quick", "max_tokens": 6, "stop": [f"\x00{top_p}"]}  # own cache key per case
    tiny = complete(server, top_p=top_p, seed=3, **body)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == complete(server, temperature=0, **body).json()["choices"][0]["text"]


@pytest.mark.parametrize("method, path, status, code", [
    ("GET", "/nope", 404, "not_found"), ("POST", "/v1/embeddings", 404, "not_found"),
    ("POST", "/v1/completions/", 404, "not_found"), ("GET", "/v1/models/", 404, "not_found"),
    ("GET", "/v1/completions", 405, "method_not_allowed"), ("DELETE", "/live", 405, "method_not_allowed"),
])
def test_routing_errors_are_openai_shaped(server, method, path, status, code):
    r = httpx.request(method, server.url + path, headers=server.headers(), timeout=10)
    assert r.status_code == status and "detail" not in r.json()
    assert path in assert_openai_error(r.json(), code)["message"]


WS_BAD_MESSAGES = {
    "binary frame": (b"\x00\x01\x02", "invalid_frame"),
    "binary frame holding JSON": (b'{"prompt": "x"}', "invalid_frame"),
    "30,000-deep nesting": ('{"prompt": "x", "n": ' + "[" * 30_000 + "]" * 30_000 + "}", "invalid_json"),
    "5,000-digit integer": ('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", "invalid_json"),
    "lone surrogate": ('{"prompt": "\\ud800", "max_tokens": 2}', "invalid_json"),
    "Infinity": ('{"prompt": "x", "top_p": Infinity}', "invalid_json"),
    "a JSON string": ('"just a prompt"', "invalid_json"),
}


def test_websocket_bad_messages_get_errors_and_the_socket_stays_usable(server):
    with ws_connect(server) as ws:
        for name, (message, code) in WS_BAD_MESSAGES.items():
            ws.send(message)
            err = json.loads(ws.recv(timeout=10))["error"]
            assert err["code"] == code and err["status"] == 400, (name, err)
            ws.send(json.dumps({"prompt": "The", "max_tokens": 3, "seed": 1}))
            while (msg := json.loads(ws.recv(timeout=20)))["type"] == "update":
                pass
            assert msg["type"] == "done" and msg["usage"]["completion_tokens"] == 3, name


class FailingEngine(Engine):
    """A real Engine whose model table breaks: stands for any unexpected exception inside a route."""

    def models(self):
        raise RuntimeError("model table corrupted")

    def worker(self, model: str):
        raise RuntimeError("model table corrupted")


@pytest.fixture(scope="module")
def failing_app():
    import torch

    metrics = Metrics()
    engine = FailingEngine(EngineOptions(device="cpu", cpu_threads=torch.get_num_threads()), metrics)
    state = ServingState(engine, ServingConfig(api_keys=[API_KEY]), metrics, expected=[MODEL])
    with AppServer(state) as app:
        app.state = state
        yield app


@pytest.mark.parametrize("path", ["/v1/models", "/info"])
def test_unexpected_exception_is_openai_500_with_request_id(failing_app, path, caplog):
    with caplog.at_level(logging.ERROR, logger="textmill.serving.app"):
        r = httpx.get(failing_app.url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    err = assert_openai_error(r.json(), "internal_error")
    request_id = r.headers["x-request-id"]
    assert err["type"] == "server_error" and request_id in err["message"] and "corrupted" not in err["message"]
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and logged[0].exc_info and "model table corrupted" in str(logged[0].exc_info[1])
    assert failing_app.state.metrics.internal_errors.labels(path)._value.get() >= 1


DEEP = "[" * 100_000 + "]" * 100_000   # 200 kB: over the test server's body limit, so sent where the default 1 MiB holds


def test_100000_deep_json_is_400_on_http_and_websocket(failing_app):
    """Decoding comes before the engine, so the app over a failing engine answers these exactly like a healthy one."""
    r = httpx.post(failing_app.url + "/v1/completions", content='{"model": "tiny", "prompt": "x", "x": ' + DEEP + "}",
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400 and assert_openai_error(r.json(), "invalid_json")
    url = failing_app.url.replace("http", "ws") + f"/v1/stream/{MODEL}"
    with connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        for message in (DEEP, '{"prompt": ' + DEEP + "}", DEEP):
            ws.send(message)
            err = json.loads(ws.recv(timeout=10))["error"]
            assert err["code"] == "invalid_json" and "depth" in err["message"]


def test_unexpected_exception_on_websocket_is_an_error_message(failing_app):
    url = failing_app.url.replace("http", "ws") + f"/v1/stream/{MODEL}"
    with connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"}) as ws:
        for _ in range(2):  # the socket survives the first failure
            ws.send(json.dumps({"prompt": "x"}))
            err = json.loads(ws.recv(timeout=10))["error"]
            assert err["status"] == 500 and err["code"] == "internal_error" and "req_" in err["message"]
    assert failing_app.state.metrics.internal_errors.labels("/v1/stream")._value.get() >= 2


# --- 4. auth --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_value", ["", " ", "good-key,", "good-key,,other", "good-key, \t"])
def test_blank_api_key_from_env_is_refused_at_load(env_value):
    args = argparse.Namespace(params=None, overrides=[], root="bucket")
    with pytest.raises(UserError, match=r"api_keys\[\d\] is empty or blank"):
        node_settings.load(args, env={"TEXTMILL_API_KEYS": env_value})


@pytest.mark.parametrize("keys, match", [([""], "empty or blank"), (["  "], "empty or blank"),
                                         (["has space"], "spaces"), (["clé"], "non-ASCII"),
                                         (["good-key\n"], "control")])
def test_bad_api_keys_from_config_are_refused(keys, match):
    with pytest.raises(UserError, match=match):
        node_settings.validate(ServingConfig(api_keys=keys))
    assert node_settings.validate(ServingConfig(api_keys=["k1", "k2"])).api_keys == ["k1", "k2"]


def test_serve_with_blank_key_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from textmill.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEXTMILL_API_KEYS", " ")
    assert main(["serve", "--root", str(tmp_path / "bucket")]) == 2
    err = capsys.readouterr().err
    assert "api_keys[0] is empty or blank" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("name, value", [("POLL_INTERVAL", "nan"), ("POLL_INTERVAL", "inf"), ("POLL_INTERVAL", "1e300"),
                                         ("POLL_INTERVAL", "0"), ("POLL_INTERVAL", "-5"), ("POLL_JITTER", "nan"),
                                         ("DRAIN_TIMEOUT", "nan"), ("DRAIN_TIMEOUT", "-1"), ("DRAIN_TIMEOUT", "inf")])
def test_timings_that_no_loop_can_wait_for_are_refused_at_load(name, value):
    """NaN made the sync loop poll the bucket without pause (Event.wait(nan) returns at once: a core spent on polling),
    inf/1e300 killed the sync thread with an OverflowError traceback, a NaN or negative drain timeout cut every
    in-flight request off at SIGTERM. Each is refused when settings load, naming the setting."""
    args = argparse.Namespace(params=None, overrides=[], root="bucket")
    with pytest.raises(UserError, match=f"serving.{name.lower()}={value if value != '1e300' else '1e[+]300'}"):
        node_settings.load(args, env={f"TEXTMILL_{name}": value})


def test_serve_with_a_nan_poll_interval_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from textmill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--root", str(tmp_path / "bucket"), "--poll-interval", "nan"]) == 2
    err = capsys.readouterr().err
    assert "serving.poll_interval=nan" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_info_needs_a_key_probes_stay_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}, {"Authorization": API_KEY}):
        r = httpx.get(server.url + "/info", headers=headers, timeout=10)
        assert r.status_code == 401 and assert_openai_error(r.json(), "invalid_api_key")
    assert httpx.get(server.url + "/info", headers=server.headers(), timeout=10).status_code == 200
    assert httpx.get(server.url + "/live", timeout=10).status_code == 200
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    assert "textmill_requests_total" in httpx.get(server.url + "/metrics", timeout=10).text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"},
                                     {"Authorization": API_KEY}])
def test_websocket_handshake_with_bad_key_is_403_as_documented(server, headers):
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(server), additional_headers=headers, open_timeout=10)
    assert e.value.response.status_code == 403
