"""The writing playground at `/`, in a real browser: headless Chromium from the system (Debian's package, never a
downloaded build) driven by Playwright's Python API, against a real `textmill serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.fixtures.server import API_KEY, REPO, ServeProcess
from textmill.registry import Registry

MODEL = "tiny"
N_CTX = 256  # tests/fixtures/models.py
STATIC = REPO / "serving" / "static"
EXPECT_TIMEOUT_MS = 20_000

expect.set_options(timeout=EXPECT_TIMEOUT_MS)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no system Chromium: `apt-get install -y chromium` (.ci/run installs it when missing)"
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_export):
    root = str(tmp_path_factory.mktemp("registry") / "bucket")
    version = Registry(root).publish(MODEL, tiny_export, metrics={"val_loss": 5.0}, provenance={"test": True},
                                     progress=False).version
    # One sequence at a time and one waiting: two background requests make the page's third a 429.
    env = {"TEXTMILL_STREAM_EVERY": "2", "TEXTMILL_MAX_BATCH_SIZE": "1", "TEXTMILL_MAX_QUEUE": "1"}
    proc = ServeProcess(root, tmp_path_factory.mktemp("node"), env=env, hooks={"HOOK_STEP_DELAY": "0.01"})
    try:
        proc.wait_ready()
        proc.published = version
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A fresh browser context on the playground, recording console errors and every URL the page asks for."""

    def __init__(self, browser, server) -> None:
        self.context = browser.new_context(viewport={"width": 1000, "height": 760})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("websocket", lambda ws: self.urls.append(ws.url))
        self.page.goto(server.url + "/")

    def use_key(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#save-key")

    def write(self, text: str, *, length: int, seed: int | str = "", temperature: float | None = None) -> None:
        self.page.fill("#text", text)
        self.page.fill("#length", str(length))
        self.page.fill("#seed", str(seed))
        if temperature is not None:
            self.page.fill("#temperature", str(temperature))

    def done_meta(self) -> str:
        expect(self.page.locator("#meta")).to_contain_text("version")
        return self.page.text_content("#meta")


@pytest.fixture
def page(browser, server):
    p = Page(browser, server)
    try:
        yield p
    finally:
        p.context.close()


def as_textarea(text: str) -> str:
    """What a textarea holds after `text` is put in it: HTML normalises CR LF and lone CR to LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def ws_url(server) -> str:
    return server.url.replace("http", "ws") + f"/v1/stream/{MODEL}"


def ws_generate(ws, **body) -> dict:
    ws.send(json.dumps(body))
    while (msg := json.loads(ws.recv(timeout=30))).get("type") == "update":
        pass
    return msg


def wait_metric(server, name: str, target: float, timeout: float = 10.0, **labels) -> float:
    """Poll a server metric until it equals `target` (or the timeout passes); its last value."""
    deadline = time.monotonic() + timeout
    while (value := server.metric(name, **labels)) != target and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


# ---- the page in the browser ---------------------------------------------------------------------------------------

def test_page_streams_a_reproducible_suggestion_and_tab_accepts_it(page, server, tmp_path):
    p = page.page
    expect(p.locator("#key-row")).to_be_visible()  # the node has api_keys: the page asks for one
    expect(p.locator("#error-title")).to_have_text("API key needed.")
    page.use_key(API_KEY)
    expect(p.locator("#model option")).to_have_text([f"{MODEL} · {server.published}"])
    expect(p.locator("#model-version")).to_have_text(f"live version {server.published}")
    expect(p.locator("#error")).to_be_hidden()

    prompt = "The quick brown fox"
    page.write(prompt, length=24, seed=7, temperature=0.9)
    p.click("#continue")
    expect(p.locator("#stop")).to_be_enabled()  # while it streams
    meta = page.done_meta()
    suggestion = p.text_content("#suggestion-text")
    assert "seed 7 " in meta and f"version {server.published}" in meta and "24 tokens (length)" in meta
    assert int(p.get_attribute("#suggestion", "data-updates")) >= 6  # streamed every 2 tokens, not one final message
    assert p.input_value("#text") == prompt  # shown apart from the text until accepted
    with connect(ws_url(server), additional_headers=server.headers()) as ws:  # the shown seed reproduces it
        assert ws_generate(ws, prompt=prompt, max_tokens=24, seed=7, temperature=0.9)["text"] == suggestion
    http = httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=30,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "seed": 7, "temperature": 0.9})
    assert http.json()["choices"][0]["text"] == suggestion
    shot = tmp_path / "playground.png"
    p.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000

    p.focus("#text")
    p.keyboard.press("Tab")
    assert p.input_value("#text") == prompt + as_textarea(suggestion)
    expect(p.locator("#suggestion")).to_be_hidden()
    # a second suggestion with a random seed, accepted by a click, names its seed
    p.fill("#seed", "")
    p.click("#continue")
    expect(p.locator("#meta")).not_to_have_attribute("data-seed", "7")
    seed = int(p.get_attribute("#meta", "data-seed"))
    second = p.text_content("#suggestion-text")
    p.click("#suggestion")
    assert p.input_value("#text") == prompt + as_textarea(suggestion + second) and 0 <= seed < 2**32

    assert page.errors == []
    assert all(u.startswith((server.url, server.url.replace("http", "ws"))) for u in page.urls), page.urls
    assert p.evaluate("sessionStorage.getItem('textmill.apiKey')") == API_KEY
    assert p.evaluate("localStorage.length") == 0 and API_KEY not in " ".join(page.urls)


def test_stop_cancels_the_generation_on_the_server(page, server):
    p = page.page
    page.use_key(API_KEY)
    expect(p.locator("#continue")).to_be_enabled()
    page.write("Once upon a time", length=220)
    cancelled = server.metric("textmill_cancelled_total")
    p.click("#continue")
    expect(p.locator("#suggestion-text")).not_to_be_empty()
    p.click("#stop")
    assert wait_metric(server, "textmill_cancelled_total", cancelled + 1) == cancelled + 1
    expect(p.locator("#status")).to_contain_text("Stopped after")
    partial = p.text_content("#suggestion-text")
    p.wait_for_timeout(300)  # at 10 ms a step a running generation would add ~30 tokens here
    assert p.text_content("#suggestion-text") == partial and p.is_enabled("#continue") and not p.is_enabled("#stop")
    # the page reconnects for the next request
    page.write("Once upon a time", length=6, seed=3)
    p.click("#continue")
    assert "6 tokens (length)" in page.done_meta()
    assert page.errors == []


def test_suggest_as_i_pause_and_escape_dismisses(page, server):
    p = page.page
    page.use_key(API_KEY)
    expect(p.locator("#continue")).to_be_enabled()
    p.fill("#length", "5")
    p.fill("#seed", "11")
    p.check("#auto")
    p.click("#text")
    p.keyboard.type("Permission is", delay=20)  # no click on Continue: the pause asks for a suggestion
    expect(p.locator("#meta")).to_have_attribute("data-seed", "11")
    expect(p.locator("#suggestion")).to_be_visible()
    p.keyboard.press("Escape")
    expect(p.locator("#suggestion")).to_be_hidden()
    p.keyboard.type(" hereby")  # typing dismisses a stale suggestion and asks again after the pause
    p.fill("#seed", "12")
    expect(p.locator("#meta")).to_have_attribute("data-seed", "12")
    assert p.input_value("#text") == "Permission is hereby" and page.errors == []


def test_over_long_requests_show_the_context_error_with_both_numbers(page, server):
    p = page.page
    page.use_key(API_KEY)
    expect(p.locator("#continue")).to_be_enabled()
    for seed in ("-3", "1e30"):  # refused in the page, before a request: no rounding of what would be shown
        page.write("The quick", length=4, seed=seed)
        p.click("#continue")
        expect(p.locator("#error-title")).to_have_text("Seed not usable.")
        expect(p.locator("#stop")).to_be_disabled()
    cases = [  # (text, length, what the message must say)
        ("The quick brown fox jumps over the lazy dog. " * 40, 40, r"context length is 256 tokens\. However, you "
         r"requested (\d+) tokens \((\d+) in the prompt, 40 for the completion\)"),
        ("Once upon a time", 300, r"context length is 256 tokens\. However, you requested (\d+) tokens "
         r"\((\d+) in the prompt, 300 for the completion\)"),
        ("x" * (N_CTX * 64 + 1), 8, rf"context length is 256 tokens; a prompt of {N_CTX * 64 + 1} characters"),
    ]
    for text, length, pattern in cases:
        page.write(text, length=length, seed=1)
        p.click("#continue")
        expect(p.locator("#error-message")).to_have_text(re.compile(pattern))
        expect(p.locator("#error-title")).to_have_text("Prompt too long.")
        numbers = re.search(pattern, p.text_content("#error-message")).groups()
        if numbers:
            assert int(numbers[0]) > N_CTX and int(numbers[0]) == int(numbers[1]) + length
        expect(p.locator("#continue")).to_be_enabled()
    assert page.errors == []


def test_a_bad_key_shows_the_auth_error(page, server):
    p = page.page
    page.use_key("not-the-key")
    expect(p.locator("#error-title")).to_have_text("API key refused.")
    expect(p.locator("#error-message")).to_contain_text("Incorrect or missing API key")
    expect(p.locator("#model")).to_be_disabled()
    # the key is rotated on the server while the page holds a list: the refused socket handshake is explained too
    page.use_key(API_KEY)
    expect(p.locator("#continue")).to_be_enabled()
    p.evaluate("sessionStorage.setItem('textmill.apiKey', 'rotated-away')")
    page.write("The quick", length=4)
    p.click("#continue")
    expect(p.locator("#error-title")).to_have_text("API key refused.")
    expect(p.locator("#continue")).to_be_enabled()


def test_a_full_queue_shows_busy_and_retry_works(page, server):
    p = page.page
    page.use_key(API_KEY)
    expect(p.locator("#continue")).to_be_enabled()
    page.write("The quick brown", length=8, seed=5)
    with connect(ws_url(server), additional_headers=server.headers()) as running, \
            connect(ws_url(server), additional_headers=server.headers()) as waiting:
        running.send(json.dumps({"prompt": "Busy one", "max_tokens": 200, "seed": 1}))
        assert json.loads(running.recv(timeout=20))["type"] == "update"  # it runs (max_batch_size 1) ...
        waiting.send(json.dumps({"prompt": "Busy two", "max_tokens": 200, "seed": 2}))
        assert wait_metric(server, "textmill_queue_depth", 1, model=MODEL) == 1  # ... and this one waits (max_queue 1)
        p.click("#continue")
        expect(p.locator("#error-title")).to_have_text("Server busy.")
        expect(p.locator("#error-message")).to_contain_text("max_queue=1")
        expect(p.locator("#retry")).to_be_visible()
    # both left: their generations are cancelled and the queue empties; Retry sends the same request again
    assert wait_metric(server, "textmill_queue_depth", 0, model=MODEL) == 0
    p.click("#retry")
    assert "seed 5" in page.done_meta()
    expect(p.locator("#error")).to_be_hidden()
    assert page.errors == []


# ---- what the page relies on from the server -----------------------------------------------------------------------

def test_websocket_takes_the_key_as_a_subprotocol_and_echoes_the_seed(server):
    offer = ["textmill.v1", "textmill.bearer." + base64.urlsafe_b64encode(API_KEY.encode()).decode().rstrip("=")]
    with connect(ws_url(server), subprotocols=offer) as ws:
        assert ws.subprotocol == "textmill.v1"  # the key itself is never echoed
        assert ws_generate(ws, prompt="The quick", max_tokens=3)["seed"] == 42  # serving.default_seed
        pinned = ws_generate(ws, prompt="The quick", max_tokens=5, seed=9)
        assert pinned["seed"] == 9 and pinned["version"] == server.published
    with connect(ws_url(server), additional_headers=server.headers()) as ws:  # the header still works, same answer
        assert ws_generate(ws, prompt="The quick", max_tokens=5, seed=9)["text"] == pinned["text"]
    wrong = base64.urlsafe_b64encode(b"wrong").decode().rstrip("=")
    for bad in ([offer[0], "textmill.bearer." + wrong], [offer[0], "textmill.bearer.%%not-base64%%"],
                [offer[0], "textmill.bearer." + base64.urlsafe_b64encode(b"\xff\xfe").decode().rstrip("=")]):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url(server), subprotocols=bad).recv(timeout=5)
        assert refused.value.response.status_code == 403, bad


def test_page_and_assets_come_from_the_server_with_a_csp(server):
    index = httpx.get(server.url + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', index.text)
    assert sorted(assets) == ["static/favicon.svg", "static/playground.css", "static/playground.js"]
    for asset in assets:
        r = httpx.get(f"{server.url}/{asset}")
        assert r.status_code == 200 and r.text == (STATIC / Path(asset).name).read_text(encoding="utf-8")
    for f in STATIC.iterdir():  # nothing from a CDN: no absolute URL in any file but the SVG's XML namespace
        text = f.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(https?:)?//[\w.-]+\.\w+/", text), f.name
    assert httpx.get(server.url + "/static/../app.py").status_code == 404


# ---- last: it stops the module's server ----------------------------------------------------------------------------

def test_draining_node_shows_shutting_down(page, server):
    p = page.page
    page.use_key(API_KEY)
    page.write("The quick", length=4, seed=2)
    p.click("#continue")
    page.done_meta()  # the page's socket is open
    with connect(ws_url(server), additional_headers=server.headers()) as inflight:
        inflight.send(json.dumps({"prompt": "Keep the drain busy", "max_tokens": 230, "seed": 3}))
        assert json.loads(inflight.recv(timeout=20))["type"] == "update"
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/ready").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        p.click("#continue")  # over the open socket
        expect(p.locator("#error-title")).to_have_text("Server shutting down.")
        expect(p.locator("#error-message")).to_contain_text("reload the page")
        p.reload()  # a reload lists models over HTTP: the same answer
        expect(p.locator("#error-title")).to_have_text("Server shutting down.")
    page.context.close()  # else uvicorn waits out its graceful-close time for the page's open socket
    assert server.proc.wait(timeout=30) == 0, server.log()  # the in-flight request left: the drain ends, exit 0
