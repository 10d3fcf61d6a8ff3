"""`--kv-cache-dtype fp8`: K and V stored as float8 e4m3 with a scale per layer (vLLM's scheme).

The references (the CPU path) store clamp(x / scale) rounded to e4m3 and attend over the cache as
attention over its dequantized values would; the Triton kernels (Triton's interpreter on the
CPU, compiled on a GPU) store the references' bytes and attend as they do; a whole model over an
fp8 cache stays close to the same model over a cache of its own dtype. The tests marked `gpu`
run the compiled kernels at full shapes and a model runner end to end (`pytest -m gpu`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # As in test_triton.py: Triton picks interpreting or compiling when a kernel module is
    # imported, so this must come before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "1"

from gpu_worker.attention import AttentionMetadata  # noqa: E402
from gpu_worker.kv_cache import resolve_kv_cache_dtype  # noqa: E402
from gpu_worker.loader import ModelLoadError  # noqa: E402
from gpu_worker.model_runner import ModelRunner  # noqa: E402
from kernels import paged_attention_ref, rope_write_kv_ref, write_kv_ref  # noqa: E402
from kernels.kv_cache import FP8_KV_DTYPE, FP8_MAX, as_bytes, keys_contiguous, keys_contiguous_view, quantize_fp8  # noqa: E402
from kernels.kv_cache import keys_contiguous_copy as copy_keys_contiguous  # noqa: E402
from kernels.paged_attention import decode_attention, decode_context  # noqa: E402
from protocol.config import EngineConfig  # noqa: E402
from tests.kernels.test_reference import build_paged_batch  # noqa: E402
from tests.model_check import random_prompts, relative_error, runner_greedy  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
E4M3_REL = 2.0**-4  # half an ulp of a 3-bit mantissa, relative to the value
E4M3_MIN_NORMAL = 2.0**-6
E4M3_SUB_STEP = 2.0**-9


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output has NaNs"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8_cache(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A random fp8 cache: e4m3 values of about 3 (times the scale, dequantized)."""
    return quantize_fp8(torch.randn(shape, generator=gen) * 3, 1.0)


def dequantize(cache: torch.Tensor, scale: float) -> torch.Tensor:
    return cache.float() * scale


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def keys_contiguous_copy(cache: torch.Tensor) -> torch.Tensor:
    """`cache`'s values in a V cache laid out with each block's keys contiguous (what the GPU
    worker binds for an fp8 cache on CUDA), indexed as the usual layout is."""
    out = copy_keys_contiguous(cache)
    assert keys_contiguous(out) and torch.equal(as_bytes(out), as_bytes(cache))
    return out


V_LAYOUTS = ["head_dim", "keys"]  # the V cache's layouts (kernels.kv_cache.v_keys_contiguous)


