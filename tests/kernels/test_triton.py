"""The Triton kernels against their PyTorch references, on fresh random inputs of many shapes.

Without a GPU the kernels run in Triton's CPU interpreter at small shapes (CI); with one they
run compiled, and the tests marked `gpu` add the full shapes (`pytest -m gpu`).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Triton's @jit chooses between compiling and interpreting when a function is decorated:
    # its own library (tl.max, tl.cdiv, ...) when triton is first imported, ours when the
    # kernel modules are. So this must come before both.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels import (  # noqa: E402
    apply_rotary_ref,
    fused_add_rms_norm_ref,
    linear_ref,
    paged_attention_ref,
    rms_norm_ref,
    rope_write_kv_ref,
    silu_and_mul_ref,
    triton_argmax,  # noqa: E402
    write_kv_ref,
)
from kernels import triton_activation as activation  # noqa: E402
from kernels import triton_kv_cache as kv  # noqa: E402
from kernels import triton_linear as skinny  # noqa: E402
from kernels import triton_norm as norm  # noqa: E402
from kernels import triton_paged_attention as attn  # noqa: E402
from kernels import triton_qkv as qkv_kernels  # noqa: E402
from kernels import triton_rotary as rotary  # noqa: E402
from tests.kernels.test_reference import build_paged_batch  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _interpreter_ready() -> bool:
    """False when some module imported triton (or our kernels) before TRITON_INTERPRET was set."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(f, InterpretedFunction) for f in (standard.cdiv, attn._paged_attention_kernel))


