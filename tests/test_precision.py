"""Reduced-precision serving (serving/precision.py): Conv1D -> Linear, dynamic int8, the loss check and its fallbacks,
the validation sample published with a version, and a real server running int8."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch

from textmill.serving import precision
from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.generation import Generation
from textmill.serving.sampling import SamplingParams
from tests.fixtures.models import CORPUS
from tests.fixtures.server import API_KEY, ServeProcess
from textmill import tokenizer as textmill_tok
from textmill.registry import Registry

MODEL = "tiny"
CPU = torch.device("cpu")


def load_export(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder).backend_tokenizer)


@pytest.fixture(scope="module")
def trained(tiny_export):
    """The tiny export's model trained 60 Adam steps on its own corpus (loss ~6.2 -> <2), and a held-out sample."""
    model, tok = load_export(tiny_export)
    ids = torch.tensor([i for text in CORPUS[:6] for i in (*tok.encode(text).ids, model.config.eos_token_id)])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~2.6 s; with 2 threads on 2 cores shared with other work it took over 80 s
    try:
        for _ in range(60):
            starts = torch.randint(0, ids.numel() - 33, (8,))
            batch = torch.stack([ids[s:s + 32] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    held_out = tok.encode("The model reads the prompt and the cat sleeps in the warm sun. This package provides "
                          "a small library for parsing files.").ids
    return model, tok, (held_out * 4, "test sample")


def test_conv1d_to_linear_is_exact_in_fp32(tiny_export):
    import copy

    from transformers.pytorch_utils import Conv1D

    model, tok = load_export(tiny_export)
    converted = copy.deepcopy(model)
    assert precision.conv1d_to_linear(converted) == 4 * model.config.n_layer
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog").ids] * 2)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, converted(ids).logits)  # bit-identical, not merely close
        greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=model.config.eos_token_id)
        assert torch.equal(model.generate(ids, **greedy), converted.generate(ids, **greedy))


def test_int8_quantizes_every_linear_and_stays_within_tolerance(trained):
    model, _, sample = trained
    chosen, report = precision.select(model, "int8", CPU, sample)
    assert report.reference_loss < 3.0, "the fixture model should have learned its corpus"
    assert report.chosen == "int8" and report.rejected == {}
    assert abs(report.loss_delta) <= precision.DEFAULT_TOLERANCE
    assert report.loss == pytest.approx(report.reference_loss * (1 + report.loss_delta))
    assert isinstance(chosen.lm_head, precision.Int8Linear)
    assert sum(isinstance(m, precision.Int8Linear) for m in chosen.modules()) == 4 * model.config.n_layer + 1
    assert not isinstance(model.lm_head, precision.Int8Linear)  # the fp32 model given in is left as it was


@pytest.mark.parametrize("kernel", ["native", "fbgemm", "int_mm"])
def test_int8_rows_do_not_depend_on_their_batch_mates(kernel):
    """Per-token activation quantization + exact int32 accumulation: a row's output is bit-identical alone or batched,
    whatever the other rows hold (an outlier row, a constant row, padding, an all-positive row) — the property
    per-batch dynamic quantization (torch.ao's quantize_dynamic on the same fbgemm kernel) breaks."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    layer = precision.Int8Linear(linear, kernel=kernel)
    x = torch.cat([torch.randn(4, 64), torch.rand(1, 64) + 3.0])
    batched = layer(torch.cat([x, 100 * torch.randn(3, 64), torch.zeros(1, 64), torch.full((1, 64), -2.0)]))
    assert all(torch.equal(layer(x[i:i + 1])[0], batched[i]) for i in range(5))
    reference = linear(x).detach()   # and it is still the same linear map, to int8 accuracy
    assert ((batched[:5] - reference).norm(dim=1) < 0.03 * reference.norm(dim=1)).all()
    ao = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        per_batch = ao(torch.cat([x, 100 * torch.randn(3, 64)]))
        assert not torch.equal(ao(x[:1])[0], per_batch[0])   # what the per-row mapping exists to prevent


@pytest.mark.parametrize("shape", [(64, 96), (1000, 203), (7, 1), (1024, 3072)])
def test_native_int8_kernel_builds_agree_bitwise_and_match_a_reference(shape):
    """The C kernel's two builds (AVX-512 VNNI where this CPU has it, portable C) give the same bits, for shapes off
    the kernel's blocking (k not a multiple of 4 or 16, n not a multiple of 64, 1 to 9 rows), and equal an exact
    integer reference of the same W8A8 arithmetic computed with torch ops."""
    from textmill.serving import kernels

    k, n = shape
    torch.manual_seed(k + n)
    linear = torch.nn.Linear(k, n)
    layer = precision.Int8Linear(linear, kernel="native")
    portable = kernels.int8_kernel(portable=True)
    weight_int8 = torch.round(linear.weight.detach() / layer.weight_scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed = portable.pack(weight_int8)
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, k) * torch.rand(rows, 1) * 4
        x[0, : k // 2] = x[0, : k // 2].abs()   # a row lopsided towards positive values
        fast = layer(x)
        assert torch.equal(fast, portable.linear(x, packed, n, layer.weight_scale, layer.weight_sum, layer.bias))
        lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255
        zero = torch.round(-lo * (1 / scale)).clamp(0, 255)
        q = (torch.round(x * (1 / scale)) + zero).clamp(0, 255)
        dot = (q.double() @ weight_int8.double().t() - zero.double() * weight_int8.double().sum(1)).float()
        torch.testing.assert_close(fast, dot * (scale * layer.weight_scale) + layer.bias, rtol=1e-6, atol=1e-5)
        reference = linear(x).detach()   # and it is the same linear map, to int8 accuracy (k = 7 averages no noise)
        assert ((fast - reference).norm(dim=1) <= (0.02 if k >= 64 else 0.06) * reference.norm(dim=1)).all()
    assert layer(torch.empty(0, k)).shape == (0, n)
    assert layer(torch.randn(2, 3, k)).shape == (2, 3, n)


def test_native_int8_kernel_falls_back_without_a_compiler(tmp_path, monkeypatch, caplog):
    """No C compiler: `Int8Linear` still works (fbgemm or torch._int_mm), with one warning naming the cause; the
    compiled library is cached on disk and a second build reuses it."""
    from textmill.serving import kernels

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = kernels.build(kernels.SOURCE, ["-DTM_PORTABLE"])
    assert built.parent == tmp_path / "cache" / "textmill" / "kernels" and built.stat().st_size > 0
    mtime = built.stat().st_mtime_ns
    assert kernels.build(kernels.SOURCE, ["-DTM_PORTABLE"]) == built and built.stat().st_mtime_ns == mtime
    assert [p.name for p in built.parent.iterdir()] == [built.name]   # no temp files left behind

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(kernels.KernelBuildError, match="cannot run the C compiler"):
        kernels.build(kernels.SOURCE, ["-DTM_PORTABLE", "-DTM_OTHER"])
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(kernels.KernelBuildError, match="internal error"):
        kernels.build(kernels.SOURCE, ["-DTM_PORTABLE", "-DTM_OTHER"])
    kernels.fast_int8_kernel.cache_clear()
    kernels.int8_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="textmill.serving.kernels"):
            layer = precision.Int8Linear(torch.nn.Linear(16, 8))
            precision.Int8Linear(torch.nn.Linear(16, 8))
        assert layer.kernel in ("fbgemm", "int_mm")
        assert layer(torch.randn(2, 16)).shape == (2, 8)
        if kernels.has_vnni():
            assert len([r for r in caplog.records if "native int8 kernel is unavailable" in r.message]) == 1
    finally:
        kernels.fast_int8_kernel.cache_clear()
        kernels.int8_kernel.cache_clear()


def test_native_int8_kernel_is_the_default_on_a_vnni_cpu():
    from textmill.serving import kernels

    layer = precision.Int8Linear(torch.nn.Linear(16, 8))
    assert layer.kernel == ("native" if kernels.has_vnni() else "fbgemm")
    assert kernels.has_vnni(frozenset(kernels.VNNI_FLAGS)) or not kernels.platform.machine().startswith("x86")
    assert not kernels.has_vnni(frozenset({"avx512f", "avx2"}))


def test_int8_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        precision.Int8Linear(torch.nn.Linear(8, 8), kernel="avx9")


def test_int8_engine_text_is_the_same_alone_or_batched(tiny_export):
    engine = Engine(EngineOptions(device="cpu", dtype="int8", max_batch_size=8))
    try:
        assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
        worker = engine.worker(MODEL)
        assert worker.stats()["precision"]["chosen"] == "int8"
        prompts = ["The quick", "Once upon a time there was", "A", "This package provides a small library",
                   "Serving nodes pull new", "Permission is"]

        def gen(prompt: str, seed: int, **params) -> Generation:
            return Generation(prompt, MODEL, "v1", prompt, worker.encode(prompt),
                              SamplingParams(max_tokens=20, seed=seed, **params), worker.tokenizer)

        for seed, params in ((1, {}), (2, {"top_p": 0.9}), (3, {"temperature": 0.7, "top_k": 40})):
            alone = [gen(p, seed, **params) for p in prompts]
            for g in alone:
                worker.run_batch([g])
            batch = [gen(p, seed, **params) for p in prompts]   # different lengths: left padding in one batch
            worker.run_batch(batch)
            assert [g.text for g in batch] == [g.text for g in alone]
    finally:
        engine.close()


@pytest.mark.parametrize("requested", ["auto", "int8", "bfloat16"])
def test_impossible_tolerance_falls_back_to_fp32_logged(trained, caplog, requested):
    model, _, sample = trained
    with caplog.at_level(logging.WARNING, logger="textmill.serving.precision"):
        chosen, report = precision.select(model, requested, CPU, sample, tolerance=0.0)
    assert chosen is model and report.chosen == "float32" and report.loss_delta == 0.0
    expected = precision.plan(requested, CPU)[:-1]   # every candidate before fp32 was tried, in order, and refused
    assert list(report.rejected) == expected and all(d != 0.0 for d in report.rejected.values())
    assert sum("rejected" in r.getMessage() for r in caplog.records) == len(expected)


def test_the_first_candidate_that_passes_wins(trained):
    model, _, sample = trained
    chosen, report = precision.select(model, "int8", CPU, sample, tolerance=0.5)
    assert report.chosen == "int8" and report.rejected == {} and isinstance(chosen.lm_head, precision.Int8Linear)
    body = precision.to_precision(model, "int8_body")
    assert isinstance(body.transformer.h[1].attn.c_proj, precision.Int8Linear)
    assert type(body.lm_head) is torch.nn.Linear
    assert precision.to_precision(model, "bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32    # conversions copy; the fp32 reference stays intact


def test_auto_takes_the_fastest_measured_of_those_that_pass(trained):
    model, _, sample = trained
    chosen, report = precision.select(model, "auto", CPU, sample, tolerance=0.5)
    passing = [p for p in precision.plan("auto", CPU) if p != "int8_body"]   # int8 passed, so int8_body is not tried
    assert list(report.decode_tokens_per_s) == passing and report.rejected == {}
    assert report.chosen == max(report.decode_tokens_per_s, key=report.decode_tokens_per_s.get)
    assert (chosen is model) == (report.chosen == "float32")


def test_a_model_with_non_finite_loss_is_refused_not_served(tiny_export):
    model, tok = load_export(tiny_export)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="loss on the quality sample .* is nan"):
        precision.select(model, "auto", CPU, (tok.encode("The quick brown fox").ids, "t"))


def test_plan_orders_candidates_fastest_first_and_refuses_bad_requests():
    bf16 = ["bfloat16"] if precision.cpu_supports_bf16() else []
    assert precision.plan("auto", CPU) == ["int8", "int8_body", *bf16, "float32"]
    assert precision.plan("int8", CPU) == precision.plan("auto", CPU)
    assert precision.plan("bfloat16", CPU) == [*bf16, "float32"]
    assert precision.plan("float32", CPU) == ["float32"]
    assert precision.plan("auto", torch.device("meta")) == ["float32"]
    with pytest.raises(ValueError, match="int8 runs on CPU only"):
        precision.plan("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="serving.dtype='int4' is invalid"):
        precision.plan("int4", CPU)
    with pytest.raises(ValueError, match="tolerance"):
        precision.select(torch.nn.Linear(1, 1), "auto", CPU, ([1, 2], "x"), tolerance=-0.1)


def test_auto_records_its_choice_in_the_engine_and_metrics(tiny_export):
    from textmill.serving.metrics import Metrics

    metrics = Metrics()
    engine = Engine(EngineOptions(device="cpu", dtype="auto"), metrics)
    try:
        assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
        info = engine.worker(MODEL).stats()["precision"]
        assert info["requested"] == "auto" and info["sample"] == "shipped text"
        speeds = info["decode_tokens_per_s"]
        assert "float32" in speeds and info["chosen"] == max(speeds, key=speeds.get)
        assert info["sample_tokens"] > 100 and abs(info["loss_delta"]) <= info["tolerance"] == 0.01
        labels = {"model": MODEL, "precision": info["chosen"], "requested": "auto"}
        assert metrics.registry.get_sample_value("textmill_model_precision_info", labels) == 1
        assert metrics.registry.get_sample_value("textmill_model_precision_loss_delta",
                                                 {"model": MODEL}) == pytest.approx(info["loss_delta"])
    finally:
        engine.close()


def test_greedy_fp32_equals_hf_generate(tiny_export):
    model, tok = load_export(tiny_export)
    engine = Engine(EngineOptions(device="cpu", dtype="float32"))
    try:
        assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
        worker = engine.worker(MODEL)
        chosen = worker.stats()["precision"]
        assert chosen["chosen"] == "float32" and chosen["sample"] is None  # no check needed
        for prompt in ("Serving nodes pull", "Once upon a time"):
            ids = worker.encode(prompt)
            gen = Generation(prompt, MODEL, "v1", prompt, ids, SamplingParams(max_tokens=16, temperature=0.0),
                             worker.tokenizer)
            worker.run_batch([gen])
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                     pad_token_id=model.config.eos_token_id)
            hf = out[0, len(ids):].tolist()
            eot = model.config.eos_token_id
            hf = hf[:hf.index(eot)] if eot in hf else hf
            assert gen.text == tok.decode(hf)
    finally:
        engine.close()


@pytest.mark.parametrize("content", [
    '{"ids": [1, 2, "3"]}',                       # a token id that is not an int
    '{"ids": [1, 2, 999999]}',                    # an id beyond the vocabulary
    '{"ids": [1, 2, true]}',                      # a bool is not a token id
    "[1, 2, 3",                                   # not JSON
])
def test_malformed_published_sample_falls_back_to_shipped_text(tiny_export, tmp_path, caplog, content):
    folder = shutil.copytree(tiny_export, tmp_path / "version")
    (folder / precision.SAMPLE_FILE).write_text(content, encoding="utf-8")
    _, tok = load_export(folder)
    with caplog.at_level(logging.WARNING, logger="textmill.serving.precision"):
        ids, source = precision.load_sample(folder, tok, 512)
    assert source == "shipped text" and len(ids) > 100
    assert any(str(folder / precision.SAMPLE_FILE) in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def converted_with_sample(tmp_path_factory):
    """`textmill convert --tokens` of a tiny OpenAI-layout release: the export carries val_sample.json."""
    from textmill.convert.cli import main as convert_main
    from tests.fixtures.checkpoints import random_weights, tiny_hparams, tiny_tokenizer, write_openai_release, write_tokens

    root = tmp_path_factory.mktemp("convert-sample")
    tok = tiny_tokenizer()
    hp = tiny_hparams(tok)
    release = write_openai_release(root / "release", hp, tok, random_weights(hp, 0))
    val = ["Permission is hereby granted, free of charge, to any person."] * 40
    tokens = write_tokens(root / "tokens", tok, ["some training text"] * 5, val)
    assert convert_main([str(release), str(root / "export"), "--tokens", str(tokens)]) == 0
    import numpy as np

    return root / "export", np.fromfile(tokens / "val.bin", np.uint16).tolist(), tok


def test_convert_writes_the_val_sample(converted_with_sample):
    export, val_ids, _ = converted_with_sample
    sample = json.loads((export / precision.SAMPLE_FILE).read_text(encoding="utf-8"))
    n = min(len(val_ids), 1024)   # the head of val.bin, at most convert.val_sample.SAMPLE_TOKENS
    assert len(val_ids) > n and sample["ids"] == val_ids[:n] and sample["tokens"] == n
    assert sample["source"] == f"tokens/val.bin[:{n}]"


def test_published_val_sample_is_synced_and_used(converted_with_sample, registry_root, tmp_path):
    from textmill.serving.sync import Syncer
    from textmill.config import ServingConfig

    export, val_ids, tok = converted_with_sample
    version = Registry(registry_root).publish(MODEL, export, metrics={"val_loss": 5.0}, provenance={},
                                              progress=False).version
    manifest = Registry(registry_root).manifest(MODEL, version)
    assert precision.SAMPLE_FILE in {f["path"] for f in manifest["files"]}
    result = Syncer(ServingConfig(root=registry_root, cache_dir=str(tmp_path / "cache"))).sync_once()[0]
    assert result.error is None and result.latest == version
    folder = tmp_path / "cache" / MODEL / version
    n = precision.SAMPLE_TOKENS   # the check scores the sample's first 512 tokens
    assert precision.load_sample(folder, tok, textmill_tok.vocab_size(tok)) == (val_ids[:n], precision.SAMPLE_FILE)
    engine = Engine(EngineOptions(device="cpu", dtype="int8"))
    try:
        assert engine.swap(MODEL, version, folder, manifest)
        info = engine.worker(MODEL).stats()["precision"]
        assert (info["sample"], info["sample_tokens"]) == (precision.SAMPLE_FILE, n)
    finally:
        engine.close()


def test_server_with_dtype_int8_answers_completions(tiny_export, tmp_path):
    root = str(tmp_path / "bucket")
    Registry(root).publish(MODEL, tiny_export, metrics={"val_loss": 5.0}, provenance={}, progress=False)
    proc = ServeProcess(root, tmp_path / "node", args=["--dtype", "int8", "--device", "cpu"])
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key=API_KEY, max_retries=0)
        resp = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0)
        assert resp.usage.completion_tokens >= 1 and resp.choices[0].finish_reason in ("stop", "length")
        again = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0, seed=5)
        assert again.choices[0].text == resp.choices[0].text  # greedy int8 is deterministic
        info = httpx.get(proc.url + "/info", headers=proc.headers(), timeout=10).json()
        chosen = info["models"][MODEL]["precision"]
        assert chosen["requested"] == "int8" and chosen["chosen"] == "int8" and chosen["decode_tokens_per_s"] == {}
        assert proc.metric("textmill_model_precision_info", model=MODEL, precision="int8") == 1
        assert abs(proc.metric("textmill_model_precision_loss_delta", model=MODEL)) <= 0.01
    finally:
        assert proc.terminate() == 0, proc.log()


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "int8", "--device", "cuda"], "serving.dtype=int8 runs on CPU only"),
    (["--dtype", "int4"], "serving.dtype='int4' is invalid"),
    (["--set", "serving.precision_tolerance=1.5"], "serving.precision_tolerance=1.5 must be in"),
    (["--set", "serving.precision_tolerance=-0.01"], "serving.precision_tolerance=-0.01 must be in"),
])
def test_bad_precision_settings_are_one_line_errors(tmp_path, flags, message):
    import argparse

    from textmill.serving import settings
    from textmill.errors import UserError

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, server=True)
    args = parser.parse_args(["--root", str(tmp_path), *flags])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        settings.load(args, env={})
    assert "\n" not in str(e.value)