# ---- the references ---------------------------------------------------------------------------


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.0625, 0.3), (3.7, 0.01)])
def test_write_kv_quantizes_within_e4m3_rounding_and_saturates(k_scale: float, v_scale: float) -> None:
    gen = torch.Generator().manual_seed(int(k_scale * 1000))
    num_blocks, block_size, kv_heads, d = 5, 8, 2, 32
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:30]
    slots[[3, 11]] = -1  # padding: not written
    k = torch.randn(30, kv_heads, d, generator=gen) * 4 * k_scale
    v = torch.randn(30, kv_heads, d, generator=gen) * 0.02 * v_scale  # many in e4m3's subnormal range
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 460.0, -449.0]) * k_scale  # past e4m3's range: saturate
    k[1, 0, :3] = torch.tensor([0.0, 1e-30, -(2.0**-12)]) * k_scale  # to zero
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, d, dtype=FP8_KV_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    write_kv_ref(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    keep = slots >= 0
    for x, cache, scale in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        # In units of the scale: what e4m3 holds (x / scale, up to fp32 rounding of 1 / scale).
        got = cache.view(-1, kv_heads, d)[slots[keep]].double()
        units = x.double() / scale
        sat = units.abs() > FP8_MAX
        assert torch.equal(got[sat], units[sat].sign() * FP8_MAX)
        normal = (units.abs() >= E4M3_MIN_NORMAL) & ~sat
        assert ((got - units).abs() <= E4M3_REL * units.abs() * (1 + 1e-6))[normal].all()
        sub = units.abs() < E4M3_MIN_NORMAL
        assert ((got - units).abs() <= E4M3_SUB_STEP / 2 * (1 + 1e-6))[sub].all()
        assert sub.any() and normal.any() and sat.any() == (cache is k_cache)
        written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        written[slots[keep]] = True
        assert cache.view(-1, kv_heads, d)[~written].float().eq(0).all()  # the rest untouched
    assert k_cache.view(-1, kv_heads, d)[slots[1], 0, :3].float().eq(0).all()


def test_write_kv_into_a_16_or_32_bit_cache_ignores_the_scales() -> None:
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 6, 2, 8, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([3, 0, -1, 9, 4, 7])
    caches = [torch.zeros(3, 4, 2, 8, dtype=torch.bfloat16) for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots)
    write_kv_ref(k, v, caches[2], caches[3], slots, k_scale=0.5, v_scale=3.0)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("normed", [False, True])
def test_rope_write_kv_ref_stores_the_quantized_k_and_v(normed: bool) -> None:
    """The fused reference over an fp8 cache stores exactly what it stores in fp32, quantized."""
    gen = torch.Generator().manual_seed(int(normed))
    heads, kv_heads, d, tokens = 6, 2, 16, 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen)
    angles = torch.rand(tokens, d // 2, generator=gen) * 10
    cos, sin = (torch.cat([f(angles)] * 2, -1) for f in (torch.cos, torch.sin))
    slots = torch.tensor([4, 0, 7, -1, 1, 2, 11, 6, 3])
    norms = [1 + 0.3 * torch.randn(d, generator=gen) for _ in range(2)] if normed else [None, None]
    k32, v32 = torch.zeros(3, 4, kv_heads, d), torch.zeros(3, 4, kv_heads, d)
    k8, v8 = torch.zeros(3, 4, kv_heads, d, dtype=FP8_KV_DTYPE), torch.zeros(3, 4, kv_heads, d, dtype=FP8_KV_DTYPE)
    q32 = rope_write_kv_ref(qkv, heads, kv_heads, cos, sin, k32, v32, slots, *norms)
    q8 = rope_write_kv_ref(qkv, heads, kv_heads, cos, sin, k8, v8, slots, *norms, k_scale=0.25, v_scale=2.0)
    assert torch.equal(q8, q32) and q8.dtype == torch.float32
    assert same_bytes(k8, quantize_fp8(k32, 0.25)) and same_bytes(v8, quantize_fp8(v32, 2.0))


# (query heads, kv heads, head dim, block size): GQA groups of 4 and 3, MQA, MHA.
REF_LAYOUTS = [(8, 2, 32, 8), (9, 3, 16, 16), (6, 1, 8, 5), (4, 4, 16, 4)]


@pytest.mark.parametrize("layout", REF_LAYOUTS, ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x))
def test_attention_over_fp8_equals_attention_over_the_dequantized_cache(layout: tuple[int, ...]) -> None:
    """Prefill chunks over cached prefixes and decodes in one batch (both paths of the reference),
    against the same batch over an fp32 cache holding the dequantized values."""
    heads, kv_heads, d, block_size = layout
    seqs = [(13, 13), (1, 1), (37, 9), (22, 1), (7, 1), (50, 2), (19, 1)]
    batch = build_paged_batch([c for c, _ in seqs], [n for _, n in seqs], heads, kv_heads, d, block_size, seed=3)
    gen = torch.Generator().manual_seed(sum(layout))
    k_scale, v_scale = 0.7, 0.05
    k8 = fp8_cache(batch.k_cache.shape, gen)
    v8 = fp8_cache(batch.v_cache.shape, gen)
    meta = batch[3:6]
    scale = d**-0.5
    ref = paged_attention_ref(batch.q, dequantize(k8, k_scale), dequantize(v8, v_scale), *meta, scale)
    out = paged_attention_ref(batch.q, k8, v8, *meta, scale, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_references_over_a_keys_contiguous_v_cache(fp8: bool) -> None:
    """The torch paths (write, varlen attention, the decode path) over a V cache whose blocks
    keep their keys contiguous: the same values written, the same outputs read."""
    heads, kv_heads, d, block_size = 8, 2, 32, 8
    lens = [3, 16, 17, 40]
    batch = build_paged_batch(lens, [1, 1, 5, 1], heads, kv_heads, d, block_size, seed=5)
    gen = torch.Generator().manual_seed(5)
    make = (lambda shape: fp8_cache(shape, gen)) if fp8 else (lambda shape: torch.randn(shape, generator=gen))
    k, v = make(batch.k_cache.shape), make(batch.v_cache.shape)
    v_keys = keys_contiguous_copy(v)
    assert not v_keys.is_contiguous() and torch.equal(v_keys.float(), v.float())
    meta = batch[3:6]
    ref = paged_attention_ref(batch.q, k, v, *meta, 0.2, v_scale=0.5)
    assert torch.equal(paged_attention_ref(batch.q, k, v_keys, *meta, 0.2, v_scale=0.5), ref)
    decodes = [0, 1, 3]
    context = decode_context(batch.block_tables[decodes], batch.seq_lens[decodes], block_size)
    q1 = torch.randn(len(decodes), heads, d, generator=gen)
    torch.testing.assert_close(decode_attention(q1, k, v_keys, context, 0.2), decode_attention(q1, k, v, context, 0.2),
                               atol=0, rtol=0)
    new_k, new_v = (torch.randn(5, kv_heads, d, generator=gen) for _ in range(2))
    slots = torch.tensor([3, 70, -1, 17, 100])
    before = as_bytes(v).clone()
    write_kv_ref(new_k, new_v, k.clone(), v, slots, v_scale=0.25)
    assert not torch.equal(as_bytes(v), before)
    write_kv_ref(new_k, new_v, k.clone(), v_keys, slots, v_scale=0.25)
    assert torch.equal(as_bytes(v_keys), as_bytes(v)) and keys_contiguous(v_keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_decode_path_over_fp8_uneven_contexts(dtype: torch.dtype) -> None:
    """`decode_context` + `decode_attention` (a CPU decode step) over padded, masked contexts; q
    and the output keep q's dtype."""
    heads, kv_heads, d, block_size = 8, 2, 32, 8
    lens = [3, 16, 17, 40, 1]
    batch = build_paged_batch(lens, [1] * len(lens), heads, kv_heads, d, block_size, seed=4)
    gen = torch.Generator().manual_seed(4)
    k_scale, v_scale = 2.5, 0.125
    k8, v8 = fp8_cache(batch.k_cache.shape, gen), fp8_cache(batch.v_cache.shape, gen)
    q = batch.q.to(dtype)
    context = decode_context(batch.block_tables, batch.seq_lens, block_size)
    out = decode_attention(q, k8, v8, context, 0.2, k_scale=k_scale, v_scale=v_scale)
    ref = decode_attention(q.float(), dequantize(k8, k_scale), dequantize(v8, v_scale), context, 0.2)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        assert rel_err(out, ref) < 1e-2


def test_v_cache_layout_rule() -> None:
    """V keeps a block's keys contiguous for fp8 caches on CUDA only (the environment's default)."""
    from kernels.kv_cache import v_keys_contiguous

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert v_keys_contiguous(cuda, FP8_KV_DTYPE)
    assert not v_keys_contiguous(cuda, torch.bfloat16) and not v_keys_contiguous(cpu, FP8_KV_DTYPE)
    assert keys_contiguous(keys_contiguous_view(torch.empty(3, 16, 2, 8)))
    assert not keys_contiguous(torch.empty(3, 16, 2, 8))


def test_kv_cache_dtype_is_checked_and_resolved() -> None:
    cpu = torch.device("cpu")
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.float32, cpu) == FP8_KV_DTYPE
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.bfloat16, cpu) == FP8_KV_DTYPE
    with pytest.raises(ModelLoadError, match="kv_cache_dtype 'fp8_e5m2' is not one of auto, fp8, fp8_e4m3"):
        resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16, cpu)
    from pagoda.cli.main import build_parser
    from protocol.config import config_from_args

    args = build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"])
    assert config_from_args(args).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit, match="--kv-cache-dtype 'int8' is not one of auto, fp8, fp8_e4m3"):
        config_from_args(build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"]))


def test_block_size_defaults_to_64_slots_over_an_fp8_cache(monkeypatch) -> None:
    """--block-size unset: 16 slots (vLLM's default), 64 with --kv-cache-dtype fp8 (the fp8 decode
    kernel's key tile in one block); a flag or PAGODA_BLOCK_SIZE wins; below 1 is refused."""
    from pagoda.cli.main import build_parser
    from protocol.config import config_from_args, decode_config, encode_config

    def block_size(*argv: str) -> int:
        return config_from_args(build_parser().parse_args(["serve", *argv])).block_size

    assert block_size() == 16
    assert block_size("--kv-cache-dtype", "auto") == 16
    assert block_size("--kv-cache-dtype", "fp8") == 64
    assert block_size("--kv-cache-dtype", "fp8_e4m3") == 64
    assert block_size("--kv-cache-dtype", "fp8", "--block-size", "16") == 16
    assert EngineConfig(kv_cache_dtype="fp8").block_size == 64
    assert EngineConfig(kv_cache_dtype="fp8", block_size=32).block_size == 32
    # Resolved once: every process gets the number, not the rule.
    assert decode_config(encode_config(EngineConfig(kv_cache_dtype="fp8"))).block_size == 64
    monkeypatch.setenv("PAGODA_BLOCK_SIZE", "32")
    assert block_size("--kv-cache-dtype", "fp8") == 32
    with pytest.raises(SystemExit, match="block_size must be at least 1, got 0"):
        block_size("--block-size", "0")


# ---- the model runner on the CPU (the references) -------------------------------------------------


def make_runner(folder: str, device: str, dtype: str, kv_cache_dtype: str, **kw: object) -> ModelRunner:
    kw.setdefault("num_gpu_blocks_override", 64)
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("block_size", 8)  # None: the default for the cache's dtype
    config = EngineConfig(model=folder, device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype, **kw)
    return ModelRunner(config)


def test_fp8_pool_holds_4x_the_fp32_blocks(tiny) -> None:
    folder, _ = tiny("gpt2")
    blocks = {}
    for kv in ("auto", "fp8"):
        runner = make_runner(str(folder), "cpu", "float32", kv, num_gpu_blocks_override=None, kv_cache_memory_gb=0.01)
        attn = runner.model.attention_layers()[0]
        assert attn.k_cache.dtype == (FP8_KV_DTYPE if kv == "fp8" else torch.float32)
        assert (attn.k_scale, attn.v_scale, attn.q_dtype) == (1.0, 1.0, torch.float32)
        blocks[kv] = runner.num_blocks
    assert blocks["fp8"] // 4 == blocks["auto"]  # 1 byte an element instead of 4


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_tiny_model_on_cpu_over_fp8_cache_stays_near_the_fp32_cache(family, tiny, tokenizer) -> None:
    """Tiny random models (Llama 3: untied, rope scaling; Qwen3: q/k norms; GPT-2: the plain K/V
    write) of a trained model's activation scale, on the CPU path, over an fp8 cache against an
    fp32 one. Teacher-forced (a 16-token prefill, then 32 decode steps, 4 sequences): logits
    within 0.05 (measured: at most 0.021; 2.8% of the largest), next-token argmax the same except
    at near-ties (measured: 4 of 260 flips on the Llama, top-2 gaps under 0.005; none on the
    others). Greedy generation through StepPlans: mostly the same tokens (measured: 48 of 48,
    40 of 48 on the Llama, whose logits are nearly flat)."""
    from tests.tiny_models import REAL_INIT

    folder, _ = tiny(family, REAL_INIT)
    rng = random.Random(0)
    seqs = [[rng.randrange(2, len(tokenizer)) for _ in range(48)] for _ in range(4)]
    prompts = random_prompts(len(tokenizer))
    logits, greedy = {}, {}
    for kv in ("auto", "fp8"):
        runner = make_runner(str(folder), "cpu", "float32", kv)
        logits[kv] = teacher_forced_logits(runner, seqs, prefill=16).flatten(0, 1)
        greedy[kv] = runner_greedy(runner, prompts, max_tokens=16)
    assert (logits["fp8"] - logits["auto"]).abs().max() < 0.05
    assert relative_error(logits["fp8"], logits["auto"]) < 0.06
    assert_top1_agrees_but_near_ties(logits["fp8"], logits["auto"], near_tie=0.02, min_agreement=0.95)
    same = sum(a == b for x, y in zip(greedy["fp8"], greedy["auto"]) for a, b in zip(x, y))
    assert same >= 0.75 * sum(map(len, greedy["auto"]))


def assert_top1_agrees_but_near_ties(
    ours: torch.Tensor, reference: torch.Tensor, near_tie: float, min_agreement: float
) -> float:
    """Argmax of each row equal to the reference's wherever the reference's best two logits are
    more than `near_tie` apart, and overall in at least `min_agreement` of the rows."""
    top2 = reference.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > near_tie
    same = ours.argmax(-1) == reference.argmax(-1)
    assert same[clear].all(), f"{int((~same[clear]).sum())} of {int(clear.sum())} clear rows differ"
    agreement = same.float().mean().item()
    assert agreement >= min_agreement, agreement
    return agreement


# ---- the Triton kernels (the interpreter on the CPU, compiled on a GPU) ----------------------------


def _triton_modules():
    pytest.importorskip("triton")
    from kernels import triton_kv_cache, triton_paged_attention, triton_qkv

    return triton_kv_cache, triton_paged_attention, triton_qkv


HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_ready() -> bool:
    """False when something imported triton for compiling before this module set TRITON_INTERPRET
    (then triton's own jit functions, `tl.cdiv` among them, compile even in our fresh kernels)."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    kernel = _triton_modules()[1]._paged_attention_kernel
    return all(isinstance(f, InterpretedFunction) for f in (standard.cdiv, kernel))


IN_PROCESS = HAS_TRITON and (ON_GPU or _interpreter_ready())
triton_in_process = pytest.mark.skipif(
    not IN_PROCESS, reason="no triton, or triton was imported for compiling earlier: see the fresh-process test"
)


@pytest.mark.skipif(IN_PROCESS or not HAS_TRITON, reason="the Triton tests run in this process (or need triton)")
def test_triton_fp8_in_a_fresh_interpreter_process() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", os.path.abspath(__file__)],
        cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@triton_in_process
@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_write_kv_stores_the_reference_bytes(dtype: torch.dtype, v_layout: str) -> None:
    """Every byte as the reference: round to nearest even (ties included), subnormals, saturation;
    the same values into a V cache whose blocks keep their keys contiguous."""
    kv, _, _ = _triton_modules()
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, kv_heads, d, tokens = 6, 16, 3, 64, 40
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[5, 17]] = -1
    qkv = torch.randn(tokens, 5 * kv_heads * d, generator=gen) * 8
    # Every e4m3 value and every midpoint between neighbours (ties), of both signs, some saturating.
    grid = torch.arange(127, dtype=torch.uint8).view(FP8_KV_DTYPE).float()
    ties = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([449.0, 470.0, 1e6])])
    flat = qkv.view(-1)
    flat[: 2 * len(ties)] = torch.cat([ties, -ties])
    qkv = qkv.to(DEVICE, dtype)
    k = qkv[:, : kv_heads * d].view(tokens, kv_heads, d)
    v = qkv[:, 2 * kv_heads * d : 3 * kv_heads * d].view(tokens, kv_heads, d)
    poison = fp8_cache((num_blocks, block_size, kv_heads, d), gen).to(DEVICE)
    k_ref, v_ref, k_out, v_out = (poison.clone() for _ in range(4))
    if v_layout == "keys":
        v_out = keys_contiguous_copy(poison)
    for k_scale, v_scale in ((1.0, 1.0), (0.5, 0.0137)):
        write_kv_ref(k, v, k_ref, v_ref, slots.to(DEVICE), k_scale=k_scale, v_scale=v_scale)
        kv.write_kv_triton(k, v, k_out, v_out, slots.to(DEVICE), k_scale=k_scale, v_scale=v_scale)
        assert same_bytes(k_out, k_ref) and same_bytes(v_out, v_ref)
    assert not same_bytes(k_out, poison)


@triton_in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("layout", "normed", "v_layout"),
    [((9, 3, 64), True, "head_dim"), ((4, 2, 16), False, "head_dim"), ((9, 3, 64), False, "keys")], ids=str,
)
def test_triton_rope_write_kv_over_fp8(
    layout: tuple[int, int, int], normed: bool, v_layout: str, dtype: torch.dtype
) -> None:
    _, _, qkv_kernels = _triton_modules()
    heads, kv_heads, d = layout
    tokens, num_blocks, block_size = 11, 6, 16
    gen = torch.Generator().manual_seed(heads * d)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(tokens, d // 2, generator=gen) * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE) for f in (torch.cos, torch.sin))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::4] = -1
    slots = slots.to(DEVICE)
    weights = [(1 + 0.3 * torch.randn(d, generator=gen)).to(DEVICE, dtype) for _ in range(2)] if normed else []
    norms = (*weights, 1e-6) if normed else (None, None, 1e-6)
    poison = fp8_cache((num_blocks, block_size, kv_heads, d), gen).to(DEVICE)
    k_out, v_out, k_ref, v_ref = (poison.clone() for _ in range(4))
    if v_layout == "keys":
        v_out = keys_contiguous_copy(poison)
    scales = dict(k_scale=0.3, v_scale=1.7)
    q = qkv_kernels.rope_write_kv_triton(qkv, heads, kv_heads, cos, sin, k_out, v_out, slots, *norms, **scales)
    q_ref = rope_write_kv_ref(qkv, heads, kv_heads, cos, sin, k_ref, v_ref, slots, *norms, **scales)
    assert q.dtype == dtype and rel_err(q, q_ref) < {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert same_bytes(v_out, v_ref)  # v is quantized as read, not computed
    if dtype == torch.float32 and not ON_GPU:
        assert same_bytes(k_out, k_ref)
    else:  # k's rotary rounds (bf16; fused multiply-adds on the GPU): now and then one fp8 step apart
        assert rel_err(k_out.float(), k_ref.float()) < 2e-2
    written = slots[slots >= 0]
    kept = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    kept[written] = False
    assert same_bytes(k_out.view(-1, kv_heads, d)[kept], poison.view(-1, kv_heads, d)[kept])


def run_attention_over_fp8(
    seqs: list[tuple[int, int]], layout: tuple[int, ...], dtype: torch.dtype, seed: int, v_layout: str = "head_dim",
    **kw: object,
) -> float:
    """The Triton kernel against the reference (in fp32) over the same fp8 cache; relative error.
    v_layout "keys": the kernel reads V from a copy whose blocks keep their keys contiguous."""
    _, attn, _ = _triton_modules()
    heads, kv_heads, d, block_size = layout
    batch = build_paged_batch([c for c, _ in seqs], [n for _, n in seqs], heads, kv_heads, d, block_size, seed)
    gen = torch.Generator().manual_seed(seed)
    k_scale, v_scale = 0.4, 1.9
    k8 = fp8_cache(batch.k_cache.shape, gen).to(DEVICE)
    v8 = fp8_cache(batch.v_cache.shape, gen).to(DEVICE)
    q = batch.q.to(DEVICE, dtype)
    meta = [t.to(DEVICE) for t in batch[3:6]]
    scale = d**-0.5
    ref = paged_attention_ref(q.float(), k8, v8, *meta, scale, k_scale=k_scale, v_scale=v_scale)
    out = torch.full_like(q, float("nan"))
    v_read = keys_contiguous_copy(v8) if v_layout == "keys" else v8
    attn.paged_attention_triton(q, k8, v_read, *meta, scale, out=out, k_scale=k_scale, v_scale=v_scale, **kw)
    return rel_err(out, ref)


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@triton_in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", [(8, 2, 64, 16), (9, 3, 80, 16)], ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x))
def test_triton_paged_attention_over_fp8(layout: tuple[int, ...], dtype: torch.dtype) -> None:
    """Decodes and prefill chunks (head dim 80: the padded-dims path), q in the model's dtype."""
    rng = random.Random(f"{layout}-{dtype}")
    seqs = [(rng.randint(1, 70), 1) for _ in range(4)] + [(45, 12), (19, 19)]
    assert run_attention_over_fp8(seqs, layout, dtype, seed=rng.randrange(1 << 30)) < TOLERANCE[dtype]


@triton_in_process
@pytest.mark.parametrize(("block_size", "config"), [(16, None), (16, (16, 8, 2)), (8, (64, 32, 1))], ids=str)
def test_triton_paged_attention_over_keys_contiguous_v(block_size: int, config: tuple[int, int, int] | None) -> None:
    """V read from blocks that keep their keys contiguous: the same output, with key tiles longer
    or shorter than a block, decodes split and not, and prefill chunks."""
    _, attn, _ = _triton_modules()
    rng = random.Random(block_size)
    seqs = [(rng.randint(1, 90), 1) for _ in range(4)] + [(45, 12), (19, 19)]
    kw = {} if config is None else {"config": attn.AttentionConfig(config[0], config[1], config[2], 4, 2)}
    for dtype in (torch.float32, torch.bfloat16):
        err = run_attention_over_fp8(seqs, (8, 2, 32, block_size), dtype, seed=block_size, v_layout="keys", **kw)
        assert err < TOLERANCE[dtype]


@triton_in_process
@pytest.mark.parametrize("num_splits", [2, 4])
def test_triton_paged_attention_over_fp8_split_kv_and_two_launches(num_splits: int) -> None:
    """v_scale applied to each slice before the merge; decodes first as their own launch."""
    _, attn, _ = _triton_modules()
    rng = random.Random(num_splits)
    seqs = [(rng.randint(1, 150), 1) for _ in range(4)] + [(60, 7), (3, 1)]
    config = attn.AttentionConfig(16, 16, num_splits, num_warps=4, num_stages=2)
    err = run_attention_over_fp8(seqs, (8, 2, 32, 16), torch.float32, seed=num_splits, config=config)
    assert err < TOLERANCE[torch.float32]
    err = run_attention_over_fp8(seqs, (8, 2, 32, 16), torch.float32, seed=num_splits, num_decodes=4)
    assert err < TOLERANCE[torch.float32]


def fp8_decode_config(
    splits: int = 1, q_terms: int = 2, p_terms: int = 2, tile_n: int = 64, max_registers: int | None = None
):
    from kernels.triton_decode_fp8 import DecodeFp8Config

    return DecodeFp8Config(tile_n, splits, 4, 2, q_terms, p_terms, max_registers)


@triton_in_process
def test_fp8_decode_launches_cap_registers_only_where_programs_queue() -> None:
    """96 registers a thread (5 programs an SM) where a launch has at least 6 programs an SM; one
    wave or less keeps the uncapped build (kernels/triton_paged_attention.py: the H200's figures)."""
    _, attn, _ = _triton_modules()
    t = attn.choose_decode_fp8_config(256, 8, attn.H100)  # T's batch: 2,048 programs, 15.5 an SM
    assert t.num_splits == 1 and t.max_registers == attn.DECODE_FP8_MAX_REGISTERS == 96
    assert attn.choose_decode_fp8_config(128, 8, attn.H100).max_registers == 96  # 7.8 an SM
    mid = attn.choose_decode_fp8_config(96, 8, attn.H100)  # 5.8 an SM: unsplit, uncapped
    assert mid.num_splits == 1 and mid.max_registers is None
    # One wave (<= 4 an SM): keys in two slices, which then queue (7.8 an SM) and are capped.
    wave = attn.choose_decode_fp8_config(64, 8, attn.H100)
    assert wave.num_splits == 2 and wave.max_registers == 96
    assert attn.choose_decode_fp8_config(64, 8, attn.H100, max_seq_len=511).num_splits == 1  # < 4 tiles a half
    assert attn.choose_decode_fp8_config(48, 8, attn.H100).max_registers is None  # 2 x 384: 5.8 an SM
    small = attn.choose_decode_fp8_config(4, 8, attn.H100)
    assert small.num_splits > 1 and small.max_registers is None
    # The interpreter has no registers to cap: the capped launch computes the same.
    seqs = [(63, 1), (130, 1)]
    capped = run_attention_over_fp8(seqs, (8, 2, 64, 16), torch.float32, seed=3, v_layout="keys",
                                    config=fp8_decode_config(max_registers=96))
    assert capped == run_attention_over_fp8(seqs, (8, 2, 64, 16), torch.float32, seed=3, v_layout="keys",
                                            config=fp8_decode_config())


@triton_in_process
@pytest.mark.parametrize(
    ("layout", "splits"),
    [((8, 2, 64, 16), 1), ((16, 1, 128, 32), 2), ((4, 4, 64, 16), 4), ((8, 2, 64, 64), 2), ((2, 1, 64, 128), 1)],
    ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x) if isinstance(x, tuple) else f"splits{x}",
)
def test_fp8_decode_kernel_against_the_reference(layout: tuple[int, ...], splits: int) -> None:
    """`kernels.triton_decode_fp8` (products in e4m3, keys as the rows) over a keys-contiguous V:
    query groups of 4, 16 and 1, contexts of one key, of a tile less one, one and one more, keys
    split or not. With two e4m3 terms for q and p (the default) the error is that of products in
    bf16; with one term each it is ~20x larger, the terms are what hold it."""
    seqs = [(1, 1), (63, 1), (64, 1), (65, 1), (130, 1), (200, 1)]
    two = run_attention_over_fp8(seqs, layout, torch.float32, seed=3, v_layout="keys",
                                 config=fp8_decode_config(splits))
    one = run_attention_over_fp8(seqs, layout, torch.float32, seed=3, v_layout="keys",
                                 config=fp8_decode_config(splits, q_terms=1, p_terms=1))
    assert two < 2e-3
    assert 10 * two < one < 6e-2
    q_only = run_attention_over_fp8(seqs, layout, torch.float32, seed=3, v_layout="keys",
                                    config=fp8_decode_config(splits, q_terms=2, p_terms=1))
    assert two < q_only < one


