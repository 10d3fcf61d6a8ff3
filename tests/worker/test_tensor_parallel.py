"""Tensor parallelism on the CPU: each rank a separate process, joined by torch.distributed over
gloo, in fp32, on every family's tiny model (tests/tiny_models.py).

At TP=2 and TP=4 the greedy tokens equal TP=1's and transformers', and the last-position logits
are within 1e-5 of TP=1's (only the order of the sums differs); each rank holds about 1/TP of
the weights. The layers' splits (heads, replicated KV heads, vocabulary padding) are checked
one rank at a time without a process group.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from gpu_worker.layers import HeadSplit, MergedLinear, RowParallelLinear, VocabParallelEmbedding
from gpu_worker.parallel import set_tensor_parallel
from gpu_worker.weight_source import WeightSource
from tests.conftest import free_port
from tests.model_check import BLOCK_SIZE, hf_greedy, make_runner, random_prompts, runner_greedy, runner_last_logits
from tests.tiny_models import FAMILIES

TP_LOGITS_RTOL = 1e-5
# Families whose heads (4 query heads; 2 or 1 KV heads) divide among 4 ranks.
TP4_FAMILIES = ["llama", "mistral", "qwen3", "gpt2", "opt"]


def _rank_main(rank: int, size: int, init_method: str, models: list[tuple[str, str]], results) -> None:
    """One rank: a ModelRunner per model, in turn, on one process group."""
    from gpu_worker.model_runner import ModelRunner
    from protocol.config import EngineConfig

    torch.set_num_threads(1)
    try:
        for family, folder in models:
            config = EngineConfig(
                model=folder, device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_gpu_blocks_override=64,
                max_num_seqs=16, tensor_parallel_size=size, distributed_init_method=init_method,
            )
            runner = ModelRunner(config, rank=rank)
            prompts = random_prompts(runner.model.config.vocab_size)
            greedy = runner_greedy(runner, prompts)
            logits = runner_last_logits(runner, prompts).tolist()
            param_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
            results.put((rank, family, greedy, logits, param_bytes))
        # Leave together: a rank whose peers have closed their gloo connections may abort in
        # the process group's destructor at exit (seen once at TP=4: exit code -6).
        from gpu_worker import parallel

        torch.distributed.barrier()
        parallel.destroy()
    except BaseException as e:  # noqa: BLE001 - the test process reports it
        results.put((rank, "error", repr(e), None, None))
        raise


def run_ranks(size: int, models: list[tuple[str, str]]) -> dict[str, list[tuple]]:
    """Every model at tensor parallel `size`: family -> [(greedy, logits, param bytes)] by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, size, init_method, models, results)) for r in range(size)]
    for p in procs:
        p.start()
    got: dict[str, dict[int, tuple]] = {}
    try:
        for _ in range(size * len(models)):
            rank, family, greedy, logits, param_bytes = results.get(timeout=300)
            assert family != "error", f"rank {rank}: {greedy}"
            got.setdefault(family, {})[rank] = (greedy, torch.tensor(logits), param_bytes)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return {family: [by_rank[r] for r in range(size)] for family, by_rank in got.items()}


