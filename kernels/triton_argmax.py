"""The argmax of each row of logits, in two Triton launches (`torch.argmax(x, dim=-1)`'s result).

Greedy decoding takes the argmax of every row of the LM head's output. At batch 1 PyTorch's
reduction gives a row of 128,256 logits to few thread blocks: 37 us on an H200 (llama3-8b's
step profile, docs/BENCHMARKS.md), more than a decoder layer's attention. Here the row is cut
into chunks, one program each (stage 1: the chunk's best key and its first index), and one
program a row picks the best chunk (stage 2; the first chunk on ties, so the first index of
the row's maximum, as torch's). Values are compared as integer keys: a float's bits made
monotone (negatives' magnitude bits flipped), every NaN mapped above +inf, so a NaN wins as it
does in torch.argmax; -0.0 and +0.0 get the same key (equal, as torch compares them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_begin, pdl_kwargs

CHUNK = 2048
NAN_KEY = 0x7FC00001  # above +inf's key (0x7F800000) and every other NaN's


@triton.jit
def _chunk_argmax_kernel(x_ptr, key_ptr, idx_ptr, V, stride_x, NUM_CHUNKS, CHUNK_: tl.constexpr,
                         NAN_KEY_: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK_ + tl.arange(0, CHUNK_)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in x's value
    key = tl.where(x == 0.0, 0, key)  # -0.0 == +0.0
    key = tl.where(x != x, NAN_KEY_, key)
    best, where = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    out = row * NUM_CHUNKS + chunk
    tl.store(key_ptr + out, best)
    tl.store(idx_ptr + out, chunk * CHUNK_ + where)


@triton.jit
def _pick_chunk_kernel(key_ptr, idx_ptr, out_ptr, NUM_CHUNKS, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < NUM_CHUNKS
    key = tl.load(key_ptr + row * NUM_CHUNKS + offs, mask=ok, other=-2147483648)
    _, best = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * NUM_CHUNKS + best).to(tl.int64))


def argmax_rows_triton(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] (fp32/bf16/fp16, last dim contiguous) -> [N] int64, the first index of each row's
    maximum."""
    if x.dim() != 2:
        raise ValueError(f"argmax_rows takes [rows, vocab], not {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, v = x.shape
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    chunks = triton.cdiv(v, CHUNK)
    keys = torch.empty(n, chunks, dtype=torch.int32, device=x.device)
    idx = torch.empty(n, chunks, dtype=torch.int32, device=x.device)
    pdl = pdl_kwargs(x.device)
    _chunk_argmax_kernel[(n, chunks)](x, keys, idx, v, x.stride(0), chunks, CHUNK_=CHUNK, NAN_KEY_=NAN_KEY,
                                      num_warps=4, **pdl)
    _pick_chunk_kernel[(n,)](keys, idx, out, chunks, BLOCK=max(16, triton.next_power_of_2(chunks)), num_warps=1,
                             **pdl)
    return out
