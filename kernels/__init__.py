"""Kernels: each Triton kernel beside a plain-PyTorch reference with the same function.

The Triton kernels (`kernels/triton_*.py`) are the GPU path. On the CPU the small per-layer
operators (RMSNorm, rotary with the K/V write, SiLU-and-mul, decode attention) run in C
(kernels/cpu_decode.c through kernels/cpu_native.py, compiled on first use) where it applies,
and the references (`*_ref`) otherwise. `PAGODA_KERNELS=torch` forces the references everywhere
(to compare or debug); `PAGODA_CPU_NATIVE=0` only on the CPU.

The Triton modules are imported on first CUDA use only: `import kernels` needs neither Triton
nor a GPU, and Triton's `@jit` decides between compiling and interpreting when a kernel module
is imported, so tests can still set TRITON_INTERPRET=1 after `kernels` was imported.
"""

from __future__ import annotations

import os

import torch

from kernels import cpu_native
from kernels.activation import silu_and_mul_ref
from kernels.kv_cache import write_kv_ref
from kernels.linear import linear_ref
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.paged_attention import paged_attention_ref
from kernels.qkv import rope_write_kv_ref
from kernels.rotary import apply_rotary_ref

_USE_TRITON = os.environ.get("PAGODA_KERNELS", "triton") != "torch"
# Which projections of at most 16 rows (decode steps of small batches) take the Triton kernel of
# kernels/triton_linear.py instead of cuBLAS: "auto" those with at most 4,096 outputs (where it
# beat cuBLAS in `pagoda bench kernels --sweep --only gemm`; docs/BENCHMARKS.md), "1" all of
# them, "0" none.
_SKINNY_LINEAR = os.environ.get("PAGODA_SKINNY_LINEAR", "auto")
if _SKINNY_LINEAR not in ("auto", "0", "1"):
    raise ValueError(f"PAGODA_SKINNY_LINEAR must be auto, 0 or 1, not {_SKINNY_LINEAR!r}")
SKINNY_AUTO_MAX_OUT = 4096
# The order of a step's decodes in the batch (`decodes_longest_first`): "auto" longest first where
# the decode kernel gains from it, "longest" always, "plan" as the scheduler listed them.
_DECODE_ORDER = os.environ.get("PAGODA_DECODE_ORDER", "auto")
if _DECODE_ORDER not in ("auto", "longest", "plan"):
    raise ValueError(f"PAGODA_DECODE_ORDER must be auto, longest or plan, not {_DECODE_ORDER!r}")
ARGMAX_TRITON_MAX_ROWS = 256  # the most rows `pagoda bench kernels --only argmax` timed


def _triton(t: torch.Tensor) -> bool:
    return _USE_TRITON and t.is_cuda


def _native(t: torch.Tensor) -> bool:
    """Whether the C functions of kernels/cpu_native.py may take this CPU tensor's operator."""
    return _USE_TRITON and not t.is_cuda


def native_enabled(t: torch.Tensor) -> bool:
    """Whether a model may hand this CPU tensor's work to kernels/cpu_native.py's C functions
    (not with PAGODA_KERNELS=torch, not on a GPU, not where the library is off or unbuilt)."""
    return _native(t) and cpu_native.library() is not None  # None where PAGODA_CPU_NATIVE=0


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_decodes: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context (see
    `paged_attention_ref`). Hints for the GPU kernel, both optional: max_seq_len bounds
    seq_lens (short contexts are split less); the first num_decodes sequences have one query
    each (they get decode tiles, the prefill chunks after them prefill tiles). k_scale,
    v_scale: an fp8 cache's scales (kernels/kv_cache.py); other caches ignore them."""
    if _triton(q):
        from kernels.triton_paged_attention import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
            max_seq_len=max_seq_len, num_decodes=num_decodes, k_scale=k_scale, v_scale=v_scale,
        )
    if _native(q) and num_decodes:
        # The leading decodes in C, as in a step of decodes only, so that a decode's numbers do
        # not depend on whether a prefill chunk shares its step; the chunks by the reference.
        head = cpu_native.decode_attention(
            q[:num_decodes], k_cache, v_cache, block_tables[:num_decodes], seq_lens[:num_decodes], scale, max_seq_len
        )
        if head is not None:
            if num_decodes == len(seq_lens):
                return head
            tail = paged_attention_ref(
                q[num_decodes:], k_cache, v_cache, block_tables[num_decodes:], seq_lens[num_decodes:],
                query_start_loc[num_decodes:] - num_decodes, scale, k_scale=k_scale, v_scale=v_scale,
            )
            return torch.cat([head, tail])
    return paged_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, k_scale=k_scale, v_scale=v_scale
    )


def native_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor | None:
    """A CPU step of decodes only ([B, heads, d]: one query each) in C, straight from the block
    tables; None where the C function does not apply (a GPU tensor, an fp8 cache): the caller
    then runs `decode_attention` or `paged_attention`."""
    if not _native(q):
        return None
    return cpu_native.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)