@pytest.fixture(scope="module")
def single(tiny):
    """TP=1 in this process: family -> (greedy, logits, param bytes, transformers' greedy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for family in FAMILIES:
        folder, hf_model = tiny(family)
        runner = make_runner(str(folder))
        prompts = random_prompts(runner.model.config.vocab_size)
        param_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        out[family] = (runner_greedy(runner, prompts), runner_last_logits(runner, prompts), param_bytes,
                       hf_greedy(hf_model, prompts))
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def tp2(tiny):
    return run_ranks(2, [(family, str(tiny(family)[0])) for family in FAMILIES])


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_gives_tp1s_greedy_tokens_and_logits_and_transformers_tokens(family, single, tp2):
    greedy, logits, _, hf = single[family]
    assert greedy == hf
    for rank_greedy, rank_logits, _ in tp2[family]:
        # Every rank samples the same tokens from the gathered logits.
        assert rank_greedy == greedy
        assert _relative_error(rank_logits, logits) < TP_LOGITS_RTOL


@pytest.mark.parametrize("family", FAMILIES)
def test_each_tp2_rank_holds_about_half_the_weights(family, single, tp2):
    whole = single[family][2]
    per_rank = [param_bytes for _, _, param_bytes in tp2[family]]
    assert per_rank[0] == per_rank[1]
    # Half, plus what every rank keeps whole: norms, learned positions, OPT's projections,
    # a row-parallel bias, and a KV head replicated when there are fewer than ranks.
    assert 0.45 * whole < per_rank[0] < 0.65 * whole, (per_rank, whole)


def test_tp4_with_replicated_kv_heads_gives_tp1s_greedy_tokens(tiny, single):
    got = run_ranks(4, [(family, str(tiny(family)[0])) for family in TP4_FAMILIES])
    for family in TP4_FAMILIES:
        greedy, logits, whole, _ = single[family]
        for rank_greedy, rank_logits, param_bytes in got[family]:
            assert rank_greedy == greedy, family
            assert _relative_error(rank_logits, logits) < TP_LOGITS_RTOL, family
            assert param_bytes < 0.45 * whole, family


# ---- the splits, one rank at a time -------------------------------------------------------


@pytest.fixture
def as_rank():
    def set_rank(rank: int, size: int) -> None:
        set_tensor_parallel(rank, size)

    yield set_rank
    set_tensor_parallel(0, 1)


def test_kv_heads_split_evenly_or_replicated_per_group_of_query_heads(as_rank):
    # 8 query heads, 4 KV heads (2 query heads each), head dim 2.
    as_rank(1, 2)
    split = HeadSplit(8, 4, 2)
    assert (split.num_heads, split.num_kv_heads) == (4, 2)
    assert split.shards == [(8, 8), (4, 4), (4, 4)]  # q heads 4..7, KV heads 2..3
    # 8 ranks, 2 KV heads: ranks 0-3 read KV head 0, ranks 4-7 KV head 1.
    for rank in range(8):
        as_rank(rank, 8)
        split = HeadSplit(8, 2, 2)
        assert (split.num_heads, split.num_kv_heads) == (1, 1)
        assert split.shards[0] == (rank * 2, 2) and split.shards[1] == ((rank // 4) * 2, 2)


@pytest.mark.parametrize("heads, kv_heads, size, message", [
    (6, 2, 4, "number of attention heads \\(6\\) is not divisible by tensor_parallel_size 4"),
    (8, 3, 4, "tensor_parallel_size 4 is not a multiple of the 3 KV heads"),
])
def test_heads_that_do_not_divide_among_the_ranks_are_refused_by_name(as_rank, heads, kv_heads, size, message):
    as_rank(0, size)
    with pytest.raises(ValueError, match=message):
        HeadSplit(heads, kv_heads, 4)


def test_each_rank_reads_its_rows_its_columns_and_its_vocabulary_slice(as_rank):
    weight = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    as_rank(1, 2)
    column = MergedLinear(4, [2, 4], bias=False)  # two stacked projections of 2 and 4 rows
    column.load_param("weight", WeightSource(weight[:2]), 0)
    column.load_param("weight", WeightSource(weight[2:]), 1)
    assert torch.equal(column.weight, torch.cat([weight[1:2], weight[4:6]]))
    row = RowParallelLinear(4, 6, bias=False)
    row.load_param("weight", WeightSource(weight), None)
    assert torch.equal(row.weight, weight[:, 2:])
    # A vocabulary of 5 over 2 ranks: 3 rows each, the last rank's third row zero padding.
    embedding = VocabParallelEmbedding(5, 4)
    embedding.load_param("weight", WeightSource(weight[:5]), None)
    assert torch.equal(embedding.weight, torch.cat([weight[3:5], torch.zeros(1, 4)]))
    with pytest.raises(ValueError, match=r"has shape \(6, 4\), expected \(5, 4\)"):
        embedding.load_param("weight", WeightSource(weight), None)
    # GPT-2's Conv1D: stored [in, out], read transposed; q/k/v stacked in one tensor.
    stacked = MergedLinear(4, [2, 2, 2], bias=False)
    stacked.load_param("weight", WeightSource(weight.t().contiguous()).t(), None)
    assert torch.equal(stacked.weight, weight[[1, 3, 5]])


def test_safetensors_weights_reach_the_layers_unread_and_are_read_by_slice(tiny):
    from safetensors.torch import load_file

    from gpu_worker.checkpoint import read_hf_folder

    folder, _ = tiny("llama")
    whole = load_file(str(folder / "model.safetensors"))
    checkpoint = read_hf_folder(folder)
    for name, src in checkpoint.tensors:
        assert isinstance(src, WeightSource), name  # a slice handle, not a tensor read whole
        tensor = whole[name]
        assert src.shape == tuple(tensor.shape)
        if tensor.dim() == 2:
            assert torch.equal(src.rows(1, 3), tensor[1:3]) and torch.equal(src.cols(2, 5), tensor[:, 2:5])
            assert torch.equal(src.t().rows(2, 5), tensor[:, 2:5].t())
