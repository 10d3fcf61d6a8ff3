"""The model runner: the worker's model, its KV cache, and one `execute` per scheduler step.

The worker keeps each running request's tokens and block table across steps, so a
`StepPlan` carries only what changed (vLLM v1's design). Each step flattens the scheduled
tokens of all requests into one batch, runs the model once, and samples one token for every
request whose known tokens are now all computed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from gpu_worker.attention import AttentionMetadata
from gpu_worker.loader import LoadedModel, ModelLoadError, load_model
from gpu_worker.sampler import sample
from protocol.config import EngineConfig
from protocol.messages import NewRequestData, SamplingParams, StepPlan, StepResult

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GB = 1.0


@dataclass
class RequestState:
    token_ids: list[int]  # prompt + every token sampled so far
    num_prompt_tokens: int  # the rest of token_ids are outputs (penalties, min_tokens, seeds count them)
    num_computed_tokens: int  # leading tokens whose K/V are in the cache
    sampling: SamplingParams
    generator: torch.Generator | None  # only for seeded requests
    row: int  # this request's row in the block table
    num_blocks: int


@dataclass
class StepBatch:
    """One step's flattened inputs (T tokens of B requests) and where to read logits."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N]: the last token of each request that samples
    sampling_rows: list[int]  # which of the B requests those N are


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = resolve_device(config.device, rank)
        torch.manual_seed(config.seed)
        loaded = load_model(config, self.device)
        self.dtype = loaded.dtype
        self.model = loaded.model
        self.eos_token_ids = loaded.eos_token_ids
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or loaded.max_position_embeddings
        if self.max_model_len > loaded.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len {self.max_model_len} is more than the model's "
                f"{loaded.max_position_embeddings} positions"
            )
        self.num_blocks = self._num_kv_blocks(loaded)
        self.kv_cache = self._allocate_kv_cache(loaded, self.num_blocks)

        self.max_blocks_per_seq = math.ceil(self.max_model_len / self.block_size)
        # One row per live request, kept on the host and updated by difference, so building a
        # step's block tables is one gather rather than a rebuild from Python lists.
        self.block_table = torch.zeros(config.max_num_seqs, self.max_blocks_per_seq, dtype=torch.int32)
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self.requests: dict[str, RequestState] = {}

    # ---- KV cache -------------------------------------------------------------------

    def _num_kv_blocks(self, loaded: LoadedModel) -> int:
        bytes_per_block = (
            2 * loaded.num_layers * self.block_size * loaded.num_kv_heads * loaded.head_dim * self.dtype.itemsize
        )
        if self.config.num_gpu_blocks_override is not None:
            num_blocks = self.config.num_gpu_blocks_override
        elif self.config.kv_cache_memory_gb is not None or self.device.type == "cpu":
            gb = self.config.kv_cache_memory_gb or DEFAULT_CPU_KV_CACHE_GB
            num_blocks = int(gb * 2**30 // bytes_per_block)
        else:
            num_blocks = int(self._profile_free_gpu_memory(loaded) // bytes_per_block)
        max_concurrency = num_blocks * self.block_size / self.max_model_len
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB); max concurrency at %d tokens: %.2fx",
            num_blocks,
            self.block_size,
            num_blocks * bytes_per_block / 2**30,
            self.max_model_len,
            max_concurrency,
        )
        if max_concurrency < 1:
            raise ModelLoadError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: lower --max-model-len or give the cache more memory"
            )
        return num_blocks

    def _allocate_kv_cache(self, loaded: LoadedModel, num_blocks: int) -> torch.Tensor:
        """One tensor [layers, 2, blocks, block_size, kv_heads, head_dim]; each layer gets views.

        Zeroed, not empty: padded decode attention reads unused slots under a mask, and a NaN
        bit pattern there would survive the mask (0 * NaN).
        """
        shape = (loaded.num_layers, 2, num_blocks, self.block_size, loaded.num_kv_heads, loaded.head_dim)
        kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for layer, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = kv_cache[layer, 0], kv_cache[layer, 1]
        return kv_cache

    @torch.inference_mode()
    def _profile_free_gpu_memory(self, loaded: LoadedModel) -> float:
        """Bytes left for the KV cache under gpu_memory_utilization after the largest step.

        Runs one prefill of max_num_batched_tokens on a throwaway cache and measures the peak.
        """
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        num_blocks = math.ceil(num_tokens / self.block_size)
        scratch = self._allocate_kv_cache(loaded, num_blocks)
        torch.cuda.reset_peak_memory_stats(self.device)
        positions = torch.arange(num_tokens, device=self.device)
        block_table = torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None]
        meta = AttentionMetadata(
            slot_mapping=positions,
            block_tables=block_table,
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
        )
        hidden = self.model(torch.zeros_like(positions), positions, meta)
        self.model.compute_logits(hidden[: self.config.max_num_seqs])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        del scratch, hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return total * self.config.gpu_memory_utilization - used_by_others - peak

    # ---- request state --------------------------------------------------------------

    def _add_request(self, new: NewRequestData) -> None:
        # A request sent as new again (resumed after preemption) starts over from its data.
        self._drop_request(new.request_id)
        if not self.free_rows:
            self._grow_block_table()
        generator = None
        if new.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(new.sampling.seed)
        state = RequestState(
            token_ids=list(new.prompt_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids) - new.num_output_tokens,
            num_computed_tokens=new.num_computed_tokens,
            sampling=new.sampling,
            generator=generator,
            row=self.free_rows.pop(),
            num_blocks=0,
        )
        self._append_blocks(state, new.block_ids)
        self.requests[new.request_id] = state

    def _drop_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.free_rows.append(state.row)

    def _append_blocks(self, state: RequestState, block_ids: list[int]) -> None:
        if not block_ids:
            return
        end = state.num_blocks + len(block_ids)
        self.block_table[state.row, state.num_blocks : end] = torch.tensor(block_ids, dtype=torch.int32)
        state.num_blocks = end

    def _grow_block_table(self) -> None:
        """More live requests than max_num_seqs (e.g. preempted ones not yet dropped): add rows."""
        old_rows = self.block_table.shape[0]
        self.block_table = torch.cat([self.block_table, torch.zeros_like(self.block_table)])
        self.free_rows.extend(range(2 * old_rows - 1, old_rows - 1, -1))

    # ---- one step -------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        """Apply the plan's differences, run its tokens, and return the tokens sampled."""
        for request_id in plan.finished_request_ids:
            self._drop_request(request_id)
        for new in plan.new_requests:
            self._add_request(new)
        for cached in plan.cached_requests:
            state = self.requests[cached.request_id]
            self._append_blocks(state, cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        if not plan.num_scheduled_tokens:
            return StepResult(step_id=plan.step_id, request_ids=[], token_ids=[])

        request_ids = list(plan.num_scheduled_tokens)
        states = [self.requests[rid] for rid in request_ids]
        batch = self._prepare_batch(states, [plan.num_scheduled_tokens[rid] for rid in request_ids])
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, batch.attn)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
            sampling_states = [states[i] for i in batch.sampling_rows]
            out = sample(
                logits,
                [s.sampling for s in sampling_states],
                [s.generator for s in sampling_states],
                token_ids=[s.token_ids for s in sampling_states],
                num_prompt_tokens=[s.num_prompt_tokens for s in sampling_states],
                eos_token_ids=self.eos_token_ids,
            )

        for state, n in zip(states, plan.num_scheduled_tokens.values(), strict=True):
            state.num_computed_tokens += n
        token_ids = out.token_ids.tolist()
        for state, token_id in zip(sampling_states, token_ids, strict=True):
            state.token_ids.append(token_id)
        return StepResult(
            step_id=plan.step_id,
            request_ids=[request_ids[i] for i in batch.sampling_rows],
            token_ids=token_ids,
            logprobs=None if out.logprobs is None else out.logprobs.tolist(),
            top_logprob_ids=None if out.top_logprob_ids is None else out.top_logprob_ids.tolist(),
            top_logprobs=None if out.top_logprobs is None else out.top_logprobs.tolist(),
        )

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy each (source, destination) KV block, all layers, K and V.

        Done before the step's forward, so a parallel sample's own copy of the partial prompt
        block holds the prompt's K/V before the sample writes its first token into it.
        """
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _prepare_batch(self, states: list[RequestState], num_tokens: list[int]) -> StepBatch:
        """Flatten the scheduled tokens of `states` into one batch: positions, slots, tables."""
        input_ids: list[int] = []
        sampling_rows: list[int] = []
        for i, (state, n) in enumerate(zip(states, num_tokens, strict=True)):
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            if n < 1 or end > len(state.token_ids) or math.ceil(end / self.block_size) > state.num_blocks:
                raise RuntimeError(
                    f"scheduled tokens {start}..{end} of a request with {len(state.token_ids)} "
                    f"tokens and {state.num_blocks} blocks"
                )
            input_ids.extend(state.token_ids[start:end])
            if end == len(state.token_ids):
                sampling_rows.append(i)

        counts = torch.tensor(num_tokens)
        num_computed = torch.tensor([s.num_computed_tokens for s in states])
        query_start_loc = torch.zeros(len(states) + 1, dtype=torch.int32)
        query_start_loc[1:] = counts.cumsum(0)
        seq_lens = (num_computed + counts).to(torch.int32)
        # Token t belongs to request req[t] and sits at its position num_computed + offset.
        req = torch.repeat_interleave(torch.arange(len(states)), counts)
        positions = torch.arange(len(input_ids)) - query_start_loc[req] + num_computed[req]
        max_blocks = math.ceil(int(seq_lens.max()) / self.block_size)
        block_tables = self.block_table[[s.row for s in states], :max_blocks]
        slot_mapping = block_tables[req, positions // self.block_size].long() * self.block_size + (
            positions % self.block_size
        )
        logits_indices = query_start_loc[1:][sampling_rows].long() - 1

        device = self.device
        return StepBatch(
            input_ids=torch.tensor(input_ids, device=device),
            positions=positions.to(device),
            attn=AttentionMetadata(
                slot_mapping=slot_mapping.to(device),
                block_tables=block_tables.to(device),
                seq_lens=seq_lens.to(device),
                query_start_loc=query_start_loc.to(device),
            ),
            logits_indices=logits_indices.to(device),
            sampling_rows=sampling_rows,
        )


def resolve_device(device: str, rank: int) -> torch.device:
    """The device for `device`, where "auto" is this rank's GPU if CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device)
