"""textmill's native CPU kernels (serving/kernels): decode attention against torch's, the thread pool under concurrent
callers and after fork, the huge-page arena, and the per-thread torch setting the engine applies. Both builds of the C
file are exercised where the CPU has VNNI; the portable build everywhere."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from textmill.serving import kernels

BUILDS = ["portable", "native"]


def build(name: str) -> kernels.Int8Kernel:
    """The portable build, or the fast one where this CPU has VNNI (else the portable one again: never skipped)."""
    return kernels.int8_kernel(portable=name == "portable" or not kernels.has_vnni())


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over positions [start, L) of one row: q [H, 1, D], keys/values [H, L, D]."""
    scores = (q.double() @ keys[:, start:].double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (torch.softmax(scores, dim=-1) @ values[:, start:].double()).float()


@pytest.mark.parametrize("name", BUILDS)
@pytest.mark.parametrize("length", [1, 17, 90, 300])
def test_decode_attention_matches_torch_row_by_row(name, length):
    """One query per row over the row's own positions of a strided cache (capacity beyond the filled part, q a view
    of a fused QKV row as GPT2Runtime passes it), rows left-padded by different amounts; each row equals its own
    reference and is bit-identical to the same row computed alone."""
    kernel = build(name)
    torch.manual_seed(length)
    batch, heads, dim, capacity = 3, 4, 64, length + 13
    cache_k, cache_v = torch.randn(batch + 1, heads, capacity, dim), torch.randn(batch + 1, heads, capacity, dim)
    qkv = torch.randn(batch, 3 * heads * dim) * 3
    q = qkv.view(batch, 1, 3, heads, dim).permute(2, 0, 3, 1, 4)[0]   # [B, H, 1, D], strided
    starts = torch.tensor([0, length // 2, length - 1], dtype=torch.int64)
    keys, values = cache_k[:batch, :, :length], cache_v[:batch, :, :length]
    out = kernel.attention(q, keys, values, starts)
    assert out.shape == (batch, heads, 1, dim) and out.dtype == torch.float32
    for row, start in enumerate(starts.tolist()):
        torch.testing.assert_close(out[row], reference_attention(q[row], keys[row], values[row], start),
                                   rtol=1e-5, atol=1e-5)
        # the same row alone, its real positions moved to the front of its own cache: same bits
        alone_k = cache_k[row:row + 1, :, start:length].contiguous()
        alone_v = cache_v[row:row + 1, :, start:length].contiguous()
        alone = kernel.attention(q[row:row + 1], alone_k, alone_v, None)
        assert torch.equal(alone[0], out[row])
    assert kernel.attention(q, cache_k[:batch, :, :1].expand(-1, -1, kernel.max_positions + 1, -1),
                                   cache_v[:batch, :, :1].expand(-1, -1, kernel.max_positions + 1, -1),
                                   None) is None   # beyond the kernel's stack buffer: the caller uses torch's


@pytest.mark.parametrize("name", BUILDS)
def test_int8_linear_gives_the_same_bits_with_any_thread_count_and_concurrent_callers(name):
    """Chunks are claimed dynamically by however many threads turn up; every output block is computed the same way
    whoever runs it, so 1, 2 or 4 threads, and two callers at once (the second runs inline), give identical bits."""
    kernel = build(name)
    torch.manual_seed(0)
    weights = []
    for k, n in ((256, 640), (640, 200)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        weights.append((kernel.pack(w), n, torch.rand(n) / 100, w.sum(1, dtype=torch.int32), torch.randn(n)))
    xs = [torch.randn(9, 256), torch.randn(5, 640)]
    expected = [kernel.linear(x, p, n, s, ws, b, threads=1) for x, (p, n, s, ws, b) in zip(xs, weights)]
    for threads in (2, 4):
        assert all(torch.equal(kernel.linear(x, p, n, s, ws, b, threads=threads), e)
                   for x, (p, n, s, ws, b), e in zip(xs, weights, expected))
    failures: list[str] = []

    def caller(i: int) -> None:
        x, (p, n, s, ws, b) = xs[i], weights[i]
        for _ in range(200):
            if not torch.equal(kernel.linear(x, p, n, s, ws, b, threads=2), expected[i]):
                failures.append(f"caller {i}")
                return

    threads = [threading.Thread(target=caller, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _linear_in_child(queue) -> None:   # module level: multiprocessing pickles it by name
    import time

    kernel = kernels.int8_kernel(portable=not kernels.has_vnni())
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (300, 96), dtype=torch.int8)
    x = torch.randn(3, 96)
    results = []
    for _ in range(4):   # the child's helper goes to sleep between calls: waking it must not wait on the parent's
        y = kernel.linear(x, kernel.pack(w), 300, torch.ones(300), w.sum(1, dtype=torch.int32), torch.zeros(300),
                          threads=2)
        results.append(y.tolist())   # plain data: a tensor would travel as a shared-memory handle that dies with it
        time.sleep(0.005)
    queue.put(results)


def test_the_pool_works_in_a_forked_child():
    """The parent's pool helpers do not exist in a fork child, and the copied condition variable still counted the
    parent's sleeping helper as a waiter: the child's second call hung in pthread_cond_broadcast (hostile review).
    The child resets the pool (pthread_atfork) and starts its own helpers."""
    import time

    kernel = kernels.int8_kernel(portable=not kernels.has_vnni())
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (300, 96), dtype=torch.int8)
    x = torch.randn(3, 96)
    expected = kernel.linear(x, kernel.pack(w), 300, torch.ones(300), w.sum(1, dtype=torch.int32), torch.zeros(300),
                             threads=2)   # the parent's pool is running now
    time.sleep(0.01)   # ... and its helper asleep on the condition variable when the child is forked
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_linear_in_child, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(30)
    assert child.exitcode == 0 and all(torch.equal(torch.tensor(y), expected) for y in got) and len(got) == 4


@pytest.mark.parametrize("name", BUILDS)
@pytest.mark.parametrize("new", [2, 7])
def test_causal_attention_over_new_positions_matches_sdpa_row_by_row(name, new):
    """T new queries per row (a prefill, or a prefill continuing a cache): each attends to its row's real positions
    up to itself; padding queries give zeros; each row equals sdpa's causal attention on its real positions alone
    and is bit-identical to the row run alone."""
    kernel = build(name)
    torch.manual_seed(new)
    batch, heads, dim, length = 3, 4, 64, 12
    cache_k, cache_v = torch.randn(batch, heads, length + 5, dim), torch.randn(batch, heads, length + 5, dim)
    qkv = torch.randn(batch, new, 3 * heads * dim)
    q = qkv.view(batch, new, 3, heads, dim).permute(2, 0, 3, 1, 4)[0]   # [B, H, T, D], strided
    starts = torch.tensor([0, 4, length - 1], dtype=torch.int64)   # row 2: only its last position is real
    keys, values = cache_k[:, :, :length], cache_v[:, :, :length]
    out = kernel.attention(q, keys, values, starts)
    assert out.shape == (batch, heads, new, dim)
    for row, start in enumerate(starts.tolist()):
        first = max(0, start - (length - new))   # the first new query that is a real position
        assert torch.equal(out[row, :, :first], torch.zeros_like(out[row, :, :first]))
        real_q = q[row:row + 1, :, first:].double()
        k, v = keys[row:row + 1, :, start:].double(), values[row:row + 1, :, start:].double()
        # sdpa's is_causal aligns the top-left corner; the new queries are the *last* positions, so mask explicitly
        n_q, n_k = real_q.shape[2], k.shape[2]
        allowed = torch.arange(n_k)[None, :] <= torch.arange(n_k - n_q, n_k)[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(real_q, k, v, attn_mask=allowed).float()
        torch.testing.assert_close(out[row:row + 1, :, first:], expected, rtol=1e-5, atol=1e-5)
        alone = kernel.attention(q[row:row + 1], keys[row:row + 1, :, start:].contiguous(),
                                 values[row:row + 1, :, start:].contiguous(), None) if first == 0 else None
        if alone is not None:
            assert torch.equal(alone[0], out[row])


@pytest.mark.parametrize("name", BUILDS)
def test_decode_attention_rejects_starts_outside_the_cache(name):
    """Out-of-range starts wrote before the kernel's stack buffer (a segfault at -200,000): refused with a clear
    error, as are starts of the wrong dtype or shape."""
    kernel = build(name)
    q, keys = torch.randn(2, 4, 1, 64), torch.randn(2, 4, 10, 64)
    for bad in ([-3, 0], [0, 10], [-200_000, 0]):
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            kernel.attention(q, keys, keys, torch.tensor(bad))
    for bad in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1, 2]), torch.tensor([[0], [1]])):
        with pytest.raises(ValueError, match="int64 tensor of shape"):
            kernel.attention(q, keys, keys, bad)


def test_int8_builds_agree_on_extreme_rows_and_keep_other_rows_intact():
    """Rows near float32's limits (range overflowing to inf, subnormal ranges) and rows holding inf or NaN: both
    builds give the same bits (their conversions used to differ there), and no such row changes another row."""
    vnni, portable = build("native"), build("portable")
    torch.manual_seed(3)
    k, n = 80, 70
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    args = (n, torch.rand(n) / 100, w.sum(1, dtype=torch.int32), torch.randn(n))
    normal = torch.randn(2, k)
    odd = torch.randn(6, k)
    odd[0, :3] = torch.tensor([2e38, -2e38, 1e38])
    odd[1] = torch.randn(k) * 1e-39
    odd[2] = torch.randn(k) * 1e-37
    odd[3, 5] = float("inf")
    odd[4, 7] = float("nan")
    odd[5] = float("-inf")
    x = torch.cat([normal[:1], odd, normal[1:]])
    fast, slow = vnni.linear(x, vnni.pack(w), *args), portable.linear(x, portable.pack(w), *args)
    assert torch.equal(fast.nan_to_num(), slow.nan_to_num()) and torch.equal(fast.isnan(), slow.isnan())
    alone = vnni.linear(normal, vnni.pack(w), *args)
    assert torch.equal(fast[0], alone[0]) and torch.equal(fast[-1], alone[1])


def test_a_compiler_that_writes_nothing_does_not_poison_the_cache(tmp_path, monkeypatch):
    from textmill.serving import kernels as k

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/true")
    with pytest.raises(k.KernelBuildError, match="wrote no library"):
        k.build(k.SOURCE, ["-DTM_PORTABLE"])
    assert list((tmp_path / "textmill" / "kernels").iterdir()) == []


def test_huge_page_arena_hands_out_aligned_disjoint_buffers():
    arena = kernels.HugePageArena(chunk=4 << 20)
    small = [arena.empty(n) for n in (1, 100, 4096, 70_000)]
    big = arena.empty(3 << 20)   # more than a quarter chunk: its own mapping
    for i, t in enumerate(small + [big]):
        assert t.dtype == torch.int8 and t.data_ptr() % 64 == 0
        t.fill_(i)
    assert [int(t[0]) for t in small + [big]] == list(range(len(small) + 1))   # nothing overlapped
    assert all(int(t[-1]) == i for i, t in enumerate(small + [big]))
    more = [arena.empty(1 << 20) for _ in range(5)]   # the first chunk fills up: a second one is mapped
    assert len({t.data_ptr() for t in more}) == 5


def test_run_torch_inline_changes_only_the_calling_thread():
    """The engine's batcher thread of a native-kernel model runs torch's ops inline; other threads (the main one,
    another model's worker) keep their thread count, and the kernels keep theirs."""
    before = torch.get_num_threads()
    kernel_threads = kernels.kernel_threads()
    seen: dict[str, int] = {}

    def worker() -> None:
        seen["changed"] = kernels.run_torch_inline()
        seen["threads"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["changed"] and seen["threads"] == 1
    assert torch.get_num_threads() == before and kernels.kernel_threads() == kernel_threads


@pytest.mark.parametrize("name", BUILDS)
def test_fused_residual_and_gelu_epilogues_match_torch(name):
    """The skip connection and GELU that GPT2Runtime fuses into the projection's output pass: the residual gives
    exactly residual + linear (the same float addition), GELU matches torch's tanh approximation to float rounding."""
    kernel = build(name)
    torch.manual_seed(5)
    k, n, m = 96, 130, 5
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    args = (kernel.pack(w), n, torch.rand(n) / 50, w.sum(1, dtype=torch.int32), torch.randn(n))
    x, residual = torch.randn(m, k), torch.randn(m, n)
    plain = kernel.linear(x, *args)
    assert torch.equal(kernel.linear(x, *args, residual=residual), residual + plain)
    torch.testing.assert_close(kernel.linear(x, *args, gelu=True),
                               torch.nn.functional.gelu(plain, approximate="tanh"), rtol=2e-6, atol=2e-6)
    loud = (args[0], n, args[2] * 60, args[3], args[4] * 60)   # outputs of +-100 and more: exp over/underflows
    torch.testing.assert_close(kernel.linear(x, *loud, gelu=True),
                               torch.nn.functional.gelu(kernel.linear(x, *loud), approximate="tanh"),
                               rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="residual must be"):
        kernel.linear(x, *args, residual=residual[:, :-1])
