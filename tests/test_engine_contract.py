"""The engine contract (serving/engines/base.py) on a tiny model: a second engine plugged in through the registry table,
health, greedy parity with transformers' `generate`, and logprobs equal to a direct forward pass."""

from __future__ import annotations

import pytest
import torch

from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.engines import ENGINES, engine_class
from textmill.serving.engines.base import EngineSpec, ModelEngine
from textmill.serving.engines.batching import BatchingEngine
from textmill.serving.generation import Generation
from textmill.serving.loading import load_model
from textmill.serving.sampling import SamplingParams
from tests.fixtures.engines import ScriptedEngine

MODEL = "tiny"


def gen_for(engine: ModelEngine, prompt: str | list[int], **params) -> Generation:
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return Generation(("t", str(prompt), tuple(params.items())), MODEL, engine.version, str(prompt), ids,
                      SamplingParams(**params), engine.tokenizer)


@pytest.fixture
def scripted(monkeypatch, tiny_export):
    monkeypatch.setitem(ENGINES, "scripted", ScriptedEngine)
    router = Engine(EngineOptions(device="cpu", engine="scripted"))
    assert router.swap(MODEL, "v1", tiny_export, {"files": []})
    yield router
    router.close()


def test_a_second_engine_is_one_table_entry_and_text_handling_is_outside_it(scripted):
    engine = scripted.worker(MODEL)
    assert isinstance(engine, ScriptedEngine) and engine.health().alive
    prompt = "The quick brown fox jumps"
    ids = engine.encode(prompt)
    free = scripted.submit(engine, prompt, ids, SamplingParams(max_tokens=2 * len(ids), logprobs=1))
    assert free.wait(10) and free.finish_reason == "length"
    assert free.text == prompt + prompt  # the engine cycles ids; the sequence detokenized them
    assert [s.logprob for s in free.steps] == [-1.0] * 2 * len(ids)
    assert all(len(s.top) == 1 and s.top[0][0] == (s.token + 1) % engine.vocab_size for s in free.steps)
    # stop strings (two kinds: inside one token's text, and spanning tokens) cut the text outside the engine
    for stop in ("fox", "brown fox"):
        cut = scripted.submit(engine, prompt, ids, SamplingParams(max_tokens=40, stop=(stop,)))
        assert cut.wait(10) and cut.finish_reason == "stop" and cut.text == prompt[:prompt.index(stop)]
        assert cut.tokens < 40  # the engine dropped the sequence when push() said it ended
    # the router's dedup and cache work the same on any engine
    again = scripted.submit(engine, prompt, ids, SamplingParams(max_tokens=2 * len(ids), logprobs=1))
    assert again is free
    assert scripted.health()[MODEL].alive


def test_cancel_through_the_contract(scripted):
    engine = scripted.worker(MODEL)
    seq = gen_for(engine, "The quick", max_tokens=10_000_000)
    engine.submit(seq)
    engine.cancel(seq)
    assert seq.wait(10) and seq.finish_reason == "cancelled" and seq.tokens < 10_000_000


def test_unknown_engine_names_the_choices(tiny_export):
    with pytest.raises(ValueError, match="batching"):
        engine_class("vllm-please")
    with pytest.raises(ValueError, match="not a known engine"):
        Engine(EngineOptions(device="cpu", engine="nope"))
    from textmill.serving import settings
    from textmill.config import ServingConfig
    from textmill.errors import UserError

    with pytest.raises(UserError, match="serving.engine='nope'"):
        settings.validate(ServingConfig(root="x", engine="nope"))


def test_health_reports_whether_the_worker_thread_runs(tiny_export):
    engine = BatchingEngine.load(EngineSpec(MODEL, "v1", tiny_export, device="cpu", dtype="float32"))
    assert not engine.health().alive and engine.health().detail == "not started"
    engine.warm_up()
    assert engine.health().last_ok > 0
    engine.start()
    assert engine.health().alive
    stats = engine.stats()
    assert stats["engine"] == "batching" and stats["dtype"] == "float32" and stats["device"] == "cpu"
    engine.close()
    engine.join(10)
    health = engine.health()
    assert not health.alive and "exited" in health.detail


@pytest.fixture(scope="module")
def direct(tiny_export):
    """The same export loaded straight through transformers, and an engine on it (not started: run_batch directly)."""
    model, tok, _ = load_model(tiny_export, "cpu", "float32")
    engine = BatchingEngine.load(EngineSpec(MODEL, "v1", tiny_export, device="cpu", dtype="float32",
                                            max_batch_size=8))
    return model, tok, engine


def test_greedy_fp32_is_token_for_token_hf_generate(direct):
    model, tok, engine = direct
    prompts = ["The quick brown", "Serving nodes pull new versions from the", "A"]
    gens = [gen_for(engine, p, max_tokens=24, temperature=0.0) for p in prompts]
    engine.run_batch(gens)  # one batch: different prompt lengths, left padding
    for p, g in zip(prompts, gens):
        ids = torch.tensor([tok(p)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                             pad_token_id=engine.eot_id)[0, ids.shape[1]:].tolist()
        if engine.eot_id in out:
            out = out[:out.index(engine.eot_id) + 1]
        assert [s.token for s in g.steps] == out


def test_prompt_and_token_logprobs_equal_a_direct_forward(direct):
    model, _, engine = direct
    long_ids = engine.encode("Permission is hereby granted, free of charge, to any person")
    short_ids = engine.encode("The model reads")
    scored = [gen_for(engine, ids, max_tokens=0, logprobs=3, prompt_logprobs=True) for ids in (long_ids, short_ids)]
    generated = gen_for(engine, short_ids, max_tokens=5, temperature=0.0, logprobs=2)
    engine.run_batch([*scored, generated])
    for ids, g in zip((long_ids, short_ids), scored):
        assert g.tokens == 0 and g.finish_reason == "length" and len(g.prompt_steps) == len(ids) - 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor([s.logprob for s in g.prompt_steps])
        assert torch.allclose(got, want, atol=1e-4)
        top_v, top_i = logp[:-1].topk(3, dim=-1)
        assert [[t for t, _ in s.top] for s in g.prompt_steps] == top_i.tolist()
        assert torch.allclose(torch.tensor([[v for _, v in s.top] for s in g.prompt_steps]), top_v, atol=1e-4)
    full = short_ids + [s.token for s in generated.steps]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    n = len(short_ids)
    want = logp[torch.arange(n - 1, len(full) - 1), torch.tensor(full[n:])]
    assert torch.allclose(torch.tensor([s.logprob for s in generated.steps]), want, atol=1e-4)
    assert all(s.top[0][0] == s.token for s in generated.steps)  # greedy: the chosen token is the most likely
