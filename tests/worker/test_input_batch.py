"""Input preparation alone: rows of requests -> one step's input ids, positions, KV slots, block
tables and logits indices, without a model (the input batch on the CPU)."""

from __future__ import annotations

import numpy as np
import torch

from gpu_worker.cuda_graphs import CudaGraphs
from gpu_worker.input_batch import InputBatch, PendingStep
from protocol.messages import CachedRequestData, NewRequestData, SamplingParams, StepPlan

BLOCK = 4
GREEDY = SamplingParams(temperature=0.0)


def make_batch() -> tuple[InputBatch, CudaGraphs]:
    batch = InputBatch(
        max_num_seqs=4, max_model_len=32, block_size=BLOCK, max_num_batched_tokens=64,
        device=torch.device("cpu"), eos_token_ids=[2],
    )
    # No graph is captured, so no model is ever run: every step is eager.
    return batch, CudaGraphs(model=None, buffers=lambda: batch.buffers, max_model_len=32)  # type: ignore[arg-type]


def tokens(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def test_a_mixed_step_puts_decodes_first_and_reads_past_the_cached_prefix() -> None:
    batch, graphs = make_batch()
    batch.update(StepPlan(0, [
        # C: a 12-token prompt, a first chunk of 5 (no sample).
        NewRequestData("C", tokens(300, 12), GREEDY, [1, 4], num_computed_tokens=0),
        # A: 6 prompt tokens and 1 output, all but the output computed: a decode at position 6.
        NewRequestData("A", tokens(100, 7), GREEDY, [5, 9], num_computed_tokens=6, num_output_tokens=1),
        # B: a 10-token prompt whose first 2 blocks were prefix-cache hits: tokens 8 and 9 left.
        NewRequestData("B", tokens(200, 10), GREEDY, [3, 7, 2], num_computed_tokens=8),
    ], [], {}, []))
    step = batch.prepare({"C": 5, "A": 1, "B": 2}, graphs)

    assert step.request_ids == ["A", "C", "B"]  # the decode moved to the front, order kept otherwise
    assert step.input_ids.tolist() == [106, 300, 301, 302, 303, 304, 208, 209]
    assert step.positions.tolist() == [6, 0, 1, 2, 3, 4, 8, 9]
    # slot = block id * block size + offset: A's position 6 is in its 2nd block (9), C's 4 in
    # its 2nd (4), B's 8 and 9 in its 3rd (2).
    assert step.attn.slot_mapping.tolist() == [38, 4, 5, 6, 7, 16, 8, 9]
    assert step.attn.block_tables.tolist() == [[5, 9, 0], [1, 4, 0], [3, 7, 2]]
    assert step.attn.seq_lens.tolist() == [7, 5, 10]
    assert step.attn.query_start_loc.tolist() == [0, 1, 6, 8]
    assert step.attn.num_decodes == 1 and step.attn.max_seq_len == 10
    # A and B have computed every token they know, so they sample, from their last token; C does not.
    assert step.sampling.tolist() == [0, 2]
    assert step.logits_indices.tolist() == [0, 7]
    assert step.graph is None
    assert batch.num_computed[step.rows].tolist() == [7, 5, 10]


def test_longest_decodes_first_orders_only_the_decodes_by_context() -> None:
    """The fp8 decode kernel's order (kernels.decodes_longest_first): decodes by context, longest
    first, ties in plan order; prefill chunks after them in plan order. Off, the plan's order."""
    def plan() -> StepPlan:
        return StepPlan(0, [
            NewRequestData("C", tokens(300, 12), GREEDY, [1, 4], num_computed_tokens=0),  # a chunk of 5
            NewRequestData("A", tokens(100, 7), GREEDY, [5, 9], num_computed_tokens=6, num_output_tokens=1),
            NewRequestData("B", tokens(200, 10), GREEDY, [3, 7, 2], num_computed_tokens=9, num_output_tokens=1),
            NewRequestData("E", tokens(500, 7), GREEDY, [11, 12], num_computed_tokens=6, num_output_tokens=1),
            NewRequestData("D", tokens(400, 9), GREEDY, [6, 8, 10], num_computed_tokens=8, num_output_tokens=1),
        ], [], {}, [])
    scheduled = {"C": 5, "A": 1, "B": 1, "E": 1, "D": 1}

    batch, graphs = make_batch()
    batch.update(plan())
    step = batch.prepare(scheduled, graphs)
    assert step.request_ids == ["A", "B", "E", "D", "C"]
    assert step.attn.seq_lens.tolist() == [7, 10, 7, 9, 5]

    batch, graphs = make_batch()
    batch.longest_decodes_first = True
    batch.update(plan())
    step = batch.prepare(scheduled, graphs)
    assert step.request_ids == ["B", "D", "A", "E", "C"]
    assert step.attn.seq_lens.tolist() == [10, 9, 7, 7, 5]
    assert step.attn.num_decodes == 4
    assert step.input_ids.tolist() == [209, 408, 106, 506, 300, 301, 302, 303, 304]
    assert step.positions.tolist() == [9, 8, 6, 6, 0, 1, 2, 3, 4]
    assert step.attn.block_tables[:, :3].tolist() == [[3, 7, 2], [6, 8, 10], [5, 9, 0], [11, 12, 0], [1, 4, 0]]
    assert [batch.requests[r] for r in step.request_ids] == step.rows.tolist()
    # The four decodes sample, each from its own token, in batch order; the chunk does not.
    assert step.sampling.tolist() == [0, 1, 2, 3] and step.logits_indices.tolist() == [0, 1, 2, 3]
    # Already in order: the plan's order stands (no permutation).
    assert batch._batch_order(step.rows, np.array([1, 1, 1, 1, 5])) is None


def test_an_overlapped_step_takes_the_unfinished_steps_tokens_from_the_device() -> None:
    batch, graphs = make_batch()
    batch.update(StepPlan(0, [
        NewRequestData("A", tokens(100, 5), GREEDY, [5, 9], 0),
        NewRequestData("B", tokens(200, 3), GREEDY, [3], 0),
    ], [], {}, []))
    first = batch.prepare({"A": 5, "B": 3}, graphs)
    rows = first.sampled_rows
    launched = PendingStep(0, ["A", "B"], rows, batch.num_tokens[rows].copy(), device_tokens=torch.tensor([111, 222]))
    batch.sampled(launched)  # step 0's tokens exist, but only on the device

    second = batch.prepare({"A": 1, "B": 1}, graphs)
    assert second.input_ids.tolist() == [111, 222]  # patched in from the device
    assert second.positions.tolist() == [5, 3]
    assert second.attn.slot_mapping.tolist() == [9 * BLOCK + 1, 3 * BLOCK + 3]

    batch.tokens_arrived(launched, [111, 222])
    assert batch.unfinished is None
    assert batch.token_ids[rows[0], 5] == 111 and batch.token_ids[rows[1], 3] == 222
    # Step 1's tokens arrive before step 2 is prepared: step 2 reads them on the host.
    rows = second.sampled_rows
    launched = PendingStep(1, ["A", "B"], rows, batch.num_tokens[rows].copy(), device_tokens=torch.tensor([0, 0]))
    batch.sampled(launched)
    batch.tokens_arrived(launched, [333, 444])
    batch.update(StepPlan(2, [], [CachedRequestData("B", [8], 4)], {}, []))
    third = batch.prepare({"A": 1, "B": 1}, graphs)
    assert third.input_ids.tolist() == [333, 444]
    assert third.positions.tolist() == [6, 4]
    assert third.attn.slot_mapping.tolist() == [9 * BLOCK + 2, 8 * BLOCK]


def test_a_decode_step_is_padded_to_the_graph_that_holds_it() -> None:
    batch, graphs = make_batch()
    graphs.capture_decode([2, 4], capture=False)  # registered only: the test never replays
    batch.update(StepPlan(0, [
        NewRequestData(r, tokens(10 * i, 3), GREEDY, [i], num_computed_tokens=2) for i, r in enumerate("XYZ")
    ], [], {}, []))
    step = batch.prepare({"X": 1, "Y": 1, "Z": 1}, graphs)
    assert step.graph is not None and (step.graph.kind, step.graph.num_tokens) == ("decode", 4)
    assert step.input_ids.tolist() == [2, 12, 22, 0]
    # The padding row reads one slot of block 0 and writes nowhere.
    assert step.attn.slot_mapping.tolist() == [2, BLOCK + 2, 2 * BLOCK + 2, -1]
    assert step.attn.seq_lens.tolist() == [3, 3, 3, 1]
    assert step.attn.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert step.attn.block_tables.shape == (4, 8)  # the graph's full-width table
    assert step.logits_indices.tolist() == [0, 1, 2]


def test_a_finished_request_frees_its_row_only_once_the_unfinished_step_is_back() -> None:
    batch, graphs = make_batch()
    batch.update(StepPlan(0, [NewRequestData("A", tokens(1, 4), GREEDY, [1], 0)], [], {}, []))
    step = batch.prepare({"A": 4}, graphs)
    row = int(step.rows[0])
    launched = PendingStep(0, ["A"], step.sampled_rows, np.array([4]), device_tokens=torch.tensor([7]))
    batch.sampled(launched)
    batch.update(StepPlan(1, [], [], {}, ["A"]))
    assert row not in batch.free_rows  # the step in flight still writes its token there
    batch.tokens_arrived(launched, [7])
    assert row in batch.free_rows
