"""The model runner: the worker's model, its KV cache, and one `execute` per scheduler step.

The worker keeps each running request's tokens and block table across steps, so a
`StepPlan` carries only what changed (vLLM v1's design). Each step flattens the scheduled
tokens of all requests into one batch, runs the model once, and samples one token for every
request whose known tokens are now all computed.

The hot path has no per-token Python: every live request owns a row of host arrays (its
tokens, its block table, its counts), and a step's inputs are gathered from those rows with
numpy fancy indexing into pinned buffers, then copied to persistent device buffers without
blocking. On CUDA, decode-only steps (one token per request) replay a CUDA graph captured for
the smallest batch size of a ladder that holds them, padded with rows that write nowhere
(slot -1); `--enforce-eager` turns graphs off. Mixed prefill/decode steps run eagerly, with
the decodes moved to the front so the attention kernel gives them decode tiles.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.attention import AttentionMetadata
from gpu_worker.loader import LoadedModel, ModelLoadError, load_model
from gpu_worker.sampler import sample
from gpu_worker.transfer import to_device
from kernels import warm_up_paged_attention
from protocol.config import EngineConfig
from protocol.messages import NewRequestData, SamplingParams, StepPlan, StepResult

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GB = 1.0


@dataclass
class RequestState:
    sampling: SamplingParams
    generator: torch.Generator | None  # only for seeded requests
    row: int  # this request's row in the runner's host arrays


@dataclass
class StepBatch:
    """One step's flattened inputs (T tokens of B requests, decodes first) on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N]: the last token of each request that samples
    rows: np.ndarray  # [B] the requests' rows, in batch order
    request_ids: list[str]  # [B] in batch order
    sampling: np.ndarray  # [N] indices into the batch of the requests that sample
    staging: _Staging  # the host buffers this step was staged in
    graph_size: int | None = None  # a decode-only batch padded to this captured size
    mixed_size: int | None = None  # a batch with prefill chunks padded to this many tokens


class _Staging:
    """One step's pinned host buffers (numpy views for filling them) before their copy to the device."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool) -> None:
        def buf(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        self.input_ids = buf(max_tokens, torch.int64)
        self.positions = buf(max_tokens, torch.int64)
        self.slots = buf(max_tokens, torch.int64)
        self.seq_lens = buf(max_seqs, torch.int32)
        self.qsl = buf(max_seqs + 1, torch.int32)
        self.logits_idx = buf(max_seqs, torch.int64)
        self.tables = buf(max_seqs * max_blocks, torch.int32)
        self.sampled = buf(max_seqs, torch.int64)  # the step's sampled tokens, read back
        self.np = {name: t.numpy() for name, t in vars(self).items()}


@dataclass
class PendingStep:
    """A launched step whose sampled tokens may still be on their way from the device."""

    step_id: int
    request_ids: list[str]  # of the requests that sample, in output order
    rows: np.ndarray  # their rows
    positions: np.ndarray  # where each sampled token goes in its row
    device_tokens: torch.Tensor | None = None  # [N], read by the next step's decodes
    host_tokens: torch.Tensor | None = None  # pinned [N], filled by a non-blocking copy
    event: torch.cuda.Event | None = None  # recorded after that copy (CUDA only)
    # [N], [N, k], [N, k] on the host, filled by non-blocking copies like host_tokens
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    rows_to_free: list[int] = field(default_factory=list)  # dropped meanwhile, freed once finished
    launch_s: float = 0.0
    idle_s: float = 0.0  # how long the worker waited for this step's plan with nothing running
    result: StepResult | None = None


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture steps with prefill chunks at: 16, 32, 64, ... and max_tokens."""
    sizes = [1 << i for i in range(4, max_tokens.bit_length()) if 1 << i < max_tokens]
    return sizes + [max_tokens] if max_tokens >= 16 else []


