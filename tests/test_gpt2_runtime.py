"""The lean serving forward pass (serving/gpt2_runtime.py) against transformers' own GPT-2 forward, its preallocated
KV cache, and the batching engine driving it (int8 on CPU: what `serving.dtype=auto` serves)."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from textmill.serving import precision
from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.engines import ENGINES
from textmill.serving.generation import Generation
from textmill.serving.gpt2_runtime import GPT2Runtime, KVCache, for_serving, supports
from textmill.serving.sampling import SamplingParams
from tests.fixtures.engines import HookedBatchingEngine, assert_same_text_as_alone

MODEL = "tiny"


def tiny_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=96, bos_token_id=0,
                     eos_token_id=0, **config)
    return GPT2LMHeadModel(cfg).eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def test_logits_match_transformers_through_prefill_and_decode_with_cache_growth():
    hf = tiny_gpt2()
    precision.conv1d_to_linear(hf)          # bit-identical views: the same module serves both
    runtime = GPT2Runtime(hf, headroom=0)   # no headroom: every decode step must grow the cache
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids, mask, pos = left_padded(prompts)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    out = runtime(ids, mask, pos)
    real = mask.bool()
    assert (out.logits[real] - ref.logits[real]).abs().max() < 1e-5
    ref_cache, cache, next_pos = ref.past_key_values, out.past_key_values, pos[:, -1:] + 1
    capacities = []
    for step in range(4):
        token = torch.tensor([[20 + step], [40 + step], [60 + step]])
        mask = torch.cat([mask, torch.ones((3, 1), dtype=torch.long)], dim=1)
        ref = hf(input_ids=token, attention_mask=mask, position_ids=next_pos, past_key_values=ref_cache,
                 use_cache=True)
        out = runtime(token, mask, next_pos, past_key_values=cache)
        assert (out.logits - ref.logits).abs().max() < 1e-5
        ref_cache, cache, next_pos = ref.past_key_values, out.past_key_values, next_pos + 1
        capacities.append(cache.capacity)
    assert cache.length == 7 + 4 and capacities == [14, 14, 14, 14]   # grew once, by doubling
    assert torch.equal(cache.layers[0].keys, cache.layers[0].k[:, :, :11])


@torch.inference_mode()
def test_merged_and_selected_rows_decode_as_they_would_alone():
    runtime = GPT2Runtime(precision.quantize_int8(tiny_gpt2(1)))
    a, b = [3, 4, 5, 6, 7, 8], [9, 10]

    def alone(prompt: list[int], steps: int) -> list[torch.Tensor]:
        ids, mask, pos = left_padded([prompt])
        out = runtime(ids, mask, pos, logits_to_keep=1)
        logits, cache, nxt = [out.logits[0, -1]], out.past_key_values, pos[:, -1:] + 1
        for s in range(steps):
            mask = torch.cat([mask, torch.ones((1, 1), dtype=torch.long)], dim=1)
            out = runtime(torch.tensor([[50 + s]]), mask, nxt, past_key_values=cache)
            logits.append(out.logits[0, -1])
            cache, nxt = out.past_key_values, nxt + 1
        return logits

    # a runs one step alone, then b joins (its cache left-padded under a's), then a ends and b continues alone
    ids, mask, pos = left_padded([a])
    out = runtime(ids, mask, pos, logits_to_keep=1)
    cache, nxt = out.past_key_values, pos[:, -1:] + 1
    mask = torch.cat([mask, torch.ones((1, 1), dtype=torch.long)], dim=1)
    out = runtime(torch.tensor([[50]]), mask, nxt, past_key_values=cache)
    got_a = [out.logits[0, -1]]
    cache, nxt = out.past_key_values, nxt + 1
    ids_b, mask_b, pos_b = left_padded([b])
    new = runtime(ids_b, mask_b, pos_b, logits_to_keep=1)
    got_b = [new.logits[0, -1]]
    width = mask.shape[1]
    cache.merge(new.past_key_values, width)
    mask = torch.cat([mask, torch.cat([torch.zeros((1, width - 2), dtype=torch.long), mask_b], dim=1)])
    nxt = torch.cat([nxt, pos_b[:, -1:] + 1])
    assert cache.batch == 2 and cache.length == width
    for s, tokens in enumerate(([[51], [50]], [[52], [51]])):
        mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
        out = runtime(torch.tensor(tokens), mask, nxt, past_key_values=cache)
        got_a.append(out.logits[0, -1])
        got_b.append(out.logits[1, -1])
        cache, nxt = out.past_key_values, nxt + 1
    cache.batch_select_indices(torch.tensor([1]))
    mask, nxt = mask[1:], nxt[1:]
    mask = torch.cat([mask, torch.ones((1, 1), dtype=torch.long)], dim=1)
    got_b.append(runtime(torch.tensor([[52]]), mask, nxt, past_key_values=cache).logits[0, -1])
    # bit for bit: int8 rows are independent of batch-mates, padded rows attend over their own positions only
    for got, want in ((got_a, alone(a, 3)[1:]), (got_b, alone(b, 3))):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_context_overflow_and_unsupported_models_are_refused():
    runtime = GPT2Runtime(precision.quantize_int8(tiny_gpt2()))
    with pytest.raises(ValueError, match="exceed the model's context of 96"):
        runtime(torch.zeros((1, 97), dtype=torch.long))
    cache = KVCache(1, 1, 2, 4, capacity=8, max_length=10, dtype=torch.float32, device=torch.device("cpu"))
    cache.length = 8
    cache.reserve(2)
    assert cache.capacity == 10      # doubling stops at the model's context
    odd = tiny_gpt2(scale_attn_by_inverse_layer_idx=True)
    assert not supports(odd) and for_serving(odd, "int8") is odd
    with pytest.raises(ValueError, match="plain GPT-2"):
        GPT2Runtime(odd)
    plain = tiny_gpt2()
    assert for_serving(plain, "float32") is plain   # fp32 stays transformers' forward: the greedy reference
    with pytest.raises(ValueError, match="Conv1D"):
        GPT2Runtime(plain)


def test_int8_engine_serves_through_the_runtime(tiny_export):
    engine = Engine(EngineOptions(device="cpu", dtype="int8"))
    try:
        assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
        worker = engine.worker(MODEL)
        assert isinstance(worker.model, GPT2Runtime) and worker.stats()["dtype"] == "int8"
        # greedy through the runtime = greedy through transformers' forward on the same int8 modules
        prompt = "The quick"
        gen = Generation(prompt, MODEL, "v1", prompt, worker.encode(prompt), SamplingParams(max_tokens=12,
                         temperature=0.0), worker.tokenizer)
        worker.run_batch([gen])
        ids = torch.tensor([worker.encode(prompt)])
        hf = worker.model.model
        with torch.inference_mode():
            for _ in range(12):
                ids = torch.cat([ids, hf(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        expected = ids[0, len(worker.encode(prompt)):].tolist()
        eot = worker.eot_id
        expected = expected[:expected.index(eot) + 1] if eot in expected else expected
        assert [s.token for s in gen.steps] == expected
    finally:
        engine.close()


class _Recording(HookedBatchingEngine):
    step_delay = 0.05
    prefills: list[int]

    def _forward(self, gens, **inputs):
        if inputs.get("past_key_values") is None:
            self.prefills.append(len(gens))
        elif inputs.get("prefill") is not None:   # arrivals prefilled in the same pass as a decode step
            self.prefills.append(inputs["prefill"]["input_ids"].shape[0])
        return super()._forward(gens, **inputs)


@pytest.mark.parametrize("budget, grouped", [(1, False), (10_000, True)])
def test_a_burst_is_prefilled_within_the_token_budget_with_unchanged_text(tiny_export, monkeypatch, budget, grouped):
    engine_class = type("Recording", (_Recording,), {"prefills": []})
    monkeypatch.setitem(ENGINES, "recording", engine_class)
    engine = Engine(EngineOptions(device="cpu", dtype="int8", engine="recording", max_prefill_tokens=budget))
    try:
        assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
        worker = engine.worker(MODEL)
        engine_class.prefills.clear()
        long = engine.submit(worker, "A long one", worker.encode("A long one"), SamplingParams(max_tokens=40, seed=1))
        time.sleep(0.2)   # decoding now; each step sleeps 50 ms, so the burst below lands within one step
        prompts = ["The quick", "Once upon a time there was a little", "B", "Serving nodes pull"]
        burst = [engine.submit(worker, p, worker.encode(p), SamplingParams(max_tokens=5, seed=2)) for p in prompts]
        assert all(g.wait(30) for g in [*burst, long])
        joined = engine_class.prefills[1:]
        assert sum(joined) == len(prompts)
        assert (max(joined) > 1) if grouped else (joined == [1, 1, 1, 1])
        assert_same_text_as_alone(worker, MODEL, [(p, SamplingParams(max_tokens=5, seed=2), g)
                                                  for p, g in zip(prompts, burst)])
    finally:
        engine.close()


@torch.inference_mode()
def test_a_prefill_group_in_a_decode_step_gives_what_two_passes_give():
    runtime = GPT2Runtime(precision.quantize_int8(tiny_gpt2(2)))
    ids, mask, pos = left_padded([[3, 4, 5, 6], [7, 8]])
    first = runtime(ids, mask, pos, logits_to_keep=1)
    step_mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
    new_ids, new_mask, new_pos = left_padded([[9, 10, 11], [12, 13, 14, 15, 16]])
    solo_cache = KVCache(3, 2, 4, 16, 8, 96, torch.float32, torch.device("cpu"))
    for name in ("k", "v"):   # a copy of the running cache for the two-pass reference
        for mine, theirs in zip(solo_cache.layers, first.past_key_values.layers):
            setattr(mine, name, getattr(theirs, name).clone())
    solo_cache.length = first.past_key_values.length
    decode_alone = runtime(torch.tensor([[20], [21]]), step_mask, pos[:, -1:] + 1, past_key_values=solo_cache)
    prefill_alone = runtime(new_ids, new_mask, new_pos, logits_to_keep=0)
    mixed = runtime(torch.tensor([[20], [21]]), step_mask, pos[:, -1:] + 1, past_key_values=first.past_key_values,
                    prefill={"input_ids": new_ids, "attention_mask": new_mask, "position_ids": new_pos,
                             "logits_to_keep": 0})
    assert mixed.logits.shape == (2, 1, 300) and mixed.prefill.logits.shape == (2, 5, 300)
    assert (mixed.logits - decode_alone.logits).abs().max() < 1e-5
    real = new_mask.bool()
    assert (mixed.prefill.logits[real] - prefill_alone.logits[real]).abs().max() < 1e-5
    assert mixed.past_key_values.length == 5 and mixed.prefill.past_key_values.length == 5


def test_a_prompt_scored_while_joining_a_running_batch_matches_scoring_it_alone(tiny_export, monkeypatch):
    monkeypatch.setitem(ENGINES, "slow", HookedBatchingEngine.configure(step_delay=0.02))
    engine = Engine(EngineOptions(device="cpu", dtype="int8", engine="slow"))
    try:
        assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
        worker = engine.worker(MODEL)
        params = SamplingParams(max_tokens=4, seed=5, logprobs=2, prompt_logprobs=True)
        long = engine.submit(worker, "A long one", worker.encode("A long one"), SamplingParams(max_tokens=40))
        time.sleep(0.15)
        prompt = "Once upon a time there was a little"
        joined = engine.submit(worker, prompt, worker.encode(prompt), params)
        assert joined.wait(30) and long.wait(30) and not long.error
        alone = Generation(prompt, MODEL, "v1", prompt, worker.encode(prompt), params, worker.tokenizer)
        worker.run_batch([alone])
        assert joined.text == alone.text and len(joined.prompt_steps) == len(worker.encode(prompt)) - 1
        for a, b in zip(joined.prompt_steps + joined.steps, alone.prompt_steps + alone.steps):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    finally:
        engine.close()


class _Widths(HookedBatchingEngine):
    widths: list[int]

    def _forward(self, gens, **inputs):
        self.widths.append(inputs["attention_mask"].shape[1])
        return super()._forward(gens, **inputs)


@pytest.mark.parametrize("dtype", ["float32", "int8"])   # transformers' DynamicCache / serving.gpt2_runtime.KVCache
def test_a_batch_that_never_drains_keeps_its_cache_within_the_context(tmp_path, monkeypatch, dtype):
    """Rows keep joining as others end, for far more steps than the model's context: the positions of rows long gone
    are dropped, so the cache never grows past the context (it did by one position per step, failing the batch)."""
    from tests.fixtures.models import make_tiny_export

    export = make_tiny_export(tmp_path / "export", n_ctx=32)
    engine_class = type("Widths", (_Widths,), {"widths": []})
    monkeypatch.setitem(ENGINES, "widths", engine_class)
    engine = Engine(EngineOptions(device="cpu", dtype=dtype, engine="widths", max_batch_size=2))
    try:
        assert engine.swap(MODEL, "v1", export, {"files": []})
        worker = engine.worker(MODEL)
        engine_class.widths.clear()
        prompts = [f"Prompt number {i} is" for i in range(8)]
        params = [SamplingParams(max_tokens=18 + i % 3, seed=i) for i in range(8)]
        gens = [engine.submit(worker, p, worker.encode(p), sp) for p, sp in zip(prompts, params)]
        assert all(g.wait(60) for g in gens)
        assert [g.error for g in gens] == [None] * 8
        assert len(engine_class.widths) > 40 and max(engine_class.widths) <= 32
        assert_same_text_as_alone(worker, MODEL, list(zip(prompts, params, gens)))
    finally:
        engine.close()


@torch.inference_mode()
def test_a_row_is_bit_for_bit_the_same_next_to_longer_or_shorter_prompts():
    """Masked attention over a batch's padded keys differs from the row's own attention in the last bits, and int8's
    per-token quantization of the next layer turned that into another sampled token for 1 in 94 request pairs."""
    runtime = GPT2Runtime(precision.quantize_int8(tiny_gpt2(3)))

    def logits_of_first_row(prompts: list[list[int]], steps: int = 20) -> torch.Tensor:
        ids, mask, pos = left_padded(prompts)
        out = runtime(ids, mask, pos, logits_to_keep=1)
        rows, cache, nxt = [out.logits[0, -1]], out.past_key_values, pos[:, -1:] + 1
        for s in range(steps):
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
            tokens = torch.tensor([[(7 * s + 3 * i) % 250 + 1] for i in range(len(prompts))])
            out = runtime(tokens, mask, nxt, past_key_values=cache)
            rows.append(out.logits[0, -1])
            cache, nxt = out.past_key_values, nxt + 1
        return torch.stack(rows)

    a = [11, 22, 33, 44, 55]
    alone = logits_of_first_row([a])
    for other in (1, 5, 12, 40, 70):
        mates = [[(13 * j + other) % 290 + 1 for j in range(other)], [5] * (other // 2 + 1)]
        assert torch.equal(logits_of_first_row([a, *mates]), alone), other
    # no padding at all: one batched call, still the row's own result
    assert torch.equal(logits_of_first_row([a, [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]]), alone)
