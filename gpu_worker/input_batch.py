"""The input batch: every live request's row of host state, and one step's inputs gathered from it.

Each request owns a row of host numpy arrays (its tokens, counts and block table) and of
sampling columns, so a step's inputs are gathered with numpy fancy indexing into pinned
staging buffers and copied to persistent device buffers without blocking: no per-token
Python (vLLM v1's `InputBatch`).

Steps overlap: step n + 1 is prepared and launched before step n's sampled tokens are back on
the host. Those tokens stay on the device, and step n + 1's decodes take their input ids from
there (`_patch_pending_tokens`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_worker.attention import AttentionMetadata
from gpu_worker.cuda_graphs import CudaGraphs, GraphKey
from gpu_worker.sampling_metadata import SamplingColumns, SamplingMetadata
from gpu_worker.structured_outputs import GrammarRows
from gpu_worker.transfer import to_device
from protocol.messages import NewRequestData, StepPlan, StepResult

logger = logging.getLogger(__name__)


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
    sampled_rows: np.ndarray  # [N] their rows: rows[sampling]
    staging: StepBuffers  # the pinned host buffers this step was staged in
    graph: GraphKey | None = None  # the captured graph this step replays, padded to its size
    # Speculative decoding: each sampling request's logits count (1 + its drafts; logits_indices
    # then holds its last that many positions); None when no request has drafts.
    num_logits: np.ndarray | None = None


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


class StepBuffers:
    """A step's flat inputs, each sized for the largest step, on one device.

    Pinned on the host (with numpy views) they are where a step is staged; on the device they
    persist, so a captured graph reads the very same memory at every replay.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device, pin: bool) -> None:
        def buf(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, dtype=dtype, device=device, pin_memory=pin)

        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.input_ids = buf(max_tokens, torch.int64)
        self.positions = buf(max_tokens, torch.int64)
        self.slots = buf(max_tokens, torch.int64)
        self.seq_lens = buf(max_seqs, torch.int32)
        self.qsl = buf(max_seqs + 1, torch.int32)
        self.logits_idx = buf(max(max_tokens, max_seqs), torch.int64)  # drafts: several per request
        self.tables = buf(max_seqs * max_blocks, torch.int32)  # packed: [B, blocks in use], contiguous
        self.sampled = buf(max_seqs, torch.int64)  # on the host: the step's sampled tokens, read back
        if device.type == "cpu":
            self.np = {name: t.numpy() for name, t in vars(self).items() if isinstance(t, torch.Tensor)}
        # On the device the packed tables are scattered into the full-width table graphs read.
        self.full_tables = torch.zeros(max_seqs, max_blocks, dtype=torch.int32, device=device)


def _stage(host: torch.Tensor, device: torch.Tensor, n: int) -> torch.Tensor:
    """The first n values of a pinned staging buffer into its persistent device buffer."""
    return device[:n].copy_(host[:n], non_blocking=True)


