"""The CPU's small operators in C (kernels/cpu_decode.c) against the PyTorch references.

fp32: the same arithmetic up to summation order (a few fp32 ulps); bf16: the same roundings,
so the same bits (attention excepted: SDPA's internal order moves its last bit).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import cpu_native
from kernels.activation import silu_and_mul_ref
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.paged_attention import paged_attention_ref
from kernels.qkv import rope_write_kv_ref

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def built():
    if cpu_native.library() is None:
        pytest.fail("the C kernels did not build on this machine (a C compiler is part of the test setup)")


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, fp32_tol: float = 2e-6) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=fp32_tol, rtol=fp32_tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_add_rms_norm_match_the_references(dtype):
    gen = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(3, 576, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(576, generator=gen).to(dtype)
    out, none = cpu_native.rms_norm(x, weight, 1e-5)
    assert none is None
    close(out, rms_norm_ref(x, weight, 1e-5), dtype)
    out, summed = cpu_native.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_sum = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    close(out, ref_out, dtype)
    assert torch.equal(summed, ref_sum)
    # The dispatch takes the C function on the CPU and gives the same tensors.
    assert torch.equal(kernels.fused_add_rms_norm(x, residual, weight, 1e-5)[0], out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_the_reference_over_a_wide_range(dtype):
    gate_up = torch.linspace(-90, 90, 2 * 2 * 1536).view(2, -1).to(dtype)  # exp's clamps included
    gate_up[1] = torch.randn(2 * 1536, generator=torch.Generator().manual_seed(1)) * 4
    close(cpu_native.silu_and_mul(gate_up), silu_and_mul_ref(gate_up), dtype)


def _rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_rope_write_kv_matches_the_reference(dtype, qk_norm):
    heads, kv_heads, d, block_size = 6, 2, 64, 16
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * d, generator=gen).to(dtype)
    cos, sin = _rotary(torch.tensor([5, 17, 400]), d)
    slots = torch.tensor([5, -1, 70])  # -1: a padding token, written nowhere
    norms = tuple(torch.randn(d, generator=gen).to(dtype) if qk_norm else None for _ in range(2))
    caches = [torch.full((10, block_size, kv_heads, d), 7.0, dtype=dtype) for _ in range(4)]
    q = cpu_native.rope_write_kv(qkv, heads, kv_heads, cos, sin, caches[0], caches[1], slots, *norms, 1e-6)
    q_ref = rope_write_kv_ref(qkv, heads, kv_heads, cos, sin, caches[2], caches[3], slots, *norms, 1e-6)
    close(q, q_ref, dtype)
    close(caches[0], caches[2], dtype)
    assert torch.equal(caches[1], caches[3])
    assert (caches[0].view(-1, kv_heads, d)[5] != 7.0).all() and (caches[0].view(-1, kv_heads, d)[6] == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
@pytest.mark.parametrize("lens", [[5], [1, 37, 300]], ids=["one-thread", "threads"])
def test_decode_attention_reads_the_paged_cache_as_the_reference(dtype, heads, kv_heads, lens):
    """One short sequence runs on one thread; the batch's (sequence, KV head) pairs over 64k
    context x heads x head_dim go to OpenMP's threads."""
    d, block_size, width = 64, 16, 20
    num_blocks = width * len(lens) + 5
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    assert (sum(lens) * heads * d >= 65536) == (len(lens) > 1)
    # Scattered blocks, each table padded past its sequence with blocks it must not read.
    tables = torch.randperm(num_blocks, generator=gen)[: width * len(lens)].view(len(lens), width).to(torch.int32)
    q = torch.randn(len(lens), heads, d, generator=gen).to(dtype)
    out = cpu_native.decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, max(lens))
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-6  # SDPA's own order: its last bf16 bit moves
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # Changing what lies past a sequence's context (its padding blocks) changes nothing.
    used = -(-lens[0] // block_size)
    k_cache[tables[0, used:].long()] = 1e4
    assert torch.equal(cpu_native.decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, max(lens))[0], out[0])


