"""The paged KV cache: how many blocks fit (a memory profile on a GPU), their tensor, block copies.

One tensor [layers, 2, blocks, block_size, kv_heads, head_dim] holds every layer's K and V;
each attention layer gets views of its slice. The scheduler hands out the block ids.
"""

from __future__ import annotations

import logging
import math

import torch

from gpu_worker.attention import AttentionMetadata
from gpu_worker.loader import LoadedModel, ModelLoadError
from gpu_worker.parallel import min_over_ranks
from gpu_worker.transfer import to_device
from protocol.config import EngineConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GB = 1.0
# Left free on the GPU beyond the largest step's activations (the CUDA graphs' pool, Triton's
# kernels, allocator slack).
HEADROOM_BYTES = 1 << 30


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
        self.num_blocks = self._num_blocks()
        self.tensor = self._allocate(self.num_blocks)

    def _bytes_per_block(self) -> int:
        loaded = self.loaded
        return 2 * loaded.num_layers * self.block_size * loaded.num_kv_heads * loaded.head_dim * loaded.dtype.itemsize

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
            "KV cache: %d blocks of %d tokens (%.2f GiB); max concurrency at %d tokens: %.2fx",
            num_blocks, self.block_size, num_blocks * bytes_per_block / 2**30, self.max_model_len, max_concurrency,
        )
        if max_concurrency < 1:
            raise ModelLoadError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: lower --max-model-len or give the cache more memory"
            )
        return num_blocks

    def _allocate(self, num_blocks: int) -> torch.Tensor:
        """The cache tensor, its views bound to every attention layer.

        Zeroed, not empty: padded decode attention reads unused slots under a mask, and a NaN
        bit pattern there would survive the mask (0 * NaN).
        """
        loaded = self.loaded
        shape = (loaded.num_layers, 2, num_blocks, self.block_size, loaded.num_kv_heads, loaded.head_dim)
        kv_cache = torch.zeros(shape, dtype=loaded.dtype, device=self.device)
        for layer, attn in enumerate(loaded.model.attention_layers()):
            attn.k_cache, attn.v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
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
        self.tensor[:, :, dst] = self.tensor[:, :, src]