IN_PROCESS = ON_GPU or _interpreter_ready()
in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported for compiling earlier in this process: see the fresh-process test"
)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_interpreter_process() -> None:
    """The whole module again in a process where nothing imported triton before it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
        cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output has NaNs (an element left unwritten?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_batch(
    rng: random.Random, num_seqs: int, max_ctx: int, decode_share: float, max_q: int | None = None
) -> list[tuple[int, int]]:
    """(context, new queries) per sequence: decodes and prefill chunks over random prefixes."""
    seqs = []
    for _ in range(num_seqs):
        ctx = rng.randint(1, max_ctx)
        q_len = 1 if rng.random() < decode_share else rng.randint(1, min(ctx, max_q or ctx))
        seqs.append((ctx, q_len))
    return seqs


def run_paged_attention(
    seqs: list[tuple[int, int]],
    layout: tuple[int, int, int, int],
    dtype: torch.dtype,
    seed: int,
    config=None,
    max_seq_len: int | None = None,
    num_decodes: int = 0,
) -> float:
    num_heads, num_kv_heads, head_dim, block_size = layout
    batch = build_paged_batch(
        [c for c, _ in seqs], [n for _, n in seqs], num_heads, num_kv_heads, head_dim, block_size, seed
    )
    q, k_cache, v_cache = (t.to(DEVICE, dtype) for t in batch[:3])
    meta = [t.to(DEVICE) for t in batch[3:6]]
    scale = 1 / math.sqrt(head_dim)
    # The reference in fp32 on inputs already rounded to `dtype`: the error is the kernel's own.
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), *meta, scale)
    out = torch.full_like(q, float("nan"))
    attn.paged_attention_triton(
        q, k_cache, v_cache, *meta, scale, out=out, config=config, max_seq_len=max_seq_len, num_decodes=num_decodes
    )
    return rel_err(out, ref)


# (query heads, kv heads, head dim, cache block size); head dim 80 takes the padded-dims path.
LAYOUTS = [(32, 8, 64, 16), (16, 8, 128, 32), (9, 3, 64, 32), (14, 2, 128, 16), (8, 2, 80, 16)]


@in_process
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x))
def test_paged_attention_mixed_prefill_and_decode(layout: tuple[int, int, int, int]) -> None:
    rng = random.Random(str(layout))
    seqs = random_batch(rng, num_seqs=5, max_ctx=90, decode_share=0.5, max_q=30) + [(1, 1), (37, 37)]
    assert run_paged_attention(seqs, layout, torch.float32, seed=rng.randrange(1 << 30)) < TOLERANCE[torch.float32]


@in_process
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_paged_attention_half_precision(dtype: torch.dtype) -> None:
    rng = random.Random(str(dtype))
    seqs = random_batch(rng, num_seqs=4, max_ctx=80, decode_share=0.5)
    assert run_paged_attention(seqs, (16, 8, 64, 16), dtype, seed=rng.randrange(1 << 30)) < TOLERANCE[dtype]


@in_process
@pytest.mark.parametrize(
    ("block_m", "tile_n", "num_splits"),
    [(16, 16, 2), (16, 64, 4), (32, 32, 8), (64, 16, 1)],
    ids=lambda x: str(x),
)
def test_paged_attention_tilings_and_split_kv(block_m: int, tile_n: int, num_splits: int) -> None:
    """Key tiles smaller and larger than a cache block, and the key range cut into slices
    (some of them empty for the shorter sequences) then merged."""
    rng = random.Random(f"{block_m}-{tile_n}-{num_splits}")
    seqs = random_batch(rng, num_seqs=4, max_ctx=150, decode_share=0.7, max_q=20) + [(3, 1)]
    config = attn.AttentionConfig(block_m, tile_n, num_splits, num_warps=4, num_stages=2)
    err = run_paged_attention(seqs, (9, 3, 64, 16), torch.float32, seed=rng.randrange(1 << 30), config=config)
    assert err < TOLERANCE[torch.float32]


@in_process
@pytest.mark.parametrize("num_splits", [None, 2])
def test_paged_attention_decodes_first_run_as_two_launches(num_splits: int | None) -> None:
    rng = random.Random(f"two-launches-{num_splits}")
    seqs = [(rng.randint(1, 120), 1) for _ in range(5)] + [(70, 12), (19, 19), (33, 1)]
    config = None if num_splits is None else attn.AttentionConfig(32, 32, num_splits, num_warps=4, num_stages=2)
    err = run_paged_attention(seqs, (14, 2, 128, 16), torch.float32, seed=11, config=config, num_decodes=5)
    assert err < TOLERANCE[torch.float32]


@in_process
def test_choose_config_splits_small_decode_batches_only() -> None:
    h100 = attn.H100

    def choose(tokens: int, seqs: int, max_seq_len: int | None = None, elem: int = 2):
        return attn.choose_config(tokens, seqs, 32, 8, 128, elem, h100, max_seq_len)

    assert choose(2, 2).num_splits > 1 and choose(2, 2).block_m == 16
    assert choose(2, 2, max_seq_len=64).num_splits == 1
    assert choose(4096, 1).block_m == 128
    assert choose(64, 64).num_splits == 1  # workload K: 640 programs
    # fp32 needs twice the shared memory: a smaller tiling that still fits.
    fp32 = choose(4096, 1, elem=4)
    assert attn._shared_bytes(fp32.block_m, fp32.tile_n, fp32.num_stages, 128, 4) <= h100.shared_mem


@in_process
def test_decode_key_tiles_follow_the_query_group() -> None:
    """Groups of 2 (qwen3-0.6b) decode with 64-key tiles, groups of 4 (llama3-8b) with 32, as
    measured on the GPU; prefill takes the same tiles for both; the environment can put one first."""
    def decode(heads: int, kv_heads: int) -> attn.AttentionConfig:
        return attn.choose_config(256, 256, heads, kv_heads, 128, 2, attn.H100)

    assert decode(16, 8).tile_n == 64 and decode(32, 8).tile_n == 32
    assert decode(16, 8).block_m == decode(32, 8).block_m == 16
    # Over an fp8 cache with V's keys contiguous, groups of 2 take 2 warps; not over a bf16 cache
    # or a d-contiguous V, nor groups of 4.
    def fp8_keys(heads: int, elem: int = 1, v_keys: bool = True) -> attn.AttentionConfig:
        return attn.choose_config(256, 256, heads, 8, 128, 2, attn.H100, kv_elem_size=elem, v_keys=v_keys)

    assert fp8_keys(16).num_warps == 2 and fp8_keys(16).tile_n == 64
    assert fp8_keys(16, elem=2) == fp8_keys(16, v_keys=False) == decode(16, 8)
    assert fp8_keys(32) == decode(32, 8)
    prefill = [attn.choose_config(4096, 1, h, 8, 128, 2, attn.H100) for h in (16, 32)]
    assert prefill[0] == prefill[1]
    assert attn._tiling_from_env("PAGODA_TEST_UNSET_TILING") == []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAGODA_TEST_TILING", "16,128,8,3")
        assert attn._tiling_from_env("PAGODA_TEST_TILING") == [(16, 128, 8, 3)]
        mp.setenv("PAGODA_TEST_TILING", "16,128")
        with pytest.raises(ValueError, match="PAGODA_TEST_TILING"):
            attn._tiling_from_env("PAGODA_TEST_TILING")


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_decode_with_query_groups_of_two_takes_64_key_tiles(dtype: torch.dtype) -> None:
    """The decode-only batches of a 16/8-head model (qwen3-0.6b) run on 64-key tiles: uneven
    contexts, some shorter than one tile, some ending inside a cache block."""
    rng = random.Random(f"group2-{dtype}")
    seqs = [(rng.randint(1, 200), 1) for _ in range(6)] + [(64, 1), (65, 1)]
    limits = attn.device_limits(torch.device(DEVICE))
    config = attn.choose_config(len(seqs), len(seqs), 16, 8, 64, dtype.itemsize, limits)
    assert config.tile_n == 64
    assert run_paged_attention(seqs, (16, 8, 64, 16), dtype, seed=rng.randrange(1 << 30)) < TOLERANCE[dtype]


@in_process
@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 40, 100, False), (3, 64, 256, True), (16, 33, 70, True),
                                                   (7, 16, 512, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skinny_linear_matches_f_linear(m: int, n: int, k: int, bias: bool, dtype: torch.dtype) -> None:
    """Rows 1..16, output and input sizes that are not multiples of the tiles, with and without bias."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    ref = linear_ref(x.float(), w.float(), None if b is None else b.float())
    out = skinny.linear_skinny_triton(x, w, b, config=skinny.LinearConfig(16, 64, 4, 2))
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize(("n", "k", "tiles"), [
    (4096, 4096, (32, 512, 4)),     # llama3-8b o
    (4096, 14336, (32, 512, 4)),    # llama3-8b down
    (1024, 3072, (16, 512, 4)),     # qwen3-0.6b down
    (4096, 1024, (32, 256, 4)),     # qwen3-0.6b qkv: `in` too short for 512
    (6144, 4096, (32, 256, 4)),     # llama3-8b qkv: many outputs
    (40, 100, (16, 64, 4)),         # nothing divides 100: masked 64-wide tiles
])
def test_skinny_linear_default_tiling(n: int, k: int, tiles: tuple[int, int, int]) -> None:
    """The sweep's winners (512-wide key tiles where few outputs meet a long `in`), inside the
    shared memory the pipeliner fills: (stages - 1) buffers of x's tile and the weight's."""
    cfg = skinny.default_config(n, k)
    assert (cfg.block_n, cfg.block_k, cfg.num_stages) == tiles
    assert (cfg.num_stages - 1) * (skinny.MAX_ROWS + cfg.block_n) * cfg.block_k * 2 <= skinny.SHARED_MEMORY_BUDGET


