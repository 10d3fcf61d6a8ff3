"""CUDA graphs of the model's forward: the size ladders, capture, padding and dispatch.

Decode-only steps (one token per request) replay a graph captured for the smallest batch
size of a ladder that holds them, padded with rows that write nowhere (slot -1). With
`--cuda-graph-mixed-tokens N`, steps with prefill chunks replay graphs captured at 16, 32, ...
N tokens over every sequence slot, the unused slots empty. Every graph reads the input
batch's persistent device buffers, and all share one memory pool. The LM head and sampling
run eagerly after the replay.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from gpu_worker.attention import AttentionMetadata
from kernels import warm_up_paged_attention

if TYPE_CHECKING:
    from gpu_worker.input_batch import StepBuffers
    from gpu_worker.models.base import CausalLM

logger = logging.getLogger(__name__)

GraphInputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata]


def cudagraph_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, then every multiple of 8 up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture steps with prefill chunks at: 16, 32, 64, ... and max_tokens."""
    sizes = [1 << i for i in range(4, max_tokens.bit_length()) if 1 << i < max_tokens]
    return sizes + [max_tokens] if max_tokens >= 16 else []


class GraphKey(NamedTuple):
    """A captured graph, and the padded shape a step takes to replay it."""

    kind: str  # "decode" | "mixed"
    num_tokens: int
    num_seqs: int