def decodes_longest_first(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether a step's decodes should reach attention longest first (the input batch orders them).

    The GPU runs a launch's programs roughly in grid order. Where each one streams one sequence's
    keys and few fit an SM at once, a long sequence started last leaves most SMs idle while it
    finishes; longest first is the classic cure (LPT scheduling). The fp8 decode kernel
    (`kernels.triton_decode_fp8`; 4-5 programs an SM) is such a kernel: T's decode attention on the
    H200, 132.9 us in random order, 121.1 longest first, 122.2 at equal lengths; half that batch
    80.2 -> 63.9. The general kernel gained nothing (bf16 168.2 random, 172.6 longest first:
    it runs at the copy bandwidth either way), so other caches keep the scheduler's order.
    PAGODA_DECODE_ORDER=longest / plan forces either."""
    if _DECODE_ORDER != "auto":
        return _DECODE_ORDER == "longest"
    if not _triton(k_cache):
        return False
    from kernels import triton_decode_fp8

    return triton_decode_fp8.applies(num_heads, k_cache, v_cache)


def warm_up_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> int:
    """Compile every variant of the GPU attention kernel these shapes can launch; the number
    compiled (0 where the reference runs: nothing to compile). q in the model's dtype, also
    over an fp8 cache."""
    if _triton(q):
        from kernels.triton_paged_attention import warm_up

        return warm_up(q, k_cache, v_cache, scale)
    return 0


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store each token's K/V at its cache slot, in place (slot -1: padding, skipped); an fp8
    cache stores k / k_scale and v / v_scale in e4m3."""
    if _triton(k):
        from kernels.triton_kv_cache import write_kv_triton

        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)


def rope_write_kv(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """From a fused QKV output [T, (heads + 2 kv_heads) d]: q and k normed per head (if the
    weights are given) and rotated; k and v stored at their slots (an fp8 cache: k / k_scale,
    v / v_scale); q [T, heads, d] returned."""
    fn = rope_write_kv_ref
    if _triton(qkv):
        from kernels.triton_qkv import rope_write_kv_triton as fn
    elif _native(qkv):  # (declines an fp8 cache)
        q = cpu_native.rope_write_kv(
            qkv, num_heads, num_kv_heads, cos, sin, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, eps
        )
        if q is not None:
            return q
    return fn(
        qkv, num_heads, num_kv_heads, cos, sin, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, eps,
        k_scale=k_scale, v_scale=v_scale,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _triton(x):
        from kernels.triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if _native(x) and (done := cpu_native.rms_norm(x, weight, eps)) is not None:
        return done[0]
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    if _triton(x):
        from kernels.triton_norm import fused_add_rms_norm_triton

        return fused_add_rms_norm_triton(x, residual, weight, eps)
    if _native(x) and (done := cpu_native.rms_norm(x, weight, eps, residual)) is not None:
        return done  # type: ignore[return-value]
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate, up] on the last dim."""
    if _triton(x):
        from kernels.triton_activation import silu_and_mul_triton

        return silu_and_mul_triton(x)
    if _native(x) and (out := cpu_native.silu_and_mul(x)) is not None:
        return out
    return silu_and_mul_ref(x)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64: the first index of each row's maximum (NaN the largest), as
    `x.argmax(dim=-1)`. On CUDA, for at most ARGMAX_TRITON_MAX_ROWS rows, two Triton launches
    (kernels/triton_argmax.py): over 128k bf16 logits in CUDA graphs on an H200, 6.6 us against
    torch's 39.4 at one row, 15.0 against 41.6 at 64, 38.1 against 52.3 at 256 (torch's
    reduction gives a few rows too few blocks; docs/BENCHMARKS.md). More rows: torch's. On the
    CPU a scan in C (kernels/cpu_native.py): ~130 us for torch over 49k fp32 logits."""
    if _triton(x) and x.dim() == 2 and x.shape[0] <= ARGMAX_TRITON_MAX_ROWS:
        from kernels.triton_argmax import argmax_rows_triton

        return argmax_rows_triton(x)
    if _native(x) and (out := cpu_native.argmax_rows(x)) is not None:
        return out
    return x.argmax(dim=-1)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, V] -> [N, k] int64: the indices of each row's k largest values, in no particular
    order (a set: the quantized LM head rescores them). On the CPU a heap in C (kernels/cpu_native.py);
    elsewhere torch.topk."""
    if _native(x) and (out := cpu_native.topk_indices(x, k)) is not None:
        return out
    return x.topk(k, dim=-1).indices


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x W^T takes kernels/triton_linear.py (see _SKINNY_LINEAR): CUDA, 16-bit, <= 16 rows."""
    if _SKINNY_LINEAR == "0" or not _triton(x) or x.dtype == torch.float32 or x.numel() > 16 * x.shape[-1]:
        return False
    return _SKINNY_LINEAR == "1" or weight.shape[0] <= SKINNY_AUTO_MAX_OUT


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b), W [out, in]: the Triton kernel for decode-sized inputs where it is the faster
    (`_skinny`), else `F.linear` (cuBLAS on the GPU)."""
    if _skinny(x, weight):
        from kernels.triton_linear import linear_skinny_triton

        return linear_skinny_triton(x, weight, bias)
    return linear_ref(x, weight, bias)


__all__ = [
    "argmax_rows",
    "apply_rotary_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "linear",
    "linear_ref",
    "native_decode_attention",
    "topk_indices",
    "paged_attention",
    "paged_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_write_kv",
    "rope_write_kv_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "warm_up_paged_attention",
    "write_kv",
    "write_kv_ref",
]
