"""The paged KV cache: how many blocks fit (a memory profile on a GPU), their tensor, block copies.

One tensor [layers, 2, blocks, block_size, kv_heads, head_dim] holds every layer's K and V;
each attention layer gets views of its slice. The scheduler hands out the block ids.

`--kv-cache-dtype fp8` stores that tensor in float8 e4m3 (one byte an element: twice the blocks
in the same memory); each attention layer keeps its K and V scales as Python floats (1.0 unless
set before the cache is bound), which the write and attention kernels take (kernels/kv_cache.py).
On CUDA an fp8 V cache keeps each block's memory as [kv_heads, head_dim, block_size] (a block's
keys contiguous for each d; `kernels.kv_cache.keys_contiguous`), viewed back in the usual index
order, because attention's P.V product contracts over keys and the tensor cores want neighbouring
keys paired in a register. `PAGODA_V_CACHE_LAYOUT=head_dim` keeps the usual layout (`keys`
forces the other on a GPU for any dtype). K, block copies and block sizes are the same either way.

Checkpoints that ship per-layer k_scale / v_scale (vLLM's `*.k_scale`, `*.v_scale`) are not read
yet: the loader would have to map them onto `Attention.k_scale` / `v_scale` before this binds.
"""

from __future__ import annotations

import logging
import math

import torch

from gpu_worker.attention import AttentionMetadata
from gpu_worker.loader import LoadedModel, ModelLoadError
from gpu_worker.parallel import min_over_ranks
from gpu_worker.transfer import to_device
from kernels.kv_cache import FP8_KV_DTYPE, as_bytes, keys_contiguous_view, v_keys_contiguous
from protocol.config import KV_CACHE_DTYPES, EngineConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GB = 1.0
# Left free on the GPU beyond the largest step's activations (the CUDA graphs' pool, Triton's
# kernels, allocator slack).
HEADROOM_BYTES = 1 << 30


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The cache's dtype for `--kv-cache-dtype`: the model's ("auto") or float8 e4m3."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ModelLoadError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype == "auto":
        return model_dtype
    # Triton converts to and from e4m3 (float8e4nv) in hardware from compute capability 8.9 on.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ModelLoadError(
            f"kv_cache_dtype {kv_cache_dtype!r} needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
            "use kv_cache_dtype auto"
        )
    return FP8_KV_DTYPE


class KVCache:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel, device: torch.device, max_model_len: int, max_step_tokens: int
    ) -> None:
        self.config = config
        self.loaded = loaded
        self.device = device
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_step_tokens = max_step_tokens
        self.dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, loaded.dtype, device)
        self.num_blocks = self._num_blocks()
        self.tensor = self._allocate(self.num_blocks)

    def _bytes_per_block(self) -> int:
        loaded = self.loaded
        return 2 * loaded.num_layers * self.block_size * loaded.num_kv_heads * loaded.head_dim * self.dtype.itemsize

    def _num_blocks(self) -> int:
        bytes_per_block = self._bytes_per_block()
        if self.config.num_gpu_blocks_override is not None:
            num_blocks = self.config.num_gpu_blocks_override
        elif self.config.kv_cache_memory_gb is not None or self.device.type == "cpu":
            gb = self.config.kv_cache_memory_gb or DEFAULT_CPU_KV_CACHE_GB
            num_blocks = int(gb * 2**30 // bytes_per_block)
        else:
            num_blocks = int(self._profile_free_gpu_memory() // bytes_per_block)
        # The ranks of a tensor-parallel group hold the same block ids: the smallest pool of any.
        num_blocks = min_over_ranks(num_blocks, self.device)
        max_concurrency = num_blocks * self.block_size / self.max_model_len
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s); max concurrency at %d tokens: %.2fx",
            num_blocks, self.block_size, num_blocks * bytes_per_block / 2**30, str(self.dtype).removeprefix("torch."),
            self.max_model_len, max_concurrency,
        )
        if max_concurrency < 1:
            raise ModelLoadError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: lower --max-model-len or give the cache more memory"
            )
        return num_blocks

    def _allocate(self, num_blocks: int) -> torch.Tensor:
        """The cache tensor, its views bound to every attention layer (with its K/V scales).

        Zeroed, not empty: padded decode attention reads unused slots under a mask, and a NaN
        bit pattern there would survive the mask (0 * NaN).
        """
        loaded = self.loaded
        shape = (loaded.num_layers, 2, num_blocks, self.block_size, loaded.num_kv_heads, loaded.head_dim)
        kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        keys = v_keys_contiguous(self.device, self.dtype)
        for layer, attn in enumerate(loaded.model.attention_layers()):
            attn.k_cache, attn.v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
            if keys:
                attn.v_cache = keys_contiguous_view(attn.v_cache)
            attn.q_dtype = loaded.dtype
            # Plain floats, read once here: the kernels take them as constants (CUDA graphs).
            attn.k_scale, attn.v_scale = _scale(attn.k_scale, layer, "k"), _scale(attn.v_scale, layer, "v")
        return kv_cache

    @torch.inference_mode()
    def _profile_free_gpu_memory(self) -> float:
        """Bytes left for the KV cache under gpu_memory_utilization after the largest step.

        Runs one prefill of max_num_batched_tokens on a throwaway cache and measures the peak.
        """
        model, device = self.loaded.model, self.device
        num_tokens = min(self.max_step_tokens, self.max_model_len)
        num_blocks = math.ceil(num_tokens / self.block_size)
        scratch = self._allocate(num_blocks)
        torch.cuda.reset_peak_memory_stats(device)
        positions = torch.arange(num_tokens, device=device)
        meta = AttentionMetadata(
            slot_mapping=positions,
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        )
        hidden = model(torch.zeros_like(positions), positions, meta)
        model.compute_logits(hidden[: self.config.max_num_seqs])
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - scratch.numel() * scratch.element_size()
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        # vLLM's meaning: this process may use gpu_memory_utilization of the GPU, its weights
        # and activations included (other processes' memory is not this process's to count)...
        share = total * self.config.gpu_memory_utilization - peak
        # ... and no more than the GPU has left: other processes, e.g. another worker group
        # sharing this GPU with half the memory each, keep what they hold.
        activations = peak - torch.cuda.memory_allocated(device)
        return min(share, free - activations - HEADROOM_BYTES)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy each (source, destination) block, all layers, K and V.

        Done before the step's forward, so a parallel sample's own copy of the partial prompt
        block holds the prompt's K/V before the sample writes its first token into it.
        """
        src = to_device([s for s, _ in copies], self.device)
        dst = to_device([d for _, d in copies], self.device)
        cache = as_bytes(self.tensor)  # fp8 as bytes: indexing kernels need not know float8
        cache[:, :, dst] = cache[:, :, src]


def _scale(value: float | torch.Tensor, layer: int, name: str) -> float:
    scale = float(value)
    if not math.isfinite(scale) or scale <= 0:
        raise ModelLoadError(f"layer {layer}'s {name}_scale is {scale}: an fp8 KV cache scale must be positive")
    return scale
