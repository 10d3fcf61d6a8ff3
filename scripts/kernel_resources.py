"""Compile the paged-attention kernel for Hopper (sm_90) on a machine without a GPU and report
what each tiling costs: registers, spills, shared memory, and how many K/V buffers Triton's
pipeliner allocated (1 means loads do not overlap the math).

    python scripts/kernel_resources.py                   # the default tilings
    python scripts/kernel_resources.py 128,64,8,5 16,32,4,5   # block_m,tile_n,warps,stages
    python scripts/kernel_resources.py --all-kernels     # every kernel a decoder step launches
    python scripts/kernel_resources.py --kv-fp8          # the tilings over an fp8 KV cache

Uses the ptxas and cuobjdump that ship inside the triton wheel; no device time needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import triton_activation, triton_kv_cache, triton_linear, triton_norm, triton_qkv, triton_rotary  # noqa: E402
from kernels import triton_paged_attention as attn  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_tiling(block_m: int, tile_n: int, warps: int, stages: int, group: int = 4, head_dim: int = 128,
                   splits: int = 1, dtype: str = "bf16", kv_fp8: bool = False, v_t: bool = False):
    consts = dict(NUM_HEADS=8 * group, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_SIZE=16,
                  BLOCK_M=block_m, BLOCK_Q=block_m // group, TILE_N=tile_n, NUM_SPLITS=splits,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, KV_FP8=kv_fp8,
                  V_RUN=16 if v_t else 0)
    kv = "fp8e4nv" if kv_fp8 else dtype
    pointers = dict(q_ptr=dtype, k_cache_ptr=kv, v_cache_ptr=kv, out_ptr=dtype, part_out_ptr="fp32",
                    part_lse_ptr="fp32", block_tables_ptr="i32", seq_lens_ptr="i32", query_start_loc_ptr="i32")
    return compile_kernel(attn._paged_attention_kernel, consts, pointers, floats=("qk_scale", "v_scale"),
                          num_warps=warps, num_stages=stages, aligned=True)


def compile_kernel(kernel, consts: dict, pointers: dict, floats: tuple = (), num_warps: int = 4, num_stages: int = 3,
                   aligned: bool = False):
    """Compile `kernel` for sm_90: constexprs given, pointers typed by name, other scalars i32.

    aligned: tell the compiler what the launcher sees at run time, 16-byte aligned pointers
    and strides divisible by 16."""
    if "PDL" in kernel.arg_names and "PDL" not in consts:  # kernels/pdl.py: the variant the H200 runs
        consts = {**consts, "PDL": True}
    signature = {}
    for name in kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n.endswith("_ptr") or n.startswith("stride")} if aligned else None
    return triton.compile(ASTSource(kernel, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def all_kernels() -> dict:
    """Every Triton kernel of a decoder step, at qwen3-0.6b / llama3-8b shapes in bf16; those that
    touch the KV cache also over an fp8 cache (`--kv-cache-dtype fp8`, names ending " fp8")."""
    bf = "bf16"
    out = {}
    scales = ("k_inv_scale", "v_inv_scale")
    for norm, heads, kv_heads, fp8 in ((True, 16, 8, False), (False, 32, 8, False), (True, 16, 8, True)):
        cache = "fp8e4nv" if fp8 else bf
        out[f"rope_write_kv norm={norm}" + " fp8" * fp8] = compile_kernel(
            triton_qkv._rope_write_kv_kernel,
            dict(NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, HEAD_DIM=128, HALF=64, BLOCK_H=heads, BLOCK_KV=kv_heads,
                 BLOCK_HALF=64, BLOCK_SIZE=16, NORM=norm, FP8=fp8, EMULATE=False),
            dict(qkv_ptr=bf, cos_ptr="fp32", sin_ptr="fp32", q_out_ptr=bf, k_cache_ptr=cache, v_cache_ptr=cache,
                 slot_mapping_ptr="i64", q_norm_ptr=bf, k_norm_ptr=bf),
            floats=("eps", *scales))
    for add in (True, False):
        out[f"rms_norm add={add}"] = compile_kernel(
            triton_norm._rms_norm_kernel, dict(N=4096, BLOCK_N=4096, ROWS=1, ADD_RESIDUAL=add),
            dict(x_ptr=bf, residual_ptr=bf, weight_ptr=bf, out_ptr=bf, residual_out_ptr=bf), floats=("eps",),
            num_warps=8)
    out["rotary"] = compile_kernel(
        triton_rotary._rotary_kernel, dict(NUM_HEADS=32, HALF=64, BLOCK_H=32, BLOCK_HALF=64),
        dict(x_ptr=bf, cos_ptr="fp32", sin_ptr="fp32", out_ptr=bf))
    for fp8 in (False, True):
        cache = "fp8e4nv" if fp8 else bf
        out["write_kv" + " fp8" * fp8] = compile_kernel(
            triton_kv_cache._write_kv_kernel,
            dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, BLOCK_SIZE=16, FP8=fp8, EMULATE=False),
            dict(k_ptr=bf, v_ptr=bf, k_cache_ptr=cache, v_cache_ptr=cache, slot_mapping_ptr="i64"), floats=scales)
    out["silu_and_mul"] = compile_kernel(
        triton_activation._silu_and_mul_kernel, dict(INTER=14336, BLOCK=1024), dict(x_ptr=bf, out_ptr=bf))
    out["reduce_splits"] = compile_kernel(
        attn._reduce_splits_kernel, dict(NUM_HEADS=32, HEAD_DIM=128, HEAD_DIM_PAD=128, NUM_SPLITS=8),
        dict(part_out_ptr="fp32", part_lse_ptr="fp32", out_ptr=bf))
    cfg = triton_linear.default_config(4096, 4096)  # llama3-8b's o projection: the largest tiles
    out["skinny_linear"] = compile_kernel(
        triton_linear._skinny_linear_kernel,
        dict(HAS_BIAS=False, BLOCK_M=triton_linear.MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=True,
             DOT_PRECISION="tf32", UPCAST=False),
        dict(x_ptr=bf, w_ptr=bf, b_ptr=bf, out_ptr=bf), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        aligned=True)
    for block_m, tile_n, warps, stages, group in ((16, 32, 4, 5, 4), (16, 64, 4, 5, 2), (128, 64, 8, 5, 4)):
        for fp8 in (False, True):
            out[f"paged_attention {block_m}x{tile_n} group {group}" + " fp8" * fp8] = compile_tiling(
                block_m, tile_n, warps, stages, group=group, kv_fp8=fp8)
    return out


def report(compiled) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])
    return (f"regs {regs.group(1)}, stack {regs.group(2)} B, shared {compiled.metadata.shared} B, "
            f"K/V buffers {buffers[:2]}")


if __name__ == "__main__":
    kv_fp8 = "--kv-fp8" in sys.argv[1:]  # the tilings over an fp8 cache
    if kv_fp8:
        sys.argv.remove("--kv-fp8")
    if sys.argv[1:] == ["--all-kernels"]:
        for name, compiled in all_kernels().items():
            print(f"{name}: compiled for sm_90, {report(compiled)}")
        sys.exit(0)
    specs = sys.argv[1:] or ["16,32,4,5", "128,64,8,5"]
    for spec in specs:
        block_m, tile_n, warps, stages = (int(x) for x in spec.split(","))
        print(f"block_m {block_m} tile_n {tile_n} warps {warps} stages {stages}: "
              f"{report(compile_tiling(block_m, tile_n, warps, stages, kv_fp8=kv_fp8))}")
