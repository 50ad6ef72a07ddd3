"""The OpenAI surface in full against a real `textmill serve` (uvicorn on 127.0.0.1), driven by the openai SDK and
httpx: null defaults, the four prompt forms, logprobs/echo (checked against a direct transformers forward pass),
best_of, user, suffix, stream_options, and chat completions with and without a chat template."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
import torch

from textmill.serving.loading import load_model
from textmill.serving.protocol import token_text
from tests.fixtures.server import API_KEY, ServeProcess
from textmill.registry import Registry

MODEL, CHATTY, PLAIN = "tiny", "chatty", "plainchat"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
OPTIONAL_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed", "echo",
                   "logprobs", "best_of", "suffix", "user", "logit_bias", "presence_penalty", "frequency_penalty"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_export):
    root = str(tmp_path_factory.mktemp("registry") / "bucket")
    chatty = tmp_path_factory.mktemp("chatty") / "export"
    shutil.copytree(tiny_export, chatty)
    config = json.loads((chatty / "tokenizer_config.json").read_text(encoding="utf-8"))
    (chatty / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}),
                                                  encoding="utf-8")
    for name, folder in ((MODEL, tiny_export), (CHATTY, chatty), (PLAIN, tiny_export)):
        Registry(root).publish(name, folder, metrics={"val_loss": 5.0}, provenance={}, progress=False)
    proc = ServeProcess(root, tmp_path_factory.mktemp("node"), env={"TEXTMILL_CHAT_TEMPLATES": f"{PLAIN}=plain",
                                                                    "TEXTMILL_DTYPE": "float32"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def reference(tiny_export):
    """The same export straight through transformers: (model, tokenizer)."""
    return load_model(tiny_export, "cpu", "float32")[:2]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def post(server, path: str = "/v1/completions", **body) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, headers=server.headers(), timeout=30)


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_null_in_any_optional_field_means_its_default(server):
    plain = post(server, prompt="The quick").json()
    nulls = post(server, prompt="The quick", **{f: None for f in OPTIONAL_FIELDS})
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"][0]["text"] == plain["choices"][0]["text"]
    assert nulls.json()["usage"] == plain["usage"]
    nested = post(server, prompt="The quick", stream=True, stream_options={"include_usage": None})
    assert nested.status_code == 200 and "usage" not in nested.text.split("data: ")[-2]
    chat = post(server, "/v1/chat/completions", model=PLAIN, messages=[{"role": "user", "content": "hi"}],
                max_tokens=None, temperature=None, logprobs=None, top_logprobs=None, max_completion_tokens=None)
    assert chat.status_code == 200, chat.text


def test_four_prompt_forms_and_prompt_token_usage(server, reference):
    _, tok = reference
    texts = ["The quick brown", "Serving nodes"]
    ids = [tok(t)["input_ids"] for t in texts]
    common = {"max_tokens": 5, "seed": 3}
    by_text = post(server, prompt=texts, **common).json()
    by_ids = post(server, prompt=ids, **common).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    one = post(server, prompt=ids[0], **common).json()
    assert one["choices"][0]["text"] == by_text["choices"][0]["text"] and one["usage"]["prompt_tokens"] == len(ids[0])
    single = post(server, prompt=texts[0], **common).json()
    assert single["choices"][0]["text"] == one["choices"][0]["text"]


@pytest.mark.parametrize("prompt", [[1.5], {"text": "x"}, [[1, 2], ["x"]], [], [[]], [-1], True, [True, 2], None])
def test_malformed_prompts_are_one_clear_error_naming_prompt(server, prompt):
    r = post(server, prompt=prompt)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and "prompt" in err["message"]
    assert not any(internal in err["message"] for internal in ("prompt.str", "list[", "int_type", "union"))


def test_token_ids_outside_the_vocabulary_are_a_400(server):
    r = post(server, prompt=[[1, 2], [3, 10_000_000]])
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "10000000" in r.json()["error"]["message"]


def test_echo_scores_a_prompt_without_generating_equal_to_a_direct_forward(server, client, reference):
    model, tok = reference
    ids = tok("Permission is hereby granted, free of charge")["input_ids"]
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    ch = resp.choices[0]
    lp = ch.logprobs
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens == len(ids)
    assert ch.text == tok.decode(ids) and "".join(lp.tokens) == ch.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = log_softmax(model, ids)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - float(want[j - 1, ids[j]])) < 1e-4
        top = want[j - 1].topk(3)
        for tid, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(lp.top_logprobs[j][token_text(tok.backend_tokenizer, tid)] - value) < 1e-4
        assert lp.top_logprobs[j][lp.tokens[j]] == lp.token_logprobs[j]  # the chosen token is always listed
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]


def test_generated_logprobs_equal_a_direct_forward_and_stream_equals_non_stream(server, client, reference):
    model, tok = reference
    prompt = "The model reads the prompt"
    ids = tok(prompt)["input_ids"]
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 6
    x = torch.tensor([ids])
    full = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6,
                          pad_token_id=tok.eos_token_id)[0].tolist()
    assert lp.tokens == [token_text(tok.backend_tokenizer, t) for t in full]
    want = log_softmax(model, full)
    for j in range(len(ids), len(full)):
        assert abs(lp.token_logprobs[j] - float(want[j - 1, full[j]])) < 1e-4
        assert max(lp.top_logprobs[j].values()) == lp.token_logprobs[j]  # greedy
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    assert plain.choices[0].logprobs.text_offset[0] == len(prompt)  # offsets count from the start of the prompt
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[len(ids):], abs=1e-5)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == plain.choices[0].logprobs.tokens
    assert [v for s in streamed for v in s.token_logprobs] == plain.choices[0].logprobs.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == plain.choices[0].logprobs.text_offset
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == len(ids)
    echoed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in echoed if c.choices) == resp.choices[0].text


def test_best_of_returns_the_most_likely_of_its_candidates(server, client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "seed": 11}
    best = client.completions.create(**body, best_of=3, n=1)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.usage.completion_tokens <= 24 and best.usage.completion_tokens > 8  # every candidate was generated
    candidates = [client.completions.create(**{**body, "seed": 11 + j}, logprobs=0).choices[0] for j in range(3)]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    assert best.choices[0].text == candidates[means.index(max(means))].text
    two = client.completions.create(**body, best_of=3, n=2, logprobs=1)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].logprobs.tokens
    for bad in ({"best_of": 1, "n": 2}, {"best_of": 3, "stream": True}):
        r = post(server, prompt="x", **bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


def test_suffix_is_a_clear_400_and_user_is_accepted(server, client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="The start", suffix=" the end.", max_tokens=4)
    assert post(server, prompt="x", suffix="", max_tokens=2).status_code == 200
    ok = client.completions.create(model=MODEL, prompt="The start", max_tokens=4, user="user-1234")
    assert ok.choices[0].finish_reason in ("length", "stop")
    zero = post(server, prompt="x", max_tokens=0)
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_tokens" and "echo" in zero.text


def test_chat_needs_a_template(server, client):
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "chat_template_missing"


@pytest.mark.parametrize("model, rendered", [
    (CHATTY, "<system> Be brief.\n<user> Tell me a story\n<assistant>"),
    (PLAIN, "system: Be brief.\n\nuser: Tell me a story\n\nassistant:"),
])
def test_chat_with_a_shipped_or_configured_template(server, client, model, rendered):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}]}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=4, logprobs=True,
                                          top_logprobs=2)
    same = post(server, model=model, prompt=rendered, max_tokens=6, seed=4).json()
    msg = resp.choices[0].message
    assert resp.object == "chat.completion" and msg.role == "assistant" and msg.content == same["choices"][0]["text"]
    assert resp.usage.prompt_tokens == same["usage"]["prompt_tokens"]
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, seed=4, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    # without max_tokens a chat reply may use the rest of the context window (256 tokens here), not 16
    long = client.chat.completions.create(model=model, messages=messages, seed=4, temperature=0,
                                          stop=["\x00never"])
    assert long.usage.prompt_tokens + long.usage.completion_tokens == 256 or long.choices[0].finish_reason == "stop"
    assert long.usage.completion_tokens > 16 or long.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {"model": PLAIN, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"model": PLAIN, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
])
def test_other_union_fields_name_the_field_not_a_validator_branch(server, path, body, param):
    r = post(server, path, **body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and not any(i in err["message"] for i in ("list[", "str]", "union", "function-"))


def test_a_huge_logprobs_body_is_built_off_the_event_loop(server):
    """echo + logprobs=20 + best_of=n=16 over 4 long prompts: a ~10 MB body of detokenized alternatives. Building and
    serializing it must not stall the node: /live keeps answering within a fraction of a second throughout (it stalled
    for over a second on the tiny model, seconds on a 1,024-token one)."""
    import threading
    import time

    latencies, stop = [], threading.Event()

    def watch():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                started = time.monotonic()
                assert c.get(server.url + "/live").status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for seed in (1, 2):
            r = post(server, prompt=[list(range(1, 241))] * 4, max_tokens=10, n=16, best_of=16, logprobs=20, echo=True,
                     seed=seed)
            assert r.status_code == 200, r.text
            assert len(r.content) > 5_000_000 and len(r.json()["choices"]) == 64
    finally:
        stop.set()
        watcher.join()
    assert max(latencies) < 0.5, sorted(latencies)[-5:]


LAX_VALUES = [("max_tokens", True), ("max_tokens", 2.0), ("max_tokens", "2"), ("n", True), ("seed", True),
              ("seed", 7.0), ("top_k", False), ("temperature", True), ("temperature", "0.5"), ("echo", "yes"),
              ("echo", 1), ("stream", "false"), ("logprobs", True)]


@pytest.mark.parametrize("field, value", LAX_VALUES, ids=[f"{f}={v!r}" for f, v in LAX_VALUES])
def test_json_values_of_the_wrong_type_are_refused_not_coerced(server, field, value):
    """`"max_tokens": true` generated 1 token, `"stream": "false"` was read as False, `"echo": "yes"` as True: lax
    coercion guessed instead of naming the field. Same fields, same answer on the WebSocket."""
    from websockets.sync.client import connect

    r = post(server, prompt="hello", **{"max_tokens": 2, field: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["code"] == "invalid_value"
    if field != "stream":
        url = server.url.replace("http", "ws") + f"/v1/stream/{MODEL}"
        with connect(url, additional_headers=server.headers()) as ws:
            ws.send(json.dumps({"prompt": "hello", "max_tokens": 2, field: value}))
            err = json.loads(ws.recv(timeout=10))["error"]
            assert err["status"] == 422 and err["param"] == field, err


@pytest.mark.parametrize("field, value", [("logprobs", 1), ("max_tokens", True), ("stream", "true")])
def test_chat_values_of_the_wrong_type_are_refused(server, field, value):
    r = post(server, "/v1/chat/completions", model=PLAIN, messages=[{"role": "user", "content": "hi"}],
             **{"max_tokens": 2, field: value})
    assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text


def test_integers_still_pass_for_float_fields(server):
    r = post(server, prompt="hello", max_tokens=2, temperature=1, top_p=1, presence_penalty=0, frequency_penalty=0)
    assert r.status_code == 200, r.text