@triton_in_process
@pytest.mark.parametrize("block_size", [16, 64])
def test_fp8_decode_kernel_ignores_unwritten_slots(block_size: int) -> None:
    """Slots past a sequence's end in its last block (and blocks nobody owns) hold NaN bytes: the
    output is the one over a clean cache (K masked by key, V by block then zeroed by key); blocks
    of 16 slots (4 a key tile) and of 64 (a tile in one block, the fp8 cache's default). Triton's
    interpreter widens e4m3's NaN byte to a finite value, so the NaN half bites compiled only
    (`test_gpu_fp8_decode_kernel_ignores_unwritten_slots`)."""
    fp8_decode_over_unwritten_slots(block_size)


def fp8_decode_over_unwritten_slots(block_size: int) -> None:
    _, attn, _ = _triton_modules()
    heads, kv_heads, d = 8, 2, 64
    lens = [5, 17, 64, 90]
    batch = build_paged_batch(lens, [1] * len(lens), heads, kv_heads, d, block_size, seed=4)
    gen = torch.Generator().manual_seed(4)
    k8 = fp8_cache(batch.k_cache.shape, gen).to(DEVICE)
    v8 = fp8_cache(batch.v_cache.shape, gen).to(DEVICE)
    written = torch.zeros(batch.k_cache.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lens):
        for pos in range(n):
            written[batch.block_tables[b, pos // block_size], pos % block_size] = True
    k_poisoned, v_poisoned = k8.clone(), v8.clone()
    for cache in (k_poisoned, v_poisoned):
        cache.view(torch.uint8)[~written] = 0x7F  # e4m3's NaN
    assert v_poisoned.float().isnan().any()
    meta = [t.to(DEVICE) for t in batch[3:6]]
    q = batch.q.to(DEVICE)
    outs = [
        attn.paged_attention_triton(q, k, keys_contiguous_copy(v), *meta, d**-0.5, config=fp8_decode_config(splits))
        for k, v in ((k8, v8), (k_poisoned, v_poisoned)) for splits in (1, 2)
    ]
    assert not any(o.isnan().any() for o in outs)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@triton_in_process
def test_fp8_decode_kernel_takes_the_decodes_it_applies_to(monkeypatch) -> None:
    """Decode-only launches over an fp8 cache with V keys-contiguous go to the fp8 decode kernel
    (a mixed batch: its leading decodes); a d-contiguous V, a bf16 cache, groups over 16 heads,
    odd head dims or PAGODA_FP8_DECODE=0 keep the general kernel."""
    from kernels import triton_decode_fp8

    _, attn, _ = _triton_modules()
    launches = []
    original = triton_decode_fp8.launch
    monkeypatch.setattr(triton_decode_fp8, "launch", lambda *a, **kw: launches.append(a[-1]) or original(*a, **kw))
    seqs = [(40, 1), (77, 1), (9, 1), (50, 6)]
    err = run_attention_over_fp8(seqs[:3], (8, 2, 64, 16), torch.float32, seed=5, v_layout="keys")
    assert launches == [3] and err < 6e-2  # the default terms; the error is the reference test's
    err = run_attention_over_fp8(seqs, (8, 2, 64, 16), torch.float32, seed=5, v_layout="keys", num_decodes=3)
    assert launches == [3, 3] and err < 6e-2
    run_attention_over_fp8(seqs, (8, 2, 64, 16), torch.float32, seed=5, v_layout="keys")  # one mixed launch
    run_attention_over_fp8(seqs[:3], (8, 2, 64, 16), torch.float32, seed=5, v_layout="head_dim")
    assert launches == [3, 3]
    monkeypatch.setattr(triton_decode_fp8, "_ENV", "0")
    assert run_attention_over_fp8(seqs[:3], (8, 2, 64, 16), torch.float32, seed=5, v_layout="keys") < 1e-5
    assert launches == [3, 3]
    monkeypatch.setattr(triton_decode_fp8, "_ENV", "1")
    with pytest.raises(ValueError, match="decode-only"):  # forced onto a prefill chunk
        run_attention_over_fp8(seqs, (8, 2, 64, 16), torch.float32, seed=5, v_layout="keys", config=fp8_decode_config())
    with pytest.raises(ValueError, match="keys-contiguous"):
        run_attention_over_fp8(seqs[:3], (8, 2, 64, 16), torch.float32, seed=5, config=fp8_decode_config())
    k8 = torch.zeros(2, 16, 2, 128, dtype=FP8_KV_DTYPE)
    v8 = keys_contiguous_copy(k8)
    assert triton_decode_fp8.applies(16, k8, v8)
    assert not triton_decode_fp8.applies(34, k8, v8)  # 17 query heads a KV head: 16 is the most
    assert not triton_decode_fp8.applies(16, k8, k8)
    bf16 = k8.bfloat16()
    assert not triton_decode_fp8.applies(16, bf16, keys_contiguous_copy(bf16))
    assert not triton_decode_fp8.applies(16, k8[..., :80], keys_contiguous_copy(k8[..., :80]))


def test_decodes_are_ordered_longest_first_only_for_the_fp8_decode_kernel(monkeypatch) -> None:
    import kernels

    k8 = torch.zeros(2, 16, 2, 128, dtype=FP8_KV_DTYPE)
    v8 = copy_keys_contiguous(k8)
    assert not kernels.decodes_longest_first(4, k8, v8)  # CPU caches: the C functions and references
    monkeypatch.setattr(kernels, "_DECODE_ORDER", "longest")
    assert kernels.decodes_longest_first(4, k8.bfloat16(), k8.bfloat16())
    if torch.cuda.is_available():
        monkeypatch.setattr(kernels, "_DECODE_ORDER", "auto")
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert kernels.decodes_longest_first(4, k8.cuda(), v8.cuda()) == hopper
        assert not kernels.decodes_longest_first(4, k8.cuda(), k8.cuda())  # V d-contiguous: the general kernel
        assert not kernels.decodes_longest_first(4, k8.bfloat16().cuda(), copy_keys_contiguous(k8.bfloat16()).cuda())


@triton_in_process
def test_triton_attention_checks_dtypes_and_fp8_tiles_take_less_shared_memory() -> None:
    _, attn, _ = _triton_modules()
    batch = build_paged_batch([5], [1], 4, 2, 16, 4, seed=0)
    meta = [t.to(DEVICE) for t in batch[3:6]]
    q = batch.q.to(DEVICE, torch.bfloat16)
    with pytest.raises(ValueError, match="dtypes differ"):
        attn.paged_attention_triton(q, batch.k_cache.to(DEVICE, torch.float16), batch.v_cache.to(DEVICE), *meta, 0.25)
    k8 = quantize_fp8(batch.k_cache, 1.0).to(DEVICE)
    with pytest.raises(ValueError, match="dtypes differ"):  # K and V in one dtype
        attn.paged_attention_triton(q, k8, batch.v_cache.to(DEVICE, torch.bfloat16), *meta, 0.25)
    # Half the bytes per K/V element: on devices of less shared memory, tilings at least as
    # large as over a bf16 cache, larger on some (e.g. 128x64 prefill tiles within 104 KB).
    def size(config: attn.AttentionConfig) -> int:
        return config.block_m * config.tile_n * config.num_stages

    larger = []
    for kb in range(48, 232, 8):
        limits = attn.DeviceLimits(num_sms=80, shared_mem=kb * 1024)
        for tokens in (4096, 1):  # prefill, decode
            bf16 = attn.choose_config(tokens, 1, 32, 8, 128, 2, limits)
            fp8 = attn.choose_config(tokens, 1, 32, 8, 128, 2, limits, kv_elem_size=1)
            assert size(fp8) >= size(bf16) and fp8 in attn.possible_configs(32, 8, 128, 2, limits, kv_elem_size=1)
            larger += [kb] * (size(fp8) > size(bf16))
    assert 104 in larger and 112 in larger
    # On an H100/H200 the same tilings as over a bf16 cache.
    assert attn.choose_config(4096, 1, 32, 8, 128, 2, attn.H100, kv_elem_size=1) == attn.choose_config(
        4096, 1, 32, 8, 128, 2, attn.H100
    )


@triton_in_process
@pytest.mark.skipif(ON_GPU, reason="on a GPU both paths would take the compiled kernels")
@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_triton_model_over_fp8_equals_the_reference_path(family, tiny, tokenizer, monkeypatch) -> None:
    """A whole tiny model over an fp8 cache (the fused rope write with q/k norms; GPT-2's plain
    write), prefill and decodes, on the kernels the GPU runs (here interpreted) against the same
    model on the references, in fp32: the same cache bytes, so logits equal to fp32 rounding."""
    import gpu_worker.kv_cache as kv_cache_module
    import kernels
    from tests.model_check import runner_last_logits

    folder, _ = tiny(family)
    prompts = random_prompts(len(tokenizer), lengths=(3, 17, 21))
    results = {}
    for path in ("reference", "triton", "triton, V keys-contiguous"):
        if path != "reference":
            monkeypatch.setattr(kernels, "_triton", lambda t: True)
        if path == "triton, V keys-contiguous":  # the layout CUDA binds for an fp8 cache
            monkeypatch.setattr(kv_cache_module, "v_keys_contiguous", lambda device, dtype: True)
        runner = make_runner(str(folder), DEVICE, "float32", "fp8")
        attns = list(runner.model.attention_layers())
        assert all(keys_contiguous(a.v_cache) == path.endswith("contiguous") for a in attns), path
        results[path] = (runner_last_logits(runner, prompts), runner_greedy(runner, prompts, max_tokens=4))
    for path in ("triton", "triton, V keys-contiguous"):
        assert rel_err(results[path][0], results["reference"][0]) < 1e-5, path
        assert results[path][1] == results["reference"][1], path


# ---- full shapes and a model runner, compiled, on a GPU ------------------------------------------

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("layout", [(32, 8, 128, 16), (16, 8, 128, 32), (14, 2, 128, 16), (16, 8, 128, 64)],
                         ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x))
def test_gpu_fp8_paged_attention_full_shapes(layout: tuple[int, ...]) -> None:
    """bf16 q over an fp8 cache: long prefill chunks over cached prefixes next to many decodes,
    then a decode-only batch (decode tiles, split keys), against the reference in fp32."""
    rng = random.Random(f"fp8-{layout}")
    seqs = [(rng.randint(500, 4000), rng.randint(1, 400)) for _ in range(4)]
    seqs += [(rng.randint(1, 4500), 1) for _ in range(40)]
    assert run_attention_over_fp8(seqs, layout, torch.bfloat16, seed=rng.randrange(1 << 30)) < 1e-2
    decodes = [(rng.randint(1000, 4100), 1) for _ in range(5)]
    assert run_attention_over_fp8(decodes, layout, torch.bfloat16, seed=1, max_seq_len=4100) < 1e-2


@gpu
@pytest.mark.parametrize("layout", [(32, 8, 128, 16), (16, 8, 128, 16), (14, 2, 128, 32), (16, 8, 128, 64),
                                    (32, 8, 128, 128)], ids=lambda x: "h{}-kv{}-d{}-bs{}".format(*x))
def test_gpu_fp8_decode_kernel_full_shapes(layout: tuple[int, ...]) -> None:
    """The fp8-product decode kernel compiled (Hopper's e4m3 warpgroup products), bf16 q, V
    keys-contiguous: many decodes, then 5 long ones with split keys, at its default (one e4m3 term
    for p) and with both terms, against the reference in fp32; and capped at 96 registers."""
    rng = random.Random(f"fp8-decode-{layout}")
    many = [(rng.randint(1, 4500), 1) for _ in range(40)]
    long = [(rng.randint(1000, 4100), 1) for _ in range(5)]
    for seqs, kw in ((many, {}), (long, {"max_seq_len": 4100})):
        assert run_attention_over_fp8(seqs, layout, torch.bfloat16, seed=2, v_layout="keys", **kw) < 4e-2
        cfg = fp8_decode_config(splits=8 if kw else 1)
        assert run_attention_over_fp8(seqs, layout, torch.bfloat16, seed=2, v_layout="keys", config=cfg) < 1e-2
    capped = fp8_decode_config(p_terms=1, max_registers=96)  # what T's launches take (96 a thread)
    assert run_attention_over_fp8(many, layout, torch.bfloat16, seed=2, v_layout="keys", config=capped) < 4e-2


@gpu
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_fp8_decode_kernel_ignores_unwritten_slots(block_size: int) -> None:
    fp8_decode_over_unwritten_slots(block_size)


@gpu
def test_gpu_fp8_writes_full_shapes() -> None:
    """llama3-8b's K/V rows (8 kv heads of 128), bf16 in: the GPU's e4m3 cast (round to nearest
    even, saturating) stores the reference's bytes, write_kv and the fused rope kernel alike (v)."""
    kv, _, qkv_kernels = _triton_modules()
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, heads, kv_heads, d, num_blocks, block_size = 512, 32, 8, 128, 64, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=gen, device="cuda", dtype=torch.bfloat16) * 30
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:tokens]
    caches = [torch.zeros(num_blocks, block_size, kv_heads, d, dtype=FP8_KV_DTYPE, device="cuda") for _ in range(4)]
    write_kv_ref(k, v, caches[0], caches[1], slots, k_scale=0.11, v_scale=1.0)
    kv.write_kv_triton(k, v, caches[2], caches[3], slots, k_scale=0.11, v_scale=1.0)
    assert same_bytes(caches[2], caches[0]) and same_bytes(caches[3], caches[1])
    angles = torch.rand(tokens, d // 2, generator=gen, device="cuda") * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    fused = [torch.zeros_like(caches[0]) for _ in range(4)]
    q = qkv_kernels.rope_write_kv_triton(qkv, heads, kv_heads, cos, sin, fused[0], fused[1], slots, v_scale=0.5)
    q_ref = rope_write_kv_ref(qkv, heads, kv_heads, cos, sin, fused[2], fused[3], slots, v_scale=0.5)
    assert rel_err(q, q_ref) < 1e-2
    assert same_bytes(fused[1], fused[3]) and rel_err(fused[0].float(), fused[2].float()) < 2e-2


def llama_folder(root, hidden: int = 1024, layers: int = 4, heads: int = 8, kv_heads: int = 2, vocab: int = 4096,
                 init: float = 0.02, embed_std: float = 1.0) -> str:
    """A random llama-like model (head dim 128, GQA 4 as llama3-8b) saved in bf16.

    The embeddings are wider than the matrices (std `embed_std`): the residual stream then
    carries each token as a trained model's does, each attention adding to it rather than
    replacing it. With every weight at init 0.02 the attention outputs are the whole stream and
    any relative noise on them, fp8's ~3%, moves every logit by as much."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, initializer_range=init, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=vocab - 1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
    model.to(torch.bfloat16).save_pretrained(str(root))
    return str(root)


@torch.inference_mode()
def teacher_forced_logits(runner: ModelRunner, seqs: list[list[int]], prefill: int) -> torch.Tensor:
    """Each sequence's first `prefill` tokens in one step, then one token per step (decode steps,
    eager): the logits predicting positions prefill .. L, [B, L - prefill + 1, vocab] fp32."""
    device, block_size = runner.device, runner.block_size
    num_seqs, length = len(seqs), len(seqs[0])
    per_seq = math.ceil(length / block_size)
    assert runner.num_blocks >= num_seqs * per_seq
    tables = torch.arange(num_seqs * per_seq, dtype=torch.int32).view(num_seqs, per_seq)
    tokens = torch.tensor(seqs)
    out = []

    def step(start: int, end: int) -> torch.Tensor:
        n = end - start
        pos = torch.arange(start, end).repeat(num_seqs)
        rows = torch.arange(num_seqs).repeat_interleave(n)
        meta = AttentionMetadata(
            slot_mapping=(tables[rows, pos // block_size].long() * block_size + pos % block_size).to(device),
            block_tables=tables.to(device),
            seq_lens=torch.full((num_seqs,), end, dtype=torch.int32, device=device),
            query_start_loc=(torch.arange(num_seqs + 1, dtype=torch.int32) * n).to(device),
            max_seq_len=end,
            num_decodes=num_seqs if n == 1 else 0,
        )
        hidden = runner.model(tokens[rows, pos].to(device), pos.to(device), meta)
        last = torch.arange(1, num_seqs + 1, device=device) * n - 1
        # In fp32 (bf16 logits would round near-ties together): the LM head's matrix, whole at TP 1.
        return (hidden[last].float() @ runner.model.output_layer().weight.float().T).cpu()

    out.append(step(0, prefill))
    for pos in range(prefill, length):
        out.append(step(pos, pos + 1))
    return torch.stack(out, 1)


@gpu
def test_gpu_runner_fp8_kv_cache_top1_agrees_with_bf16_cache(tmp_path, monkeypatch) -> None:
    """A random llama-like model (4 layers, 8/2 heads of 128) in bf16, 4 sequences of 272 tokens:
    a 16-token prefill, then 256 teacher-forced decode steps (1,028 next-token predictions), over
    an fp8 cache (scales 0.5 and 0.25, which the writes and the reads must agree on) against a
    bf16 one, each at its default block size: the fp8 cache's 64-slot blocks send the decodes to
    the fp8 decode kernel (e4m3 products). The next-token argmax agrees at >= 99% of the positions
    whose bf16 top-2 logits are more than 0.05 apart (of a 0.64 spread), >= 97% overall.

    Measured on the CPU's references at this shape in bf16: 98.4% overall, every flip at a gap
    under 0.014, logits within 1.3% (the same model in bf16 against fp32, both over their own
    cache, agrees at 98.5%: on random weights the near-ties are bf16's as much as fp8's)."""
    import gpu_worker.model_runner
    from kernels import triton_decode_fp8

    # Only the kernel variants these steps launch (the graphs test below warms up all of them).
    monkeypatch.setattr(gpu_worker.model_runner, "warm_up_kernels", lambda model: None)
    folder = llama_folder(tmp_path / "llama")
    rng = random.Random(0)
    seqs = [[rng.randrange(1, 4095) for _ in range(272)] for _ in range(4)]
    logits = {}
    for kv in ("auto", "fp8"):
        runner = make_runner(folder, "cuda", "bfloat16", kv, num_gpu_blocks_override=160, max_model_len=1024,
                             enforce_eager=True, block_size=None)
        layers = runner.model.attention_layers()
        assert layers[0].k_cache.dtype == (FP8_KV_DTYPE if kv == "fp8" else torch.bfloat16)
        assert layers[0].k_cache.shape[1] == (64 if kv == "fp8" else 16)
        assert triton_decode_fp8.applies(8, layers[0].k_cache, layers[0].v_cache) == (kv == "fp8")
        if kv == "fp8":
            for attn in layers:
                attn.k_scale, attn.v_scale = 0.5, 0.25
        logits[kv] = teacher_forced_logits(runner, seqs, prefill=16).flatten(0, 1)
        del runner, layers
        torch.cuda.empty_cache()
    assert logits["fp8"].shape == (4 * 257, 4096)
    assert relative_error(logits["fp8"], logits["auto"]) < 0.05
    clear = logits["auto"].topk(2, -1).values
    clear = clear[:, 0] - clear[:, 1] > 0.05
    same = logits["fp8"].argmax(-1) == logits["auto"].argmax(-1)
    assert same[clear].float().mean().item() >= 0.99
    assert same.float().mean().item() >= 0.97


@gpu
def test_gpu_runner_fp8_cuda_graphs_equal_eager(tiny, tokenizer) -> None:
    """Over an fp8 cache (fp32 model, its q in fp32: the warm-up compiles for that q, not the
    cache's dtype), decode steps replayed from CUDA graphs (padded batches, constant scales)
    give the eager steps' tokens, and the same tokens as the CPU's references. The graphs' runner
    puts each step's decodes longest first (the fp8 decode kernel's order, forced: this tiny
    model's heads are not ones that kernel takes), the others keep the plan's order."""
    folder, _ = tiny("qwen3")
    prompts = random_prompts(len(tokenizer))
    assert len({len(p) for p in prompts}) > 1
    graphs = make_runner(str(folder), "cuda", "float32", "fp8", max_num_seqs=4)
    assert graphs.graphs.sizes("decode")
    graphs.input_batch.longest_decodes_first = True
    tokens = runner_greedy(graphs, prompts)
    del graphs
    eager = make_runner(str(folder), "cuda", "float32", "fp8", max_num_seqs=4, enforce_eager=True)
    assert runner_greedy(eager, prompts) == tokens
    cpu = make_runner(str(folder), "cpu", "float32", "fp8")
    assert not cpu.input_batch.longest_decodes_first
    assert runner_greedy(cpu, prompts) == tokens