class InputBatch:
    def __init__(
        self,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        max_num_batched_tokens: int,
        device: torch.device,
        eos_token_ids: list[int],
        grammars: GrammarRows | None = None,
        longest_decodes_first: bool = False,
    ) -> None:
        self.block_size = block_size
        self.longest_decodes_first = longest_decodes_first  # see `_batch_order`
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.device = device
        self.requests: dict[str, int] = {}  # request id -> its row
        self.unfinished: PendingStep | None = None  # the last launched step, until finished
        self._allocate_rows(max_num_seqs)
        self.sampling = SamplingColumns(max_num_seqs, device, eos_token_ids)
        self.grammars = grammars  # structured outputs: a matcher per constrained row
        self._allocate_step_buffers(max(max_num_batched_tokens, max_num_seqs), max_num_seqs)

    # ---- rows: one per live request ---------------------------------------------------

    def _allocate_rows(self, num_rows: int) -> None:
        """Per-row host arrays: tokens (prompt + outputs), counts, block tables."""
        self.token_ids = np.zeros((num_rows, self.max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_computed = np.zeros(num_rows, dtype=np.int64)
        self.num_row_blocks = np.zeros(num_rows, dtype=np.int64)
        self.block_table = np.zeros((num_rows, self.max_blocks_per_seq), dtype=np.int32)
        # Draft tokens written after a row's known tokens for this step (speculative decoding).
        self.num_drafts = np.zeros(num_rows, dtype=np.int64)
        # A row's newest token may still be on the device (sampled by the unfinished step):
        # then pending_step is that step's id and pending_index its place in the step's output.
        self.pending_step = np.full(num_rows, -1, dtype=np.int64)
        self.pending_index = np.zeros(num_rows, dtype=np.int64)
        self.free_rows = list(range(num_rows - 1, -1, -1))

    def _grow_rows(self) -> None:
        """More live requests than rows (e.g. preempted ones not yet dropped): double them."""
        old = self.num_tokens.shape[0]
        arrays = ("token_ids", "num_tokens", "num_prompt_tokens", "num_computed", "num_row_blocks", "block_table",
                  "num_drafts")
        for name in arrays:
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        self.pending_step = np.concatenate([self.pending_step, np.full(old, -1, dtype=np.int64)])
        self.pending_index = np.concatenate([self.pending_index, np.zeros(old, dtype=np.int64)])
        self.sampling.grow(2 * old)
        self.free_rows.extend(range(2 * old - 1, old - 1, -1))

    def update(self, plan: StepPlan) -> None:
        """Apply the plan's differences: requests that left, joined, or got new blocks."""
        for request_id in plan.finished_request_ids:
            self.remove_request(request_id)
        for new in plan.new_requests:
            self.add_request(new)
        for cached in plan.cached_requests:
            row = self.requests[cached.request_id]
            self._append_blocks(row, cached.new_block_ids)
            self.num_computed[row] = cached.num_computed_tokens
        for request_id, drafts in plan.spec_token_ids.items():
            row = self.requests[request_id]
            assert self.pending_step[row] == -1, "drafts follow a token on the host"
            n = self.num_tokens[row]
            self.token_ids[row, n : n + len(drafts)] = drafts
            self.num_drafts[row] = len(drafts)

    def add_request(self, new: NewRequestData) -> None:
        # A request sent as new again (resumed after preemption) starts over from its data.
        self.remove_request(new.request_id)
        if not self.free_rows:
            self._grow_rows()
        row = self.free_rows.pop()
        n = len(new.prompt_token_ids)
        self.token_ids[row, :n] = new.prompt_token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = n - new.num_output_tokens
        self.num_computed[row] = new.num_computed_tokens
        self.num_row_blocks[row] = 0
        self.num_drafts[row] = 0
        self._append_blocks(row, new.block_ids)
        self.sampling.add(row, new.sampling)
        if new.sampling.grammar is not None and self.grammars is not None:
            self.grammars.add(row, new.sampling.grammar, new.prompt_token_ids[n - new.num_output_tokens :])
        self.requests[new.request_id] = row

    def remove_request(self, request_id: str) -> None:
        row = self.requests.pop(request_id, None)
        if row is None:
            return
        self.pending_step[row] = -1
        self.sampling.remove(row)
        if self.grammars is not None:
            self.grammars.remove(row)
        if self.unfinished is not None:
            # The unfinished step may still write this row's sampled token: free it after.
            self.unfinished.rows_to_free.append(row)
        else:
            self.free_rows.append(row)

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_row_blocks[row])
        self.block_table[row, start : start + len(block_ids)] = block_ids
        self.num_row_blocks[row] = start + len(block_ids)

    # ---- sampled tokens -----------------------------------------------------------------

    def sampled(self, step: PendingStep) -> None:
        """Each of the step's sampling rows has a new token, still on the device: count it."""
        self.num_tokens[step.rows] += 1
        self.pending_step[step.rows] = step.step_id
        self.pending_index[step.rows] = np.arange(len(step.rows))
        self.unfinished = step

    def append_tokens(self, rows: np.ndarray, tokens: list[list[int]]) -> None:
        """A speculative step's tokens, already on the host: each row's kept drafts and one more
        token (one token for a row without drafts) replace its drafts."""
        for row, row_tokens in zip(rows.tolist(), tokens, strict=True):
            n = self.num_tokens[row]
            self.token_ids[row, n : n + len(row_tokens)] = row_tokens
            self.num_tokens[row] = n + len(row_tokens)
            self.num_drafts[row] = 0

    def tokens_arrived(self, step: PendingStep, token_ids: list[int]) -> None:
        """The step's tokens are on the host: write them into their rows, free the dropped rows."""
        self.token_ids[step.rows, step.positions] = token_ids
        if self.grammars:
            self.grammars.advance(step.rows, token_ids)
        mine = self.pending_step[step.rows] == step.step_id
        self.pending_step[step.rows[mine]] = -1
        self.free_rows.extend(step.rows_to_free)
        if self.unfinished is step:
            self.unfinished = None

    def sampling_metadata(self, batch: StepBatch) -> SamplingMetadata:
        rows = batch.sampled_rows
        return self.sampling.metadata(rows, self.num_tokens[rows] - self.num_prompt_tokens[rows], self._history)

    def needs_history(self, batch: StepBatch) -> bool:
        """Whether sampling this batch reads every token so far (the penalties do)."""
        return bool(self.sampling.needs_history[batch.sampled_rows].any())

    def _history(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """A row's (prompt, outputs) token ids; every one of them must be on the host."""
        num_prompt = self.num_prompt_tokens[row]
        return self.token_ids[row, :num_prompt], self.token_ids[row, num_prompt : self.num_tokens[row]]

    # ---- one step's inputs ------------------------------------------------------------

    def _allocate_step_buffers(self, max_tokens: int, max_seqs: int) -> None:
        """Two sets of pinned staging buffers, and the device buffers they are copied into.

        Steps alternate between the two staging sets: while step n's copies may still wait in
        the stream, step n + 1 is prepared in the other set; step n + 2 reuses the first only
        after step n has finished (its sampled tokens were read back, so its copies ran).
        """
        pin = self.device.type == "cuda"
        cpu = torch.device("cpu")
        self.staging = [StepBuffers(max_tokens, max_seqs, self.max_blocks_per_seq, cpu, pin) for _ in range(2)]
        self.next_staging = 0
        self.buffers = StepBuffers(max_tokens, max_seqs, self.max_blocks_per_seq, self.device, pin=False)

    def prepare(self, num_scheduled: dict[str, int], graphs: CudaGraphs) -> StepBatch:
        """Gather the scheduled tokens into the step buffers: ids, positions, slots, tables.

        Decodes (one token) go first, then the prefill chunks (`_batch_order`). A step that a
        captured graph can run is padded to the graph's size (`graphs.dispatch`).
        """
        request_ids = list(num_scheduled)
        rows = np.fromiter((self.requests[r] for r in request_ids), dtype=np.int64, count=len(request_ids))
        counts = np.fromiter(num_scheduled.values(), dtype=np.int64, count=len(request_ids))
        order = self._batch_order(rows, counts)
        if order is not None:
            rows, counts = rows[order], counts[order]
            request_ids = [request_ids[i] for i in order]
        num_seqs, num_tokens = len(rows), int(counts.sum())
        start = self.num_computed[rows]
        end = start + counts
        known = self.num_tokens[rows] + self.num_drafts[rows]  # drafts are computed like known tokens
        bad = (counts < 1) | (end > known) | (-(-end // self.block_size) > self.num_row_blocks[rows])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RuntimeError(
                f"scheduled tokens {start[i]}..{end[i]} of request {request_ids[i]} with "
                f"{known[i]} tokens and {self.num_row_blocks[rows[i]]} blocks"
            )
        buffers = self.buffers
        if num_tokens > buffers.max_tokens or num_seqs > buffers.max_seqs:
            # Beyond the scheduler's limits (not expected): bigger buffers, and no graphs,
            # which read the old ones.
            logger.warning("a step of %d tokens of %d requests: beyond the step buffers", num_tokens, num_seqs)
            self._allocate_step_buffers(max(num_tokens, buffers.max_tokens), max(num_seqs, buffers.max_seqs))
            buffers = self.buffers
            graphs.clear()
        self.num_computed[rows] = end  # what the cache holds once this step ran
        st = self.staging[self.next_staging]
        self.next_staging ^= 1
        host = st.np

        num_decodes = int(np.searchsorted(counts > 1, True))
        graph = graphs.dispatch(num_seqs, num_tokens, num_decodes)
        padded, padded_tokens = (graph.num_seqs, graph.num_tokens) if graph else (num_seqs, num_tokens)

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
        sampling = np.flatnonzero(end == known)
        last = qsl[1:][sampling] - 1
        drafts = self.num_drafts[rows[sampling]]
        num_logits = None
        if drafts.any():  # every position of a row with drafts is scored: [last - drafts, last]
            num_logits = drafts + 1
            offsets = np.arange(int(num_logits.sum())) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
            last = np.repeat(last - drafts, num_logits) + offsets
        host["logits_idx"][: len(last)] = last
        if padded_tokens > num_tokens:
            # Padding tokens write nowhere; their outputs are never read.
            pad = slice(num_tokens, padded_tokens)
            host["input_ids"][pad] = 0
            host["positions"][pad] = 0
            host["slots"][pad] = -1
        if padded > num_seqs:
            seq_lens[num_seqs:] = 1
            if graph is not None and graph.kind == "decode":
                # One padding token each, attending to one slot of block 0 (finite).
                qsl[num_seqs + 1 :] = np.arange(num_tokens + 1, num_tokens + 1 + padded - num_seqs)
            else:  # empty sequences: the kernel skips them
                qsl[num_seqs + 1 :] = num_tokens

        input_ids = _stage(st.input_ids, buffers.input_ids, padded_tokens)
        positions_d = _stage(st.positions, buffers.positions, padded_tokens)
        slots_d = _stage(st.slots, buffers.slots, padded_tokens)
        seq_lens_d = _stage(st.seq_lens, buffers.seq_lens, padded)
        qsl_d = _stage(st.qsl, buffers.qsl, padded + 1)
        logits_idx = _stage(st.logits_idx, buffers.logits_idx, len(last))
        packed = _stage(st.tables, buffers.tables, num_seqs * max_blocks)
        if self.unfinished is not None:
            self._patch_pending_tokens(input_ids, token_rows, positions, self.unfinished)
        if graph is not None:
            buffers.full_tables[:num_seqs, :max_blocks] = packed.view(num_seqs, max_blocks)
            tables_d = buffers.full_tables[:padded]
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
            sampled_rows=rows[sampling],
            staging=st,
            graph=graph,
            num_logits=num_logits,
        )

    def _batch_order(self, rows: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """The permutation of the plan's requests into batch order, None where it is the plan's.

        Decodes (one token each) first: attention gives them decode tiles. With
        `longest_decodes_first` (`kernels.decodes_longest_first`: where the decode kernel runs
        better so) the decodes longest context first, ties and prefill chunks in plan order.
        """
        chunk = counts > 1
        if self.longest_decodes_first:
            key = np.where(chunk, 0, -(self.num_computed[rows] + counts))
            order = np.lexsort((key, chunk))  # stable: by chunk, then by key
            return None if (order[1:] > order[:-1]).all() else order
        if (chunk[:-1] & ~chunk[1:]).any():  # a decode after a prefill chunk
            return np.argsort(chunk, kind="stable")
        return None

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
