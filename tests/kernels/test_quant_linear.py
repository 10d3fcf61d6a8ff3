"""GGUF blocks kept quantized: the unpacking into 4-bit parts, the CPU kernel against its reference,
and the quantized LM head's rescored logits."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from gpu_worker.gguf_quant import GGUFQuantized
from gpu_worker.layers import RESCORED, VocabParallelEmbedding
from kernels.quant_linear import Int4Parts, Int4Weight, int4_linear_ref

T = gguf.GGMLQuantizationType
EXACT = [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0]


def random_gguf(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> GGUFQuantized:
    """Random blocks of `qtype` with scales of a trained model's size (the rest of each block is
    random bytes: every 4/6/8-bit value and K-quant sub-scale occurs)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)

    def put(offset: int, low: float, high: float) -> None:
        values = rng.uniform(low, high, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = values.view(np.uint8).reshape(-1, 2)

    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        put(0, 0.001, 0.02)
    if qtype == T.Q4_1:
        put(2, -0.1, 0.1)
    if qtype == T.Q4_K:
        put(0, 1e-4, 2e-3)
        put(2, 1e-4, 2e-3)
    if qtype == T.Q6_K:
        put(type_size - 2, 1e-4, 2e-3)
    return GGUFQuantized(qtype, blocks.reshape(rows, -1), (rows, cols))


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_parts_are_the_blocks_exactly(qtype) -> None:
    w = random_gguf(qtype, 48, 512)
    parts = w.int4_parts()
    assert parts.q.dtype == torch.uint8 and int(parts.q.max()) <= 15
    assert parts.q.shape[0] == (2 if qtype == T.Q8_0 else 1)
    assert torch.equal(parts.dequantize(), w.dequantize())


def test_q6_k_is_requantized_to_within_a_254th_of_each_group() -> None:
    w = random_gguf(T.Q6_K, 48, 512)
    exact = w.dequantize().view(48, -1, 32)
    err = (w.int4_parts().dequantize().view(48, -1, 32) - exact).abs()
    group_max = exact.abs().amax(-1, keepdim=True)
    assert bool((err <= group_max / 254 * (1 + 1e-5)).all())
    assert err.max() > 0  # not exact: Q6_K's 16-wide scales do not fit a 32-group


@pytest.mark.parametrize("qtype", EXACT + [T.Q6_K], ids=lambda t: t.name)
def test_cpu_kernel_matches_its_reference(qtype) -> None:
    parts = random_gguf(qtype, 96, 256, seed=1).int4_parts()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    ref = int4_linear_ref(x, parts)
    scale = ref.abs().max()
    # bf16 activations and output (torch's kernel): within bf16's rounding of the sum.
    assert ((Int4Weight(parts, torch.bfloat16)(x) - ref).abs().max() / scale) < 2**-7
    # The default where the CPU has VNNI (kernels/cpu_decode.c; tests/kernels/test_cpu_native.py
    # checks it exactly): x in two int8 parts per group of 32, far finer than bf16; what is left
    # is the scales' bf16 rounding, which torch's kernel has too.
    assert ((Int4Weight(parts)(x) - ref).abs().max() / scale) < 2**-7
    # fp32 activations: the same sum to fp32 rounding (what the model tests rely on).
    assert ((Int4Weight(parts, torch.float32)(x) - ref).abs().max() / scale) < 1e-5


def test_stacked_projections_of_different_part_counts() -> None:
    a, b = random_gguf(T.Q4_K, 32, 256, seed=2).int4_parts(), random_gguf(T.Q8_0, 64, 256, seed=3).int4_parts()
    stacked = Int4Parts.cat_rows([a, b])
    assert stacked.q.shape == (2, 96, 256)  # the one-part projection padded with a zero part
    assert torch.equal(stacked.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    x = torch.randn(3, 256)
    y = Int4Weight(stacked, torch.float32)(x)
    torch.testing.assert_close(y, x @ torch.cat([a.dequantize(), b.dequantize()]).T, rtol=1e-5, atol=1e-5)


def test_embedding_rows_and_rescored_logits() -> None:
    vocab, hidden = 512, 256
    w = random_gguf(T.Q8_0, vocab, hidden, seed=4)
    dense = w.dequantize()
    ids = torch.tensor([[3, 500], [7, 7]])
    assert torch.equal(w.take_rows(ids), dense[ids])

    emb = VocabParallelEmbedding(vocab, hidden)
    emb.load_quantized("weight", w, None)
    assert torch.equal(emb(ids), dense[ids])
    h = torch.randn(4, hidden, generator=torch.Generator().manual_seed(5))
    logits, exact = emb.logits(h), h @ dense.T
    # Each row's RESCORED best (by the int8 copy) are recomputed in fp32, which takes in the
    # truly best few: those and the argmax are exact...
    top = exact.topk(RESCORED // 4, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    rescored = (logits - exact).abs() < 1e-4
    assert int(rescored.sum()) >= RESCORED * len(h)  # the rescored ones (and a few close by chance)
    # ... and the rest carry the per-row int8 copy's error.
    assert 0 < (logits - exact).abs().max() < exact.abs().max() * 2**-5