@in_process
def test_skinny_linear_keeps_leading_dims_and_refuses_many_rows() -> None:
    x = torch.randn(2, 3, 32).to(DEVICE)
    w = torch.randn(24, 32).to(DEVICE)
    out = skinny.linear_skinny_triton(x, w)
    assert out.shape == (2, 3, 24)
    assert rel_err(out, linear_ref(x, w)) < 1e-5
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny.linear_skinny_triton(torch.randn(17, 32).to(DEVICE), w)


@in_process
def test_warm_up_covers_every_config_choose_config_picks() -> None:
    """What `warm_up` compiles ahead is every config a batch of this model can get."""
    rng = random.Random(3)
    models = [(32, 8, 128, 2, None, False), (16, 8, 128, 2, None, False), (9, 3, 64, 4, None, False),
              (14, 2, 64, 2, None, False), (16, 8, 128, 2, 1, True), (32, 8, 128, 2, 1, True)]
    for heads, kv_heads, head_dim, elem, kv_elem, v_keys in models:
        possible = set(attn.possible_configs(heads, kv_heads, head_dim, elem, attn.H100, kv_elem, v_keys))
        for _ in range(300):
            seqs = rng.choice([1, 2, 7, 64, 256])
            tokens = seqs if rng.random() < 0.5 else seqs + rng.randint(1, 8192)
            max_seq_len = rng.choice([None, rng.randint(tokens // seqs, 40960)])
            config = attn.choose_config(tokens, seqs, heads, kv_heads, head_dim, elem, attn.H100, max_seq_len,
                                        kv_elem, v_keys)
            assert config in possible, (heads, kv_heads, tokens, seqs, max_seq_len)


@in_process
def test_paged_attention_default_config_for_a_small_decode_batch_splits() -> None:
    rng = random.Random(7)
    seqs = [(rng.randint(100, 300), 1) for _ in range(2)]
    assert run_paged_attention(seqs, (32, 8, 64, 16), torch.float32, seed=7) < TOLERANCE[torch.float32]


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_stores_each_token_at_its_slot_and_skips_padding(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, kv_heads, head_dim = 7, 16, 3, 64
    num_tokens = 40
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[5, 17]] = -1
    # k and v as views into a fused qkv output: token stride larger than kv_heads * head_dim.
    qkv = torch.randn(num_tokens, 5 * kv_heads * head_dim, generator=gen).to(DEVICE, dtype)
    k = qkv[:, : kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, 2 * kv_heads * head_dim : 3 * kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    poison = torch.randn(cache_shape, generator=gen).to(DEVICE, dtype)
    k_ref, v_ref, k_out, v_out = (poison.clone() for _ in range(4))
    write_kv_ref(k, v, k_ref, v_ref, slots.to(DEVICE))
    kv.write_kv_triton(k, v, k_out, v_out, slots.to(DEVICE))
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert not torch.equal(k_out, poison)


@in_process
@pytest.mark.parametrize(("shape", "dtype"), [((9, 1000), torch.bfloat16), ((33, 4, 128), torch.float32),
                                              ((5, 4096), torch.float16)], ids=str)
def test_rms_norm_and_fused_residual_add(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x, residual = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE, dtype)
    eps = 1e-6
    assert rel_err(norm.rms_norm_triton(x, weight, eps), rms_norm_ref(x, weight, eps)) < TOLERANCE[dtype]
    out, res = norm.fused_add_rms_norm_triton(x, residual, weight, eps)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, eps)
    if ON_GPU or dtype != torch.bfloat16:
        assert torch.equal(res, ref_res)
    else:  # the interpreter (Triton 3.9) rounds fp32 -> bf16 toward zero, the GPU to nearest
        assert rel_err(res, ref_res) < 2**-8
    assert rel_err(out, ref_out) < TOLERANCE[dtype]


@in_process
@pytest.mark.parametrize(
    ("num_heads", "head_dim", "dtype"), [(9, 64, torch.float32), (8, 128, torch.bfloat16)], ids=str
)
def test_rotary_with_llama3_scaled_frequencies(num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    from gpu_worker.layers import RotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    rope = RotaryEmbedding(head_dim, 20000, 500000.0, scaling)
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens = 37
    positions = torch.randint(0, 20000, (num_tokens,), generator=gen).to(DEVICE)
    cos, sin = rope.cos_sin(positions)
    # A query view of a fused qkv output: token stride wider than the heads.
    qkv = torch.randn(num_tokens, (num_heads + 2) * head_dim, generator=gen).to(DEVICE, dtype)
    x = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    ref = apply_rotary_ref(x.float(), cos, sin)
    assert rel_err(rotary.apply_rotary_triton(x, cos, sin), ref) < TOLERANCE[dtype]


@in_process
@pytest.mark.parametrize(("shape", "dtype"), [((7, 2 * 1500), torch.bfloat16), ((3, 2, 2 * 64), torch.float32)],
                         ids=str)
def test_silu_and_mul(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[-1])).to(DEVICE, dtype)
    assert rel_err(activation.silu_and_mul_triton(x), silu_and_mul_ref(x)) < TOLERANCE[dtype]


def argmax_cases(device: str, vocab: int, rows: int) -> list[torch.Tensor]:
    """Rows whose argmax torch's and ours could disagree on: ties across chunks (the first wins),
    NaNs (the first NaN wins), -inf everywhere, the maximum at the very end or at 0, -0.0 tied
    with +0.0, all negative values (the key's flipped bits)."""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=gen)
    x[0, [5, vocab - 1, (triton_argmax.CHUNK + 3) % vocab]] = 50.0  # a tie across chunks
    x[1, vocab - 1] = 60.0  # the last column
    x[2] = float("-inf")
    x[3, [(triton_argmax.CHUNK + 1) % vocab, 7]] = float("nan")  # the first NaN, not the larger index
    x[4] = -x[4].abs() - 1  # every value negative
    x[5] = -1.0
    x[5, [9, 3]] = torch.tensor([0.0, -0.0])  # equal: the first (3) wins
    x[6, 0] = 70.0
    return [x.to(device, dtype) for dtype in (torch.float32, torch.bfloat16)]


@in_process
@pytest.mark.parametrize("vocab", [5000, 2048, 17])
def test_argmax_rows_equals_torch(vocab: int) -> None:
    for x in argmax_cases(DEVICE, vocab, 9):
        out = triton_argmax.argmax_rows_triton(x)
        assert out.dtype == torch.int64
        assert out.tolist() == x.argmax(dim=-1).tolist(), x.dtype
    assert triton_argmax.argmax_rows_triton(torch.zeros(0, 7, device=DEVICE)).shape == (0,)


def check_rope_write_kv(num_heads: int, num_kv_heads: int, head_dim: int, normed: bool, dtype: torch.dtype,
                        num_tokens: int, num_blocks: int, block_size: int = 16) -> None:
    """The fused kernel against `rope_write_kv_ref` in float32: q, the written slots, and
    every other slot (padding tokens' included) left as it was."""
    gen = torch.Generator().manual_seed(num_heads * head_dim + num_tokens)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(num_tokens, head_dim // 2, generator=gen) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE) for f in (torch.cos, torch.sin))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[:: max(2, num_tokens // 3)] = -1  # padding tokens
    slots = slots.to(DEVICE)
    weights = [(1 + 0.3 * torch.randn(head_dim, generator=gen)).to(DEVICE, dtype) for _ in range(2)] if normed else []
    q_w, k_w = weights or (None, None)
    poison = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_cache, v_cache = poison.clone(), poison.clone()
    q = qkv_kernels.rope_write_kv_triton(qkv, num_heads, num_kv_heads, cos, sin, k_cache, v_cache, slots,
                                         q_w, k_w, 1e-6)
    k_ref, v_ref = poison.float().clone(), poison.float().clone()
    q_ref = rope_write_kv_ref(qkv.float(), num_heads, num_kv_heads, cos, sin, k_ref, v_ref, slots,
                              q_w.float() if normed else None, k_w.float() if normed else None, 1e-6)
    assert q.shape == (num_tokens, num_heads, head_dim) and q.dtype == dtype
    assert rel_err(q, q_ref) < TOLERANCE[dtype]
    written = slots[slots >= 0]
    flat = [c.view(-1, num_kv_heads, head_dim) for c in (k_cache, v_cache, k_ref, v_ref, poison)]
    assert rel_err(flat[0][written], flat[2][written]) < TOLERANCE[dtype]
    assert torch.equal(flat[1][written], flat[3][written].to(dtype))  # v is copied, not computed
    kept = torch.ones(flat[0].shape[0], dtype=torch.bool, device=DEVICE)
    kept[written] = False
    assert torch.equal(flat[0][kept], flat[4][kept]) and torch.equal(flat[1][kept], flat[4][kept])


@in_process
@pytest.mark.parametrize(("layout", "normed"), [((9, 3, 64), True), ((4, 2, 16), False), ((14, 2, 128), True)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_write_kv_fuses_norms_rotary_and_cache_write(
    layout: tuple[int, int, int], normed: bool, dtype: torch.dtype
) -> None:
    check_rope_write_kv(*layout, normed=normed, dtype=dtype, num_tokens=11, num_blocks=6)


@in_process
@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_model_on_the_triton_kernels_equals_the_reference_path(family, tmp_path, monkeypatch) -> None:
    """A whole tiny model, prefill and decodes, with every kernel the GPU runs (in the
    interpreter here) against the same model on the PyTorch references, in float32."""
    import kernels
    from tests.model_check import make_runner, random_prompts, runner_greedy, runner_last_logits
    from tests.tiny_models import build_tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    build_tiny_model(family, tmp_path, tokenizer)
    prompts = random_prompts(len(tokenizer), lengths=(3, 17, 21))
    results = {}
    for path in ("reference", "triton"):
        if path == "triton":
            monkeypatch.setattr(kernels, "_triton", lambda t: True)
        runner = make_runner(str(tmp_path), device=DEVICE)
        results[path] = (runner_last_logits(runner, prompts), runner_greedy(runner, prompts, max_tokens=4))
    assert rel_err(results["triton"][0], results["reference"][0]) < 1e-5
    assert results["triton"][1] == results["reference"][1]


# ---- full shapes, compiled, on a GPU ---------------------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("layout", [(32, 8, 128, 16), (16, 8, 128, 32), (9, 3, 64, 16), (14, 2, 128, 32),
                                    (32, 8, 64, 32)], ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_paged_attention_full_shapes(layout: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    rng = random.Random(f"{layout}-{dtype}")
    # Long prefill chunks over cached prefixes next to many decodes.
    seqs = random_batch(rng, num_seqs=6, max_ctx=4000, decode_share=0.0)
    seqs += [(rng.randint(1, 4500), 1) for _ in range(40)]
    assert run_paged_attention(seqs, layout, dtype, seed=rng.randrange(1 << 30)) < 1e-2


@gpu
@pytest.mark.parametrize(("m", "k", "n"), [(1, 4096, 6144), (1, 14336, 4096), (1, 4096, 128256), (16, 1024, 4096),
                                           (16, 3072, 1024), (5, 2048, 1024)])
def test_gpu_skinny_linear_full_shapes(m: int, k: int, n: int) -> None:
    """The decode projections of llama3-8b (one stream) and qwen3-0.6b (16 sequences), bf16."""
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    ref = linear_ref(x.float(), w.float())
    assert rel_err(skinny.linear_skinny_triton(x, w), ref) < 1e-2


@gpu
def test_gpu_paged_decode_query_groups_of_two() -> None:
    """Workload T's decode: qwen3-0.6b's 16/8 heads (64-key tiles), 256 uneven contexts."""
    rng = random.Random(256)
    seqs = [(rng.randint(100, 1100), 1) for _ in range(256)]
    config = attn.choose_config(256, 256, 16, 8, 128, 2, attn.device_limits(torch.device("cuda")))
    assert config.tile_n == 64 and config.num_splits == 1
    assert run_paged_attention(seqs, (16, 8, 128, 16), torch.bfloat16, seed=9) < 1e-2


@gpu
def test_gpu_paged_attention_decodes_first_in_two_launches() -> None:
    rng = random.Random(63)
    seqs = [(rng.randint(1, 4500), 1) for _ in range(63)] + random_batch(rng, 3, 4000, decode_share=0.0)
    assert run_paged_attention(seqs, (32, 8, 128, 16), torch.bfloat16, seed=5, num_decodes=63) < 1e-2


@gpu
@pytest.mark.parametrize("batch", [1, 5, 64])
def test_gpu_paged_decode_long_contexts(batch: int) -> None:
    """Workload K's shape and the small batches that split the keys."""
    rng = random.Random(batch)
    seqs = [(rng.randint(3000, 4100), 1) for _ in range(batch)]
    for max_seq_len in (None, 4100):
        seed = rng.randrange(1 << 30)
        assert run_paged_attention(seqs, (32, 8, 128, 16), torch.bfloat16, seed, max_seq_len=max_seq_len) < 1e-2


@gpu
def test_gpu_paged_decode_replays_in_a_cuda_graph_with_new_lengths() -> None:
    """Captured once (split-KV included), replayed with other contexts: no host-side state."""
    layout, scale = (32, 8, 128, 16), 128**-0.5
    batch = build_paged_batch([3000, 1000], [1, 1], *layout, seed=9)
    q, k_cache, v_cache = (t.to("cuda", torch.bfloat16) for t in batch[:3])
    tables, seq_lens, qsl = (t.cuda() for t in batch[3:6])
    out = torch.empty_like(q)

    def call() -> None:
        attn.paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, qsl, scale, out=out)

    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for lens in ([17, 2999], [1000, 1]):
        seq_lens.copy_(torch.tensor(lens))
        q.normal_()
        graph.replay()
        ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, qsl, scale)
        assert rel_err(out, ref) < 1e-2


@gpu
def test_gpu_paged_attention_fp32_is_exact_to_fp32_rounding() -> None:
    rng = random.Random(32)
    seqs = random_batch(rng, num_seqs=8, max_ctx=2000, decode_share=0.5)
    assert run_paged_attention(seqs, (32, 8, 128, 16), torch.float32, seed=1) < 1e-5


@gpu
def test_gpu_argmax_rows_full_vocab() -> None:
    """A 128k vocabulary (llama3's), batch 1 and 256, and the hard rows."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    for rows in (1, 256):
        x = torch.randn(rows, 128256, generator=gen, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(triton_argmax.argmax_rows_triton(x), x.argmax(dim=-1))
    for x in argmax_cases("cuda", 128256, 9):
        assert torch.equal(triton_argmax.argmax_rows_triton(x), x.argmax(dim=-1))
    # The dispatch: Triton up to ARGMAX_TRITON_MAX_ROWS rows, torch's above; the same answers.
    import kernels

    for rows in (17, kernels.ARGMAX_TRITON_MAX_ROWS, kernels.ARGMAX_TRITON_MAX_ROWS + 1):
        x = torch.randn(rows, 151936, generator=gen, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))


@gpu
def test_gpu_pointwise_kernels_full_shapes() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, heads, head_dim, inter = 4096, 4096, 32, 128, 14336
    dtype = torch.bfloat16
    x, residual = (torch.randn(tokens, hidden, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    weight = 1 + 0.1 * torch.randn(hidden, generator=gen, device="cuda", dtype=dtype)
    out, res = norm.fused_add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(res, ref_res) and rel_err(out, ref_out) < 1e-2
    q = torch.randn(tokens, heads, head_dim, generator=gen, device="cuda", dtype=dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=gen, device="cuda") * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    assert rel_err(rotary.apply_rotary_triton(q, cos, sin), apply_rotary_ref(q.float(), cos, sin)) < 1e-2
    gate_up = torch.randn(tokens, 2 * inter, generator=gen, device="cuda", dtype=dtype)
    assert rel_err(activation.silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up.float())) < 1e-2
    slots = torch.randperm(8192 * 16, device="cuda")[:tokens]
    k = torch.randn(tokens, 8, head_dim, generator=gen, device="cuda", dtype=dtype)
    caches = [torch.randn(8192, 16, 8, head_dim, generator=gen, device="cuda", dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    kv.write_kv_triton(k, k, *caches, slots)
    write_kv_ref(k, k, *ref_caches, slots)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])


@gpu
@pytest.mark.parametrize(("layout", "normed"), [((32, 8, 128), False), ((16, 8, 128), True), ((14, 2, 64), True)],
                         ids=str)
def test_gpu_rope_write_kv_full_shapes(layout: tuple[int, int, int], normed: bool) -> None:
    check_rope_write_kv(*layout, normed=normed, dtype=torch.bfloat16, num_tokens=4096, num_blocks=1024)