def test_what_the_c_functions_do_not_take_goes_to_the_references():
    x = torch.randn(2, 64)
    assert cpu_native.rms_norm(x.half(), torch.ones(64).half(), 1e-5) is None  # fp16
    assert cpu_native.silu_and_mul(torch.randn(4, 64).t()) is None  # not contiguous
    fp8_cache = torch.zeros(4, 16, 2, 64, dtype=torch.float8_e4m3fn)
    q = torch.randn(1, 4, 64)
    tables, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    assert cpu_native.decode_attention(q, fp8_cache, fp8_cache, tables, lens, 0.1, 1) is None


def test_no_compiler_means_the_references_and_a_warning(tmp_path):
    """In a process where the library cannot be built, every operator still runs (PyTorch's)."""
    code = (
        "import logging, torch, kernels; from kernels import cpu_native; logging.basicConfig();"
        "x = torch.randn(2, 64); w = torch.randn(64);"
        "assert cpu_native.library() is None and cpu_native.rms_norm(x, w, 1e-5) is None;"
        "from kernels.norm import rms_norm_ref;"
        "assert torch.equal(kernels.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)); print('ok')"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "PAGODA_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "the CPU kernels in C are not built" in done.stderr
    assert not list((tmp_path / "cache").rglob("*.so"))


def _quantized_activations(x: torch.Tensor, group: int, parts: int = 1) -> torch.Tensor:
    """x as the integer kernels see it: per group of `group` inputs, round(x / s) * s with
    s = max|x| / 127 (round half to even, as the C code's lrintf); with more `parts`, what each
    part leaves quantized again at a 256th of the last scale (the 4-bit kernel takes 2 parts)."""
    g = x.float().view(*x.shape[:-1], -1, group)
    amax = g.abs().amax(-1, keepdim=True)
    step, inv = amax / 127, torch.where(amax > 0, 127 / amax, 0)
    q = torch.round(g * inv)
    # What each part leaves, rounded once (the C code's fmaf: exact in float64, then to fp32).
    out, rest = q.double() * step.double(), (g.double() - q.double() * step.double()).float()
    for k in range(1, parts):
        q = torch.round(rest * inv * 256**k).clamp(-127, 127)
        out = out + q.double() * step.double() / 256**k
        rest = (rest.double() - q.double() * (step / 256**k).double()).float()
    return out.view(x.shape)


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts,k", [(1, 576), (2, 160), (1, 1536)])
def test_int4_matmul_is_the_quantized_product_exactly(rows, dtype, parts, k):
    """The VNNI kernel's lanes, padding, parts and zero points: the same sum as x quantized per 32
    inputs (in two int8 parts) times torch's int4 kernel's weights (bf16 scales and zeros), to
    fp32 rounding."""
    if not cpu_native.int8_dot_supported():
        pytest.skip("this CPU has no AVX512-VNNI: PyTorch's 4-bit kernel runs")
    gen = torch.Generator().manual_seed(rows * k + parts)
    n = 72
    q = torch.randint(0, 16, (parts, n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(parts, n, k // 32, generator=gen) * 0.02
    zero = (torch.rand(parts, n, k // 32, generator=gen) - 0.5) * 0.2
    packed = cpu_native.PackedInt4(q, scale, zero)
    d, z = scale.bfloat16().double(), zero.bfloat16().double()  # torch's int4 kernel's weights
    w = ((q.double() - 8) * d.repeat_interleave(32, -1) + z.repeat_interleave(32, -1)).sum(0)
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen) * 3).to(dtype)
    expected = _quantized_activations(x.float(), 32, parts=2) @ w.T
    y = cpu_native.int4_matmul(x, packed)
    assert y.dtype == dtype and y.shape == (rows, n)
    tol = 8e-3 if dtype == torch.bfloat16 else 2e-5  # bf16: the output's own rounding
    torch.testing.assert_close(y.double(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    # A row's result does not depend on the rows beside it (decodes beside a prefill chunk).
    for i in range(rows):
        assert torch.equal(cpu_native.int4_matmul(x[i : i + 1].contiguous(), packed)[0], y[i])
    # Against x itself: each input within a 512th of its group's step (max|x| / 127), so the
    # product within sum |w| * step / 512 (inside bf16 activations' 2^-9 unless a group holds an
    # outlier over ~100x its other inputs); also with such an outlier (the first input).
    for xs in (x, torch.cat([torch.full_like(x[:, :1], 300.0), x[:, 1:]], dim=1).contiguous()):
        step = xs.float().view(rows, -1, 32).abs().amax(-1).repeat_interleave(32, -1).double() / 127
        bound = (step / 512) @ w.abs().T + tol * (xs.double() @ w.T).abs().max()
        assert ((cpu_native.int4_matmul(xs, packed).double() - xs.double() @ w.T).abs() <= bound * 1.001).all()


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("k", [576, 100])
def test_int8_matmul_is_the_quantized_product_exactly(rows, k):
    if not cpu_native.int8_dot_supported():
        pytest.skip("this CPU has no AVX512-VNNI: PyTorch's int8 kernel runs")
    gen = torch.Generator().manual_seed(k + rows)
    q = torch.randint(-127, 128, (300, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(300, generator=gen) * 0.01
    packed = cpu_native.PackedInt8(q, scale)
    assert torch.equal(packed.dequantize(), q.float() * scale[:, None])
    x = torch.randn(rows, k, generator=gen) * 4
    padded = torch.nn.functional.pad(x, (0, -k % 64))
    expected = (_quantized_activations(padded, 64, parts=2)[:, :k] @ (q.double() * scale.double()[:, None]).T)
    y = cpu_native.int8_matmul(x, packed)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(cpu_native.int8_matmul(x[-1:].contiguous(), packed)[0], y[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_and_argmax_select_as_torch(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 49152, generator=gen).to(dtype)
    x[1, 100:110] = 9.0  # ties at the top: argmax takes the first
    x[2, 7] = float("nan")  # NaN counts as the largest
    x[2, 9] = float("nan")
    x[3] = 0.0  # all equal
    top = cpu_native.topk_indices(x, 32)
    for row, idx in zip(x, top, strict=True):
        assert len(set(idx.tolist())) == 32
        expected = row.float().nan_to_num(nan=float("inf")).topk(32).values
        assert torch.equal(row.float()[idx].nan_to_num(nan=float("inf")).sort(descending=True).values, expected)
    assert {7, 9} <= set(top[2].tolist())
    assert torch.equal(cpu_native.argmax_rows(x), x.argmax(dim=-1))
    assert cpu_native.argmax_rows(x).tolist()[:4] == [x[0].float().argmax().item(), 100, 7, 0]
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))


def test_a_decode_beside_a_prefill_chunk_gets_the_same_numbers_as_alone():
    """Decodes lead a mixed step (`num_decodes`): they take the C function there too, so a
    decode's attention is the same bits with or without a prefill chunk in its step."""
    heads, kv_heads, d, block_size = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(7)
    k_cache = torch.randn(30, block_size, kv_heads, d, generator=gen)
    v_cache = torch.randn(30, block_size, kv_heads, d, generator=gen)
    tables = torch.randperm(30, generator=gen)[:24].view(3, 8).to(torch.int32).contiguous()
    seq_lens = torch.tensor([40, 90, 120], dtype=torch.int32)  # two decodes, then a 20-token chunk
    qsl = torch.tensor([0, 1, 2, 22], dtype=torch.int32)
    q = torch.randn(22, heads, d, generator=gen)
    mixed = kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125, max_seq_len=120, num_decodes=2)
    alone = kernels.paged_attention(q[:2].contiguous(), k_cache, v_cache, tables[:2].contiguous(), seq_lens[:2],
                                    qsl[:3], 0.125, max_seq_len=90, num_decodes=2)
    assert torch.equal(mixed[:2], alone)
    ref = paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, qsl, 0.125)
    torch.testing.assert_close(mixed, ref, atol=2e-6, rtol=2e-6)
    assert torch.equal(mixed[2:], ref[2:])  # the chunk: the reference itself
