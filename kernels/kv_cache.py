"""Writing new keys and values into the paged KV cache.

An fp8 cache (`--kv-cache-dtype fp8`) holds float8 e4m3 values with a scale per layer, K and V
each (vLLM's scheme): a written x is stored as clamp(x / scale, -448, 448) rounded to e4m3, and
attention reads it back as stored * scale. The scales are Python floats (1.0 unless a checkpoint
gives them), constants a CUDA graph can capture. Caches of 16 or 32 bits ignore them.
"""

from __future__ import annotations

import math
import os

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in e4m3 (round to nearest even), saturated to +-448 rather than NaN.

    Computed as x * (1 / scale) in fp32, the same product the Triton kernels take, so both
    store the same bytes."""
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as uint8, for the gathers and scatters PyTorch's CPU kernels lack
    for float8 (index_copy_); other tensors unchanged."""
    return cache.view(torch.uint8) if is_fp8(cache) else cache


def keys_contiguous(cache: torch.Tensor) -> bool:
    """Whether `cache` (indexed [block, slot, kv head, d] like every cache) stores a block's
    slots contiguously for each (kv head, d): memory [num_blocks, num_kv_heads, head_dim,
    block_size], as `keys_contiguous_view` makes it. The V cache on CUDA is laid out so (see
    `gpu_worker.kv_cache`): attention's P.V product contracts over keys, and its tensor-core
    operand wants neighbouring keys in one register, which a d-contiguous fp8 cache can only
    give byte by byte."""
    return cache.dim() == 4 and cache.shape[1] > 1 and cache.stride(1) == 1 and cache.stride(3) == cache.shape[1]


def keys_contiguous_view(blocks: torch.Tensor) -> torch.Tensor:
    """A contiguous [num_blocks, block_size, num_kv_heads, head_dim] tensor's memory taken as
    [num_blocks, num_kv_heads, head_dim, block_size], viewed back in the usual index order.
    A block keeps its bytes, so whole-block copies (copy-on-write) need not know the layout."""
    num_blocks, block_size, num_kv_heads, head_dim = blocks.shape
    return blocks.view(num_blocks, num_kv_heads, head_dim, block_size).permute(0, 3, 1, 2)


def keys_contiguous_copy(cache: torch.Tensor) -> torch.Tensor:
    """`cache`'s values (a contiguous cache) in a new cache laid out `keys_contiguous`."""
    out = keys_contiguous_view(torch.empty_like(cache))
    as_bytes(out).copy_(as_bytes(cache))
    return out


def key_run(block_size: int, tile_n: int) -> int:
    """Over a `keys_contiguous` V cache, the length of the runs of a key tile's keys that lie at
    consecutive addresses (a power of two: the vector loads' hint)."""
    run = math.gcd(block_size, tile_n)
    return run & -run


# PAGODA_V_CACHE_LAYOUT: auto (`v_keys_contiguous`'s rule), head_dim or keys.
V_CACHE_LAYOUTS = ("auto", "head_dim", "keys")
_V_CACHE_LAYOUT = os.environ.get("PAGODA_V_CACHE_LAYOUT", "auto")
if _V_CACHE_LAYOUT not in V_CACHE_LAYOUTS:
    raise ValueError(f"PAGODA_V_CACHE_LAYOUT must be one of {', '.join(V_CACHE_LAYOUTS)}, not {_V_CACHE_LAYOUT!r}")


def v_keys_contiguous(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a V cache of `dtype` on `device` is bound `keys_contiguous` (gpu_worker.kv_cache):
    fp8 caches on CUDA, where the layout measured faster (bf16 caches measured slower: their
    tiles transpose with 16-bit `ldmatrix.trans`). PAGODA_V_CACHE_LAYOUT=head_dim keeps the usual
    layout, `keys` takes this one for any dtype on CUDA. Never on the CPU: its C kernels read the
    usual layout."""
    if device.type != "cuda" or _V_CACHE_LAYOUT == "head_dim":
        return False
    return _V_CACHE_LAYOUT == "keys" or dtype == FP8_KV_DTYPE


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store token t's key and value at cache slot `slot_mapping[t]`, in place.

    k, v: [T, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim] (contiguous, or `keys_contiguous`); slot_mapping: [T] int, slot = block_id *
    block_size + offset in the block; a negative slot marks a padding token, whose K/V are
    dropped (as the Triton kernel does). An fp8 cache stores k / k_scale and v / v_scale (`quantize_fp8`).
    """
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if is_fp8(k_cache):
        k, v = as_bytes(quantize_fp8(k, k_scale)), as_bytes(quantize_fp8(v, v_scale))
    k_cache, v_cache = as_bytes(k_cache), as_bytes(v_cache)
    for cache, x in ((k_cache, k), (v_cache, v)):
        num_blocks, block_size = cache.shape[:2]
        if cache.is_contiguous():
            # A flat view makes a slot a plain row index: one scatter, no per-token loop.
            cache.view(num_blocks * block_size, *cache.shape[2:]).index_copy_(0, slot_mapping, x)
        else:  # keys_contiguous: index (block, slot)
            cache[slot_mapping // block_size, slot_mapping % block_size] = x