def cudagraph_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, then every multiple of 8 up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


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
        self.max_num_batched_tokens = config.token_budget(on_gpu=self.device.type == "cuda")
        self.max_model_len = config.max_model_len or loaded.max_position_embeddings
        if self.max_model_len > loaded.max_position_embeddings:
            raise ModelLoadError(
                f"max_model_len {self.max_model_len} is more than the model's "
                f"{loaded.max_position_embeddings} positions"
            )
        self.num_blocks = self._num_kv_blocks(loaded)
        self.kv_cache = self._allocate_kv_cache(loaded, self.num_blocks)
        self.max_blocks_per_seq = math.ceil(self.max_model_len / self.block_size)
        self.requests: dict[str, RequestState] = {}
        self.unfinished: PendingStep | None = None  # the last launched step, until finished
        self._allocate_rows(config.max_num_seqs)
        self._allocate_step_buffers(max(self.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs)
        # Decode graphs by padded batch size, and what each one reads and writes.
        self.graphs: dict[int, Callable[[], None]] = {}
        self.graph_hidden: dict[int, torch.Tensor] = {}
        # Graphs of steps with prefill chunks, by padded token count (--cuda-graph-mixed-tokens).
        self.mixed_graphs: dict[int, Callable[[], None]] = {}
        self.mixed_graph_hidden: dict[int, torch.Tensor] = {}
        self._graph_pool: tuple | None = None
        if self.device.type == "cuda":
            self._warm_up_kernels()
            if not config.enforce_eager:
                if config.cuda_graph_mixed_tokens > 0:  # the larger graphs first, into the shared pool
                    self.capture_mixed_graphs(
                        mixed_graph_sizes(min(config.cuda_graph_mixed_tokens, self.max_step_tokens))
                    )
                self.capture_decode_graphs(cudagraph_sizes(config.max_num_seqs))

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
        num_tokens = min(self.max_num_batched_tokens, self.max_model_len)
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

    # ---- host state: one row per live request ----------------------------------------

    def _allocate_rows(self, num_rows: int) -> None:
        """Per-row host arrays: tokens (prompt + outputs), counts, block tables."""
        self.token_ids = np.zeros((num_rows, self.max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_computed = np.zeros(num_rows, dtype=np.int64)
        self.num_row_blocks = np.zeros(num_rows, dtype=np.int64)
        self.block_table = np.zeros((num_rows, self.max_blocks_per_seq), dtype=np.int32)
        # A row's newest token may still be on the device (sampled by the unfinished step):
        # then pending_step is that step's id and pending_index its place in the step's output.
        self.pending_step = np.full(num_rows, -1, dtype=np.int64)
        self.pending_index = np.zeros(num_rows, dtype=np.int64)
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def _grow_rows(self) -> None:
        """More live requests than rows (e.g. preempted ones not yet dropped): double them."""
        old = self.num_tokens.shape[0]
        arrays = ("token_ids", "num_tokens", "num_prompt_tokens", "num_computed", "num_row_blocks", "block_table")
        for name in arrays:
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        self.pending_step = np.concatenate([self.pending_step, np.full(old, -1, dtype=np.int64)])
        self.pending_index = np.concatenate([self.pending_index, np.zeros(old, dtype=np.int64)])
        self.free_rows.extend(range(2 * old - 1, old - 1, -1))

    def _allocate_step_buffers(self, max_tokens: int, max_seqs: int) -> None:
        """Pinned host staging buffers, two sets, and the device buffers they are copied into.

        The device buffers persist: a captured graph reads the very same memory every replay.
        Steps alternate between the two staging sets: while step n's copies may still wait in
        the stream, step n + 1 is prepared in the other set; step n + 2 reuses the first only
        after step n has finished (its sampled tokens were read back, so its copies ran).
        """
        self.max_step_tokens, self.max_step_seqs = max_tokens, max_seqs
        pin = self.device.type == "cuda"
        self.staging = [_Staging(max_tokens, max_seqs, self.max_blocks_per_seq, pin) for _ in range(2)]
        self.next_staging = 0

        def device(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=self.device)

        self.input_ids_gpu = device(max_tokens, torch.int64)
        self.positions_gpu = device(max_tokens, torch.int64)
        self.slots_gpu = device(max_tokens, torch.int64)
        self.seq_lens_gpu = device(max_seqs, torch.int32)
        self.qsl_gpu = device(max_seqs + 1, torch.int32)
        self.logits_idx_gpu = device(max_seqs, torch.int64)
        # Block tables are staged packed ([B, blocks in use], contiguous) and scattered on the
        # device into the full-width table that graphs read.
        self.tables_packed_gpu = device(max_seqs * self.max_blocks_per_seq, torch.int32)
        self.tables_gpu = torch.zeros(max_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)

    def _add_request(self, new: NewRequestData) -> None:
        # A request sent as new again (resumed after preemption) starts over from its data.
        self._drop_request(new.request_id)
        if not self.free_rows:
            self._grow_rows()
        generator = None
        if new.sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(new.sampling.seed)
        row = self.free_rows.pop()
        n = len(new.prompt_token_ids)
        self.token_ids[row, :n] = new.prompt_token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = n - new.num_output_tokens
        self.num_computed[row] = new.num_computed_tokens
        self.num_row_blocks[row] = 0
        self._append_blocks(row, new.block_ids)
        self.requests[new.request_id] = RequestState(new.sampling, generator, row)

    def _drop_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        self.pending_step[state.row] = -1
        if self.unfinished is not None:
            # The unfinished step may still write this row's sampled token: free it after.
            self.unfinished.rows_to_free.append(state.row)
        else:
            self.free_rows.append(state.row)

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_row_blocks[row])
        self.block_table[row, start : start + len(block_ids)] = block_ids
        self.num_row_blocks[row] = start + len(block_ids)

    # ---- one step -------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        """Apply the plan's differences, run its tokens, and return the tokens sampled."""
        return self.finish(self.launch(plan))

    def launch(self, plan: StepPlan) -> PendingStep:
        """Start the plan's step on the device and return without waiting for it.

        At most one earlier step may be unfinished: its sampled tokens are still on the
        device, and the decodes of this step read them from there. `finish` each launched
        step, in order, to get its StepResult.
        """
        prev = self.unfinished
        began = time.perf_counter()
        for request_id in plan.finished_request_ids:
            self._drop_request(request_id)
        for new in plan.new_requests:
            self._add_request(new)
        for cached in plan.cached_requests:
            row = self.requests[cached.request_id].row
            self._append_blocks(row, cached.new_block_ids)
            self.num_computed[row] = cached.num_computed_tokens
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        if not plan.num_scheduled_tokens:
            step = PendingStep(plan.step_id, [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
            step.result = StepResult(step_id=plan.step_id, request_ids=[], token_ids=[])
            step.result.execute_s = time.perf_counter() - began
            return step

        batch = self._prepare_batch(plan.num_scheduled_tokens, prev)
        sampled_rows = batch.rows[batch.sampling]
        states = [self.requests[batch.request_ids[i]] for i in batch.sampling]
        params = [s.sampling for s in states]
        needs_history = any(p.needs_history for p in params)
        if prev is not None and needs_history:
            self.finish(prev)  # the penalties read every token so far on the host
        with torch.inference_mode():
            if batch.graph_size is not None:
                self.graphs[batch.graph_size]()
                hidden = self.graph_hidden[batch.graph_size]
            elif batch.mixed_size is not None:
                self.mixed_graphs[batch.mixed_size]()
                hidden = self.mixed_graph_hidden[batch.mixed_size]
            else:
                hidden = self.model(batch.input_ids, batch.positions, batch.attn)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
            history = [self.token_ids[r, : self.num_tokens[r]] for r in sampled_rows] if needs_history else None
            out = sample(
                logits,
                params,
                [s.generator for s in states],
                token_ids=history,
                num_prompt_tokens=self.num_prompt_tokens[sampled_rows].tolist(),
                num_outputs=(self.num_tokens[sampled_rows] - self.num_prompt_tokens[sampled_rows]).tolist(),
                eos_token_ids=self.eos_token_ids,
            )

        # Each sampling row's next token now exists, on the device: count it, remember where.
        step = PendingStep(
            plan.step_id,
            [batch.request_ids[i] for i in batch.sampling],
            sampled_rows,
            self.num_tokens[sampled_rows].copy(),
            device_tokens=out.token_ids,
            launch_s=time.perf_counter() - began,
        )
        self.num_tokens[sampled_rows] += 1
        self.pending_step[sampled_rows] = plan.step_id
        self.pending_index[sampled_rows] = np.arange(len(sampled_rows))
        host = batch.staging.sampled[: len(sampled_rows)]
        host.copy_(out.token_ids, non_blocking=True)
        step.host_tokens = host
        if out.logprobs is not None:
            # To (pinned) host memory without waiting, like the tokens; read in `finish`.
            assert out.top_logprob_ids is not None and out.top_logprobs is not None
            step.logprobs = (
                out.logprobs.to("cpu", non_blocking=True),
                out.top_logprob_ids.to("cpu", non_blocking=True),
                out.top_logprobs.to("cpu", non_blocking=True),
            )
        if self.device.type == "cuda":
            step.event = torch.cuda.Event()
            step.event.record()  # after every copy to the host above
        self.unfinished = step
        return step

    def step_done(self, step: PendingStep) -> bool:
        """Whether `finish(step)` would return without waiting for the device."""
        return step.result is not None or step.event is None or step.event.query()

    def finish(self, step: PendingStep) -> StepResult:
        """Wait for a launched step's sampled tokens, record them, and return its result."""
        if step.result is not None:
            return step.result
        began = time.perf_counter()
        if step.event is not None:
            step.event.synchronize()
        assert step.host_tokens is not None
        token_ids = step.host_tokens.tolist()
        self.token_ids[step.rows, step.positions] = token_ids
        mine = self.pending_step[step.rows] == step.step_id
        self.pending_step[step.rows[mine]] = -1
        self.free_rows.extend(step.rows_to_free)
        if self.unfinished is step:
            self.unfinished = None
        logprobs, top_ids, top_logprobs = (t.tolist() for t in step.logprobs) if step.logprobs else (None,) * 3
        step.result = StepResult(
            step_id=step.step_id,
            request_ids=step.request_ids,
            token_ids=token_ids,
            logprobs=logprobs,
            top_logprob_ids=top_ids,
            top_logprobs=top_logprobs,
        )
        step.host_tokens = step.device_tokens = None
        step.result.execute_s = step.launch_s + time.perf_counter() - began
        step.result.idle_s = step.idle_s
        return step.result

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy each (source, destination) KV block, all layers, K and V.

        Done before the step's forward, so a parallel sample's own copy of the partial prompt
        block holds the prompt's K/V before the sample writes its first token into it.
        """
        src = to_device([s for s, _ in copies], self.device)
        dst = to_device([d for _, d in copies], self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _prepare_batch(self, num_scheduled: dict[str, int], prev: PendingStep | None) -> StepBatch:
        """Gather the scheduled tokens into the step buffers: ids, positions, slots, tables.

        Decodes (one token) go first, in the plan's order, then the prefill chunks.
        """
        request_ids = list(num_scheduled)
        rows = np.fromiter((self.requests[r].row for r in request_ids), dtype=np.int64, count=len(request_ids))
        counts = np.fromiter(num_scheduled.values(), dtype=np.int64, count=len(request_ids))
        if ((counts[:-1] > 1) & (counts[1:] == 1)).any():  # a decode after a prefill chunk
            order = np.argsort(counts > 1, kind="stable")
            rows, counts = rows[order], counts[order]
            request_ids = [request_ids[i] for i in order]
        num_seqs, num_tokens = len(rows), int(counts.sum())
        start = self.num_computed[rows]
        end = start + counts
        bad = (counts < 1) | (end > self.num_tokens[rows]) | (-(-end // self.block_size) > self.num_row_blocks[rows])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RuntimeError(
                f"scheduled tokens {start[i]}..{end[i]} of request {request_ids[i]} with "
                f"{self.num_tokens[rows[i]]} tokens and {self.num_row_blocks[rows[i]]} blocks"
            )
        if num_tokens > self.max_step_tokens or num_seqs > self.max_step_seqs:
            # Beyond the scheduler's limits (not expected): bigger buffers, and no graphs,
            # which read the old ones.
            logger.warning("a step of %d tokens of %d requests: beyond the step buffers", num_tokens, num_seqs)
            self._allocate_step_buffers(max(num_tokens, self.max_step_tokens), max(num_seqs, self.max_step_seqs))
            for graphs in (self.graphs, self.graph_hidden, self.mixed_graphs, self.mixed_graph_hidden):
                graphs.clear()
        self.num_computed[rows] = end  # what the cache holds once this step ran
        st = self.staging[self.next_staging]
        self.next_staging ^= 1
        host = st.np

        num_decodes = int(np.searchsorted(counts > 1, True))
        graph_size = mixed_size = None
        if num_decodes == num_seqs and self.graphs:
            graph_size = next((s for s in self.graphs if s >= num_seqs), None)
        elif num_decodes < num_seqs and self.mixed_graphs:
            mixed_size = next((s for s in self.mixed_graphs if s >= num_tokens), None)
        # A decode graph pads with one-token sequences; a mixed graph has every sequence slot,
        # the unused ones empty, and its padding tokens belong to no sequence.
        padded = graph_size or (self.max_step_seqs if mixed_size else num_seqs)
        padded_tokens = graph_size or mixed_size or num_tokens

        # Token t belongs to sequence seq[t] and sits at its position start + offset.
        qsl = host["qsl"][: padded + 1]
        qsl[0] = 0
        np.cumsum(counts, out=qsl[1 : num_seqs + 1])
        seq = np.repeat(np.arange(num_seqs), counts)
        positions = host["positions"][:num_tokens]
        np.add(np.arange(num_tokens) - qsl[seq], start[seq], out=positions)
        token_rows = rows[seq]
        host["input_ids"][:num_tokens] = self.token_ids[token_rows, positions]
        max_blocks = int(-(-end.max() // self.block_size))
        tables = host["tables"][: num_seqs * max_blocks].reshape(num_seqs, max_blocks)
        tables[:] = self.block_table[rows, :max_blocks]
        slots = host["slots"][:num_tokens]
        np.add(tables[seq, positions // self.block_size] * self.block_size, positions % self.block_size, out=slots)
        seq_lens = host["seq_lens"][:padded]
        seq_lens[:num_seqs] = end
        sampling = np.flatnonzero(end == self.num_tokens[rows])
        host["logits_idx"][: len(sampling)] = qsl[1:][sampling] - 1
        if padded_tokens > num_tokens:
            # Padding tokens write nowhere; their outputs are never read.
            pad = slice(num_tokens, padded_tokens)
            host["input_ids"][pad] = 0
            host["positions"][pad] = 0
            host["slots"][pad] = -1
        if padded > num_seqs:
            seq_lens[num_seqs:] = 1
            if graph_size:  # one padding token each, attending to one slot of block 0 (finite)
                qsl[num_seqs + 1 :] = np.arange(num_tokens + 1, num_tokens + 1 + padded - num_seqs)
            else:  # empty sequences: the kernel skips them
                qsl[num_seqs + 1 :] = num_tokens

        def stage(host: torch.Tensor, device: torch.Tensor, n: int) -> torch.Tensor:
            """The first n values of a pinned staging buffer into its persistent device buffer."""
            return device[:n].copy_(host[:n], non_blocking=True)

        input_ids = stage(st.input_ids, self.input_ids_gpu, padded_tokens)
        positions_d = stage(st.positions, self.positions_gpu, padded_tokens)
        slots_d = stage(st.slots, self.slots_gpu, padded_tokens)
        seq_lens_d = stage(st.seq_lens, self.seq_lens_gpu, padded)
        qsl_d = stage(st.qsl, self.qsl_gpu, padded + 1)
        logits_idx = stage(st.logits_idx, self.logits_idx_gpu, len(sampling))
        packed = stage(st.tables, self.tables_packed_gpu, num_seqs * max_blocks)
        if prev is not None:
            self._patch_pending_tokens(input_ids, token_rows, positions, prev)
        if graph_size is not None or mixed_size is not None:
            self.tables_gpu[:num_seqs, :max_blocks] = packed.view(num_seqs, max_blocks)
            tables_d = self.tables_gpu[:padded]
        else:
            tables_d = packed.view(num_seqs, max_blocks)
        return StepBatch(
            input_ids=input_ids,
            positions=positions_d,
            attn=AttentionMetadata(
                slot_mapping=slots_d,
                block_tables=tables_d,
                seq_lens=seq_lens_d,
                query_start_loc=qsl_d,
                max_seq_len=int(end.max()),
                num_decodes=num_decodes,
            ),
            logits_indices=logits_idx,
            rows=rows,
            request_ids=request_ids,
            sampling=sampling,
            staging=st,
            graph_size=graph_size,
            mixed_size=mixed_size,
        )

    def _patch_pending_tokens(
        self, input_ids: torch.Tensor, token_rows: np.ndarray, positions: np.ndarray, prev: PendingStep
    ) -> None:
        """Tokens the unfinished step sampled are not on the host yet: take them on the device."""
        waiting = self.pending_step[token_rows]
        assert ((waiting == -1) | (waiting == prev.step_id)).all(), "only the last step may be unfinished"
        hit = (waiting == prev.step_id) & (positions == self.num_tokens[token_rows] - 1)
        if not hit.any():
            return
        assert prev.device_tokens is not None
        dst = to_device(np.flatnonzero(hit), self.device)
        src = to_device(self.pending_index[token_rows[hit]], self.device)
        input_ids[dst] = prev.device_tokens[src]

    # ---- CUDA graphs ------------------------------------------------------------------

    def _warm_up_kernels(self) -> None:
        """Compile the attention kernel's variants now, not in the middle of the first requests."""
        began = time.perf_counter()
        attn = self.model.attention_layers()[0]
        q = torch.zeros(16, attn.num_heads, attn.head_dim, dtype=self.dtype, device=self.device)
        num_variants = warm_up_paged_attention(q, attn.k_cache, attn.v_cache, attn.scale)
        torch.cuda.synchronize(self.device)
        logger.info("attention kernels: %d variants ready in %.1f s", num_variants, time.perf_counter() - began)

    def _graph_inputs(
        self, num_tokens: int, num_seqs: int, num_decodes: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The static inputs of a graph: views of the step buffers. A decode graph of n rows
        takes (n, n, n); a graph with prefill chunks takes every sequence slot (unused ones
        empty) and no decodes, so one attention launch with prefill tiles serves all."""
        meta = AttentionMetadata(
            slot_mapping=self.slots_gpu[:num_tokens],
            block_tables=self.tables_gpu[:num_seqs],
            seq_lens=self.seq_lens_gpu[:num_seqs],
            query_start_loc=self.qsl_gpu[: num_seqs + 1],
            # Fixed at capture: the kernel's split of the keys must hold for any context.
            max_seq_len=self.max_model_len,
            num_decodes=num_decodes,
        )
        return self.input_ids_gpu[:num_tokens], self.positions_gpu[:num_tokens], meta

    @torch.inference_mode()
    def capture_decode_graphs(self, sizes: list[int], capture: bool = True) -> None:
        """Capture the model's forward for decode batches of each size (largest first, one pool).

        capture=False keeps the same static buffers and padding but runs the forward eagerly
        at each replay: the CPU path for testing the padding, and a debugging aid.
        """
        sizes = [s for s in sizes if s <= min(self.max_step_seqs, self.max_step_tokens)]
        # Dummy decode inputs: every row reads one slot of block 0 and writes nowhere.
        self.slots_gpu.fill_(-1)
        self.seq_lens_gpu.fill_(1)
        self.qsl_gpu.copy_(torch.arange(self.qsl_gpu.shape[0], dtype=torch.int32))
        self._capture("decode", sizes, lambda n: self._graph_inputs(n, n, n), self.graphs, self.graph_hidden, capture)

    @torch.inference_mode()
    def capture_mixed_graphs(self, sizes: list[int], capture: bool = True) -> None:
        """Capture the forward of steps with prefill chunks, padded to each token count in sizes."""
        sizes = [s for s in sizes if s <= self.max_step_tokens]
        # Dummy inputs: every sequence empty, so attention reads nothing; nothing is written.
        self.slots_gpu.fill_(-1)
        self.seq_lens_gpu.fill_(1)
        self.qsl_gpu.zero_()
        inputs = functools.partial(self._graph_inputs, num_seqs=self.max_step_seqs, num_decodes=0)
        self._capture("mixed", sizes, inputs, self.mixed_graphs, self.mixed_graph_hidden, capture)

    def _capture(
        self,
        kind: str,
        sizes: list[int],
        inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
        graphs: dict[int, Callable[[], None]],
        hidden: dict[int, torch.Tensor],
        capture: bool,
    ) -> None:
        """One graph per size, largest first, all in one memory pool shared by every kind."""
        if not sizes:
            return
        began = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if capture else 0
        if capture and self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        for size in sorted(sizes, reverse=True):
            args = inputs(size)
            if not capture:

                def run(size: int = size, args: tuple = args) -> None:
                    hidden[size] = self.model(*args)

                graphs[size] = run
                continue
            for _ in range(2):  # compile the Triton kernels and settle allocations first
                self.model(*args)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                hidden[size] = self.model(*args)
            graphs[size] = graph.replay
        ordered = dict(sorted(graphs.items()))
        graphs.clear()
        graphs.update(ordered)
        if capture:
            torch.cuda.synchronize(self.device)
            used = free_before - torch.cuda.mem_get_info(self.device)[0]
            logger.info(
                "captured %s CUDA graphs for %d sizes (%d..%d) in %.1f s, %.2f GiB",
                kind,
                len(sizes),
                min(sizes),
                max(sizes),
                time.perf_counter() - began,
                used / 2**30,
            )


def resolve_device(device: str, rank: int) -> torch.device:
    """The device for `device`, where "auto" is this rank's GPU if CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(device)