class CudaGraphs:
    def __init__(self, model: CausalLM, buffers: Callable[[], StepBuffers], max_model_len: int) -> None:
        self.model = model
        self.buffers = buffers  # the input batch's current device buffers
        self.max_model_len = max_model_len
        # By padded size: a decode graph per batch size, a mixed graph per token count.
        self.graphs: dict[str, dict[int, Callable[[], None]]] = {"decode": {}, "mixed": {}}
        self.hidden: dict[str, dict[int, torch.Tensor]] = {"decode": {}, "mixed": {}}
        self.mixed_num_seqs = 0  # every sequence slot of the buffers at capture
        self._pool: tuple | None = None

    def dispatch(self, num_seqs: int, num_tokens: int, num_decodes: int) -> GraphKey | None:
        """The graph that runs this step (the smallest that holds it), or None for eager."""
        if num_decodes == num_seqs:
            size = next((s for s in self.graphs["decode"] if s >= num_seqs), None)
            return None if size is None else GraphKey("decode", size, size)
        size = next((s for s in self.graphs["mixed"] if s >= num_tokens), None)
        return None if size is None else GraphKey("mixed", size, self.mixed_num_seqs)

    def sizes(self, kind: str) -> list[int]:
        """The captured sizes of a kind ("decode": batch sizes, "mixed": token counts), ascending."""
        return list(self.graphs[kind])

    def replay(self, key: GraphKey) -> torch.Tensor:
        """Run the graph; its output hidden states [padded tokens, hidden]."""
        self.graphs[key.kind][key.num_tokens]()
        return self.hidden[key.kind][key.num_tokens]

    def clear(self) -> None:
        for kind in self.graphs:
            self.graphs[kind].clear()
            self.hidden[kind].clear()

    def _inputs(self, num_tokens: int, num_seqs: int, num_decodes: int) -> GraphInputs:
        """A graph's static inputs: views of the step buffers. A decode graph of n rows takes
        (n, n, n); a graph with prefill chunks takes every sequence slot (unused ones empty)
        and no decodes, so one attention launch with prefill tiles serves all."""
        b = self.buffers()
        meta = AttentionMetadata(
            slot_mapping=b.slots[:num_tokens],
            block_tables=b.full_tables[:num_seqs],
            seq_lens=b.seq_lens[:num_seqs],
            query_start_loc=b.qsl[: num_seqs + 1],
            # Fixed at capture: the kernel's split of the keys must hold for any context.
            max_seq_len=self.max_model_len,
            num_decodes=num_decodes,
        )
        return b.input_ids[:num_tokens], b.positions[:num_tokens], meta

    @torch.inference_mode()
    def capture_decode(self, sizes: list[int], capture: bool = True) -> None:
        """Capture the forward for decode batches of each size (largest first, one pool).

        capture=False keeps the same static buffers and padding but runs the forward eagerly
        at each replay: the CPU path for testing the padding, and a debugging aid.
        """
        b = self.buffers()
        sizes = [s for s in sizes if s <= min(b.max_seqs, b.max_tokens)]
        # Dummy decode inputs: every row reads one slot of block 0 and writes nowhere.
        b.slots.fill_(-1)
        b.seq_lens.fill_(1)
        b.qsl.copy_(torch.arange(b.qsl.shape[0], dtype=torch.int32))
        self._capture("decode", sizes, lambda n: self._inputs(n, n, n), capture)

    @torch.inference_mode()
    def capture_mixed(self, sizes: list[int], capture: bool = True) -> None:
        """Capture the forward of steps with prefill chunks, padded to each token count in sizes."""
        b = self.buffers()
        sizes = [s for s in sizes if s <= b.max_tokens]
        # Dummy inputs: every sequence empty, so attention reads nothing; nothing is written.
        b.slots.fill_(-1)
        b.seq_lens.fill_(1)
        b.qsl.zero_()
        self.mixed_num_seqs = b.max_seqs
        self._capture("mixed", sizes, lambda n: self._inputs(n, b.max_seqs, 0), capture)

    def _capture(self, kind: str, sizes: list[int], inputs: Callable[[int], GraphInputs], capture: bool) -> None:
        """One graph per size, largest first, all in one memory pool shared by every kind."""
        if not sizes:
            return
        graphs, hidden = self.graphs[kind], self.hidden[kind]
        device = self.buffers().input_ids.device
        began = time.perf_counter()
        free_before = torch.cuda.mem_get_info(device)[0] if capture else 0
        if capture and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for size in sorted(sizes, reverse=True):
            args = inputs(size)
            if not capture:

                def run(size: int = size, args: GraphInputs = args) -> None:
                    args[2].decode_context = None  # found anew for this step's tables
                    hidden[size] = self.model(*args)

                graphs[size] = run
                continue
            for _ in range(2):  # compile the Triton kernels and settle allocations first
                self.model(*args)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            # No garbage collection inside a capture (torch.cuda.graph collects just before it):
            # a collection there frees whatever died meanwhile, CUDA events of finished steps
            # included, and a CUDA call of the wrong kind invalidates the whole capture.
            gc_enabled = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    hidden[size] = self.model(*args)
            finally:
                if gc_enabled:
                    gc.enable()
            graphs[size] = graph.replay
        ordered = dict(sorted(graphs.items()))
        graphs.clear()
        graphs.update(ordered)
        if capture:
            torch.cuda.synchronize(device)
            used = free_before - torch.cuda.mem_get_info(device)[0]
            logger.info(
                "captured %s CUDA graphs for %d sizes (%d..%d) in %.1f s, %.2f GiB",
                kind, len(sizes), min(sizes), max(sizes), time.perf_counter() - began, used / 2**30,
            )


def warm_up_kernels(model: CausalLM) -> None:
    """Compile the attention kernel's variants now, not in the middle of the first requests."""
    began = time.perf_counter()
    attn = model.attention_layers()[0]
    dtype = attn.q_dtype or attn.k_cache.dtype  # the model's: q keeps it over an fp8 cache
    q = torch.zeros(16, attn.num_heads, attn.head_dim, dtype=dtype, device=attn.k_cache.device)
    num_variants = warm_up_paged_attention(q, attn.k_cache, attn.v_cache, attn.scale)
    torch.cuda.synchronize(attn.k_cache.device)
    logger.info("attention kernels: %d variants ready in %.1f s", num_variants, time.perf_counter() - began)
